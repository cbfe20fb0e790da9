"""`inspectd capture` on the real replay source and the real GenTL simulator camera (viky.cti):
frames saved are the pixels the daemon gets (training reads them back through the same
`prepare`), all-or-nothing writes (a real full tmpfs), refusal of a non-empty folder, one-line
errors for a bad line id and an absent camera."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import genicam
import numpy as np
import pytest
import yaml

from inspectd.daemon.capture import MANIFEST, capture
from inspectd.daemon.config import load_config
from inspectd.daemon.sources import make_source
from inspectd.daemon.sources.base import SourceError
from inspectd.engines.preprocess import InputSpec, list_images, load_prepared, prepare
from inspectd.errors import ConfigError, DataError, InspectdError

CTI = Path(genicam.__file__).parent / "viky.cti"
CAPTURE = [sys.executable, "-m", "inspectd", "capture"]


def _replay_folder(root: Path, n: int = 12, color: bool = False) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (60, 80, 3) if color else (60, 80), dtype=np.uint8)
        cv2.imwrite(str(root / f"p{i:02d}.png"), img)
    return root


def _config(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"lines": lines}))
    return path


def _replay_line(line_id: str, folder: Path, **extra: Any) -> dict[str, Any]:
    return {"id": line_id, "source": {"type": "replay", "path": str(folder)}, "bundle": "/no/bundle/yet",
            "threshold": 3.0, **extra}


@pytest.mark.parametrize("color", [False, True])
def test_replay_capture_saves_what_the_daemon_sees(tmp_path: Path, color: bool) -> None:
    folder = _replay_folder(tmp_path / "replay", color=color)
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder, roi=[10, 5, 40, 30])])
    result = capture(cfg, "l1", tmp_path / "teach", count=5, every=2)
    assert [p.name for p in list_images(tmp_path / "teach")] == [f"frame_{i:05d}.png" for i in range(1, 6)]
    assert result.frames_read == 9 and result.shape == ((60, 80, 3) if color else (60, 80))
    assert result.train_command().endswith("--roi 10,5,40,30 --out /no/bundle/yet")
    meta = json.loads((tmp_path / "teach" / MANIFEST).read_text())
    assert meta["line"] == "l1" and meta["frames"] == 5 and meta["roi"] == [10, 5, 40, 30]
    # Frames 1, 3, 5, ... of the line's own source; read back by training's loader with the bundle
    # geometry (ROI recorded in the bundle), they are exactly the daemon's model input.
    source = make_source(load_config(cfg).line("l1"))
    source.open()
    frames = [source.read(1.0) for _ in range(9)][::2]
    source.close()
    spec = InputSpec(32, 32, "rgb" if color else "gray", roi=(10, 5, 40, 30))
    for frame, path in zip(frames, result.files):
        np.testing.assert_array_equal(load_prepared(path, spec), prepare(frame.image, spec))
        stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored[..., ::-1] if color else stored, frame.image)  # lossless, whole frame
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_refuses_a_non_empty_folder_unless_forced_and_replaces_it_whole(tmp_path: Path) -> None:
    folder = _replay_folder(tmp_path / "replay")
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    out = tmp_path / "teach"
    out.mkdir()
    capture(cfg, "l1", out, count=2)  # an empty folder is fine
    with pytest.raises(DataError, match="not empty.*--force"):
        capture(cfg, "l1", out, count=3)
    assert len(list_images(out)) == 2
    # A capture that fails (replay too short) leaves the old capture as it was.
    with pytest.raises(DataError, match="ended after 12 frames"):
        capture(cfg, "l1", out, count=20, force=True)
    assert len(list_images(out)) == 2
    capture(cfg, "l1", out, count=4, force=True)
    assert len(list_images(out)) == 4 and json.loads((out / MANIFEST).read_text())["frames"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.yaml", "replay", "teach"]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_tmpfs: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "replay"
    folder.mkdir()
    for i in range(8):  # incompressible: ~20 KB per PNG, the 64 KiB tmpfs fills at the 3rd or 4th
        cv2.imwrite(str(folder / f"n{i}.png"), rng.integers(0, 256, (140, 140), dtype=np.uint8))
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    with pytest.raises(InspectdError, match=r"No space left on device \(\d of 8 frames written, nothing kept\)"):
        capture(cfg, "l1", tiny_tmpfs / "teach", count=8)
    assert list(tiny_tmpfs.iterdir()) == []
    # The CLI says it in one line, exit 1.
    proc = subprocess.run(CAPTURE + ["--config", str(cfg), "--line", "l1", "--out", str(tiny_tmpfs / "teach"),
                                     "--count", "8"], capture_output=True, text=True, timeout=60)
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 1 and len(err) == 1 and "No space left on device" in err[0], proc.stderr


def test_cli_bad_line_and_refusal_are_one_line_errors(tmp_path: Path) -> None:
    folder = _replay_folder(tmp_path / "replay", n=3)
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    proc = subprocess.run(CAPTURE + ["--config", str(cfg), "--line", "nope", "--out", str(tmp_path / "o"),
                                     "--count", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "inspectd capture: error: no line 'nope' (lines: l1)"
    proc = subprocess.run(CAPTURE + ["--config", str(cfg), "--line", "l1", "--out", str(tmp_path / "o"),
                                     "--count", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 frames (80x60) in" in proc.stdout and "inspectd train --good" in proc.stdout
    with pytest.raises(ConfigError, match="--count and --every must be > 0"):
        capture(cfg, "l1", tmp_path / "x", count=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")
def test_gentl_simulator_capture_and_absent_camera(tmp_path: Path) -> None:
    cam = {"type": "genicam", "cti": str(CTI), "device": {"index": 0}}
    absent = {"type": "genicam", "cti": str(CTI), "device": {"serial": "9"}}
    cfg = _config(tmp_path / "cam.yaml", [
        {"id": "cam1", "source": cam, "bundle": "/b", "threshold": 3.0},
        {"id": "gone", "source": absent, "bundle": "/b", "threshold": 3.0}])
    result = capture(cfg, "cam1", tmp_path / "teach", count=4, every=2)
    assert result.frames_read == 7 and result.shape == (400, 400, 3)
    images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in result.files]
    assert all(img.shape == (400, 400, 3) for img in images)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"line gone: camera not available after 1 s: .*no camera with serial '9'"):
        capture(cfg, "gone", tmp_path / "none", count=2, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")
def test_a_pixel_format_it_cannot_convert_is_a_one_line_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The camera delivers a pixel format inspectd cannot convert: capture says so in one line naming
    the format (not a traceback), and leaves no folder behind. The simulator's RGBa8 is taken out of
    the supported formats to stand for such a format."""
    from inspectd.daemon.sources import genicam as source_module

    monkeypatch.delitem(source_module._FORMATS, "RGBa8")
    cfg = _config(tmp_path / "cam.yaml", [{"id": "cam1", "source": {"type": "genicam", "cti": str(CTI),
                                                                  "device": {"index": 0}},
                                          "bundle": "/b", "threshold": 3.0}])
    with pytest.raises(DataError, match=r"line cam1: frame .*RGBa8"):
        capture(cfg, "cam1", tmp_path / "teach", count=2)
    assert not (tmp_path / "teach").exists()


def test_force_replaces_a_previous_capture_only(tmp_path: Path) -> None:
    """`--force` replaces a folder an earlier capture made. Pointed at the line's own replay folder (or
    a folder that holds it), or at any folder capture did not make, it refuses: it used to delete it."""
    folder = _replay_folder(tmp_path / "replay")
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    n = len(list(folder.iterdir()))
    for out in (folder, tmp_path):
        with pytest.raises(DataError, match="capture"):
            capture(cfg, "l1", out, count=2, force=True)
        assert len(list(folder.iterdir())) == n
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not made by inspectd capture"):
        capture(cfg, "l1", notes, count=2, force=True)
    assert (notes / "notes.txt").read_text() == "keep me"


def _frames_kept(err: str, out: Path) -> Path:
    """The folder a refused capture names as holding its frames (a sibling of OUT)."""
    kept = Path(err.rsplit(" kept in ", 1)[1].split()[0])
    assert kept.parent == out.parent and kept.is_dir()
    return kept


@pytest.mark.parametrize("force", [False, True])
def test_files_put_in_out_during_the_capture_are_never_deleted(tmp_path: Path, force: bool) -> None:
    """OUT is checked before a capture that can last hours. An operator copying images into OUT
    meanwhile (OUT new, or a previous capture replaced with --force) makes the capture refuse to
    publish, in one line naming OUT and the folder with its frames: nothing is deleted."""
    folder = _replay_folder(tmp_path / "replay")
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    out = tmp_path / "teach"
    if force:
        capture(cfg, "l1", out, count=2)  # a previous capture: --force may replace it, not what came since
    before = sorted(p.name for p in out.iterdir()) if force else []

    def operator_copies_images(text: str) -> None:
        if text.startswith("capturing"):
            out.mkdir(exist_ok=True)
            (out / "other_teach_set_0001.png").write_bytes(b"precious")

    with pytest.raises(DataError) as info:
        capture(cfg, "l1", out, count=3, force=force, progress=operator_copies_images)
    err = str(info.value)
    assert "\n" not in err and err.startswith(f"{out}: ") and "during the capture" in err, err
    assert (out / "other_teach_set_0001.png").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["other_teach_set_0001.png"])
    kept = _frames_kept(err, out)
    assert [p.name for p in list_images(kept)] == [f"frame_{i:05d}.png" for i in range(1, 4)]
    assert json.loads((kept / MANIFEST).read_text())["frames"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden staging or old folder


def test_a_second_capture_to_the_same_out_is_not_replaced(tmp_path: Path) -> None:
    """Two captures to the same --out with --force over a previous capture: the one that finishes
    second must not delete the first one's frames (they were not there when it checked OUT)."""
    folder = _replay_folder(tmp_path / "replay")
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder)])
    out = tmp_path / "teach"
    capture(cfg, "l1", out, count=2)
    second: list[Any] = []

    def second_capture_meanwhile(text: str) -> None:
        if text.startswith("capturing") and not second:
            second.append(capture(cfg, "l1", out, count=5, force=True))

    with pytest.raises(DataError, match=rf"^{out}: .*during the capture.* kept in ") as info:
        capture(cfg, "l1", out, count=3, force=True, progress=second_capture_meanwhile)
    assert json.loads((out / MANIFEST).read_text())["frames"] == 5 and len(list_images(out)) == 5
    assert len(list_images(_frames_kept(str(info.value), out))) == 3


def test_cli_refuses_when_out_was_filled_during_the_capture(tmp_path: Path) -> None:
    """The real command on a paced replay (10 fps): a file copied into OUT while it runs is kept, the
    command exits 1 with one error line naming OUT and where the frames are."""
    folder = _replay_folder(tmp_path / "replay", n=30)
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder, source={"type": "replay",
                                                                                "path": str(folder), "fps": 10})])
    out = tmp_path / "teach"
    proc = subprocess.Popen(CAPTURE + ["--config", str(cfg), "--line", "l1", "--out", str(out), "--count", "25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("capturing 25 frames")
        out.mkdir()
        (out / "operator.png").write_bytes(b"precious")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = [line for line in stderr.splitlines() if "error" in line]  # beside INFO log lines
    assert proc.returncode == 1 and len(err) == 1 and str(out) in err[0], stderr
    assert (out / "operator.png").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["operator.png"]
    assert len(list_images(_frames_kept(err[0], out))) == 25


def _start_capture(cfg: Path, line: str, out: Path, count: int, *extra: str,
                   hangup: signal.Handlers = signal.SIG_DFL) -> subprocess.Popen:
    """`hangup`: the SIGHUP disposition the capture starts with (default: as from a terminal; SIG_IGN:
    as under nohup). Set here, not inherited from however pytest itself was started."""
    previous = signal.signal(signal.SIGHUP, hangup)  # an exec'd child inherits SIG_DFL / SIG_IGN
    try:
        return subprocess.Popen(CAPTURE + ["--config", str(cfg), "--line", line, "--out", str(out),
                                           "--count", str(count), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _interrupt_after_frames(proc: subprocess.Popen, sig: signal.Signals,
                            staged_in: Path) -> tuple[int, str, str, float]:
    """Wait until the capture has staged frames, send `sig`; (exit code, stdout, stderr, seconds to exit)."""
    assert proc.stdout is not None
    seen = [proc.stdout.readline(), proc.stdout.readline()]
    try:
        assert seen[0].startswith("capturing ") and seen[1].strip() == "10/1000", seen
        # Frames are on disk (a staging folder beside OUT): what a stop must not leave behind.
        assert [p for p in staged_in.iterdir() if ".capture-" in p.name and any(p.iterdir())]
        t0 = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        return proc.returncode, "".join(seen) + stdout, stderr, time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_the_capture_at_once_and_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C, SIGTERM (systemd, `timeout`) or a closed terminal during `inspectd capture` on the real
    replay source (paced: 1000 frames would take a minute): the command ends within a second with
    128 + the signal's number, one line saying it was interrupted and nothing was written, and no
    staging folder is left beside OUT (SIGTERM used to leave `.teach.capture-XXXX/` with the frames).
    An earlier capture in OUT (replaced only when a new one is complete, --force) is untouched."""
    folder = _replay_folder(tmp_path / "replay", n=30)
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder, source={
        "type": "replay", "path": str(folder), "fps": 20, "loop": True})])
    out = tmp_path / "teach"
    capture(cfg, "l1", out, count=3)  # an earlier capture the interrupted one would have replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    proc = _start_capture(cfg, "l1", out, 1000, "--force")
    rc, stdout, stderr, took = _interrupt_after_frames(proc, sig, tmp_path)
    assert rc == 128 + sig, (rc, stderr)
    assert took < 2.0, took
    said = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(said) == 1, stderr
    assert said[0].startswith(f"inspectd capture: interrupted by {sig.name} after ") and "of 1000 frames" in said[0]
    assert "nothing written" in said[0] and str(out) in said[0], said[0]
    assert "Traceback" not in stderr and "inspectd train" not in stdout  # no success hint
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no staging, no kept folder
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_capture_started_under_nohup_keeps_ignoring_a_hangup(tmp_path: Path) -> None:
    """`nohup inspectd capture ...` (SIGHUP ignored when it starts): closing the terminal must not stop
    it; SIGTERM still does."""
    folder = _replay_folder(tmp_path / "replay", n=30)
    cfg = _config(tmp_path / "lines.yaml", [_replay_line("l1", folder, source={
        "type": "replay", "path": str(folder), "fps": 20, "loop": True})])
    proc = _start_capture(cfg, "l1", tmp_path / "teach", 1000, hangup=signal.SIG_IGN)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("capturing ") and proc.stdout.readline().strip() == "10/1000"
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout.readline().strip() == "20/1000"  # ten more frames at 20 fps: still capturing
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in stderr and "SIGHUP" not in stderr


@pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_stops_a_camera_capture_without_a_reconnect(tmp_path: Path, sig: signal.Signals) -> None:
    """The same on the GenTL simulator camera: Ctrl-C used to reach harvesters' own SIGINT handler
    (installed when a camera is opened in the main thread), which destroys the acquirer; capture took
    the GenTL error (-1006, with a harvesters traceback) for a lost camera, reconnected and went on
    to save all N frames, exit 0."""
    cfg = _config(tmp_path / "cam.yaml", [{"id": "cam1", "source": {"type": "genicam", "cti": str(CTI),
                                                                  "device": {"index": 0}},
                                          "bundle": "/b", "threshold": 3.0}])
    out = tmp_path / "teach"
    proc = _start_capture(cfg, "cam1", out, 1000)
    rc, stdout, stderr, took = _interrupt_after_frames(proc, sig, tmp_path)
    assert rc == 128 + sig, (rc, stdout, stderr)
    assert took < 3.0, took
    assert "camera lost" not in stdout + stderr and "Traceback" not in stderr and "Exception" not in stderr
    said = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(said) == 1 and said[0].startswith(f"inspectd capture: interrupted by {sig.name}"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.yaml"]


def test_the_hint_names_both_uses_and_never_both(tmp_path: Path) -> None:
    """The capture's closing hint: train on the frames if they are training images, calibrate the line
    with them if they are held-out good parts, never both with the same images. It used to offer only
    the train command, into the line's own bundle, after every capture (also the calibration one)."""
    folder = _replay_folder(tmp_path / "replay", n=6)
    bundle = tmp_path / "bundles" / "l1"
    cfg = _config(tmp_path / "lines.yaml", [{**_replay_line("l1", folder, roi=[10, 5, 40, 30]),
                                             "bundle": str(bundle)}])
    out = tmp_path / "calib_good"

    def hint(*extra: str) -> list[str]:
        proc = subprocess.run(CAPTURE + ["--config", str(cfg), "--line", "l1", "--out", str(out), "--count", "2",
                                         *extra], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("next")):]

    train = f"inspectd train --good {out} --roi 10,5,40,30 --out {bundle}"
    calibrate = f"inspectd calibrate --bundle {bundle} --good {out} --line l1 --config {cfg} --target-false-reject"
    text = hint()
    assert any("training images" in line and line.endswith(train) for line in text), text
    assert any("held-out good parts" in line and calibrate in line for line in text), text
    assert any("never both" in line for line in text), text
    # The line's bundle exists (in production, perhaps): training is offered into a new folder beside
    # it, never over it (train --force would have replaced the bundle the line runs).
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    text = hint("--force")
    train_line = next(line for line in text if "inspectd train" in line)
    assert f"--out {bundle}" not in train_line.replace(f"--out {bundle}-", "") and f"--out {bundle}-" in train_line
    assert any(calibrate in line for line in text), text
