"""ReplaySource on real files written with OpenCV in tmp_path: folders, labels, video, pacing, loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inspectd.daemon.config import ReplaySourceConfig
from inspectd.daemon.sources import make_source
from inspectd.daemon.sources.base import SourceError
from inspectd.daemon.sources.replay import ReplaySource, label_for


def _rgb(value: int, size: int = 32) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:, :, 0] = value          # red channel carries the file's identity
    img[:, :, 2] = 255 - value    # blue differs: catches an RGB/BGR swap
    return img


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _drain(src: ReplaySource, limit: int = 100) -> list:
    frames = []
    for _ in range(limit):
        frame = src.read(1.0)
        if frame is None:
            break
        frames.append(frame)
    return frames


def test_folder_sorted_rgb_gray_and_labels(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "bad" / "b1.png", _rgb(200))
    _write_rgb(tmp_path / "good" / "g1.png", _rgb(10))
    _write_rgb(tmp_path / "good" / "g2.png", _rgb(20))
    assert cv2.imwrite(str(tmp_path / "good" / "g3_gray.png"), np.full((16, 24), 77, np.uint8))
    src = ReplaySource("l1", tmp_path)
    src.open()
    frames = _drain(src)
    assert src.exhausted and src.read(0.01) is None
    assert [Path(f.meta["path"]).name for f in frames] == ["b1.png", "g1.png", "g2.png", "g3_gray.png"]
    assert [f.meta["label"] for f in frames] == ["bad", "good", "good", "good"]
    assert [f.frame_id for f in frames] == [1, 2, 3, 4]
    assert frames[0].image.shape == (32, 32, 3) and frames[0].image.dtype == np.uint8
    assert tuple(frames[0].image[0, 0]) == (200, 0, 55)   # RGB order, not BGR
    assert frames[3].image.shape == (16, 24) and frames[3].image[0, 0] == 77  # grey stays H x W
    assert all(f.line == "l1" for f in frames)
    monos = [f.acquired_mono for f in frames]
    assert monos == sorted(monos) and all(f.acquired_ns > 0 for f in frames)
    assert src.stats.frames == 4
    src.close()
    src.close()  # idempotent


def test_labels_from_file_names_and_disabled(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "a_bad_01.png", _rgb(1))
    _write_rgb(tmp_path / "b-good-02.png", _rgb(2))
    _write_rgb(tmp_path / "c_03.png", _rgb(3))
    with ReplaySource("l1", tmp_path) as src:
        labels = [f.meta.get("label") for f in _drain(src)]
    assert labels == ["bad", "good", None]
    with ReplaySource("l1", tmp_path, labels=False) as src:
        assert all("label" not in f.meta for f in _drain(src))
    assert label_for(tmp_path / "good" / "x_bad.png", tmp_path) == "good"  # folder wins over name


def test_forced_color_modes(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "a.png", _rgb(100))
    with ReplaySource("l1", tmp_path, color="gray") as src:
        frame = src.read(1.0)
    assert frame.image.ndim == 2
    with ReplaySource("l1", tmp_path, color="rgb") as src:
        assert src.read(1.0).image.shape == (32, 32, 3)


def test_loop_repeats_and_keeps_counting(tmp_path: Path) -> None:
    for i in range(3):
        _write_rgb(tmp_path / f"{i}.png", _rgb(i * 50))
    with ReplaySource("l1", tmp_path, loop=True) as src:
        frames = [src.read(1.0) for _ in range(7)]
        assert not src.exhausted
    assert [Path(f.meta["path"]).name for f in frames] == ["0.png", "1.png", "2.png"] * 2 + ["0.png"]
    assert [f.frame_id for f in frames] == list(range(1, 8))


def test_loop_replays_later_passes_from_memory(tmp_path: Path) -> None:
    # Later passes come from the first pass's decoded frames: changing the files after the
    # first pass changes nothing (with cache_mb 0 the change shows, every pass decodes).
    for i in range(3):
        _write_rgb(tmp_path / f"{i}.png", _rgb(i * 50))
    with ReplaySource("l1", tmp_path, loop=True) as cached, \
            ReplaySource("l1", tmp_path, loop=True, cache_mb=0, decode_ahead=0) as uncached:
        first = [cached.read(1.0) for _ in range(3)]
        assert [uncached.read(1.0).image[0, 0, 0] for _ in range(3)] == [0, 50, 100]
        for i in range(3):
            _write_rgb(tmp_path / f"{i}.png", _rgb(7))
        first[0].meta["extra"] = 1          # a consumer's note on one frame's meta
        later = [cached.read(1.0) for _ in range(4)]
        assert [uncached.read(1.0).image[0, 0, 0] for _ in range(3)] == [7, 7, 7]
    assert [f.image[0, 0, 0] for f in later] == [0, 50, 100, 0]
    assert [Path(f.meta["path"]).name for f in later] == ["0.png", "1.png", "2.png", "0.png"]
    assert "extra" not in later[0].meta and [f.frame_id for f in later] == [4, 5, 6, 7]
    assert all(not f.image.flags.writeable for f in later)  # shared: nobody may draw on it
    with pytest.raises(ValueError):
        later[0].image[0, 0, 0] = 1


def test_loop_larger_than_the_cache_decodes_every_pass(tmp_path: Path) -> None:
    for i in range(3):
        _write_rgb(tmp_path / f"{i}.png", _rgb(i * 50, size=256))   # 192 KiB each
    with ReplaySource("l1", tmp_path, loop=True, cache_mb=0.3, decode_ahead=0) as src:
        assert [src.read(1.0).image[0, 0, 0] for _ in range(3)] == [0, 50, 100]
        _write_rgb(tmp_path / "1.png", _rgb(9, size=256))
        assert [src.read(1.0).image[0, 0, 0] for _ in range(3)] == [0, 9, 100]


def test_one_decode_gives_the_same_frames_as_reading_in_each_mode(tmp_path: Path) -> None:
    from inspectd.engines.preprocess import read_image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "a_grey.jpg"), grey)
    _write_rgb(tmp_path / "b_rgb.jpg", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    with ReplaySource("l1", tmp_path) as src:
        a, b = src.read(1.0), src.read(1.0)
    np.testing.assert_array_equal(a.image, read_image(tmp_path / "a_grey.jpg", "gray")[:, :, 0])
    np.testing.assert_array_equal(b.image, read_image(tmp_path / "b_rgb.jpg", "rgb"))


def test_pacing_follows_fps_without_drift(tmp_path: Path) -> None:
    for i in range(10):
        _write_rgb(tmp_path / f"{i:02d}.png", _rgb(i))
    with ReplaySource("l1", tmp_path, fps=50) as src:
        t0 = time.monotonic()
        frames = _drain(src)
        elapsed = time.monotonic() - t0
    assert len(frames) == 10
    assert elapsed >= 0.17          # 9 intervals of 20 ms after the first frame
    assert elapsed < 3.0            # generous: shared CI cores
    stamps = [f.acquired_mono for f in frames]
    assert stamps[-1] - stamps[0] >= 0.17


def test_unpaced_is_fast_and_timeout_short_when_not_due(tmp_path: Path) -> None:
    for i in range(2):
        _write_rgb(tmp_path / f"{i}.png", _rgb(i))
    with ReplaySource("l1", tmp_path, fps=1.0) as src:
        assert src.read(1.0) is not None
        t0 = time.monotonic()
        assert src.read(0.05) is None   # next frame due in ~1 s: a short read returns None
        assert time.monotonic() - t0 < 0.9
        assert src.stats.timeouts == 1
        assert src.read(2.0) is not None


def test_video_file(tmp_path: Path) -> None:
    path = tmp_path / "clip_bad.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 32))
    assert writer.isOpened()
    for i in range(6):
        writer.write(cv2.cvtColor(_rgb(40 * i, 32)[:, :, :].repeat(2, axis=1)[:, :48], cv2.COLOR_RGB2BGR))
    writer.release()
    src = make_source(ReplaySourceConfig(type="replay", path=path), "vid")
    src.open()
    frames = _drain(src)
    assert len(frames) == 6 and src.exhausted
    assert frames[0].image.shape == (32, 48, 3) and frames[0].image.dtype == np.uint8
    assert [f.meta["video_frame"] for f in frames] == list(range(6))
    assert all(f.meta["label"] == "bad" and f.meta["path"] == str(path) for f in frames)
    # MJPG is lossy: red rises with the frame number, blue falls (RGB order preserved).
    assert frames[5].image[..., 0].mean() > frames[1].image[..., 0].mean() + 100
    assert frames[5].image[..., 2].mean() < frames[1].image[..., 2].mean() - 100
    src.close()
    with ReplaySource("vid", path, loop=True) as looping:
        assert len([looping.read(1.0) for _ in range(9)]) == 9 and not looping.exhausted


def test_unreadable_video_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video")
    src = ReplaySource("l1", path)
    with pytest.raises(SourceError, match="not a readable video"):
        src.open()
    src.close()


def test_empty_and_missing_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images in"):
        ReplaySource("l1", tmp_path).open()
    with pytest.raises(SourceError, match="does not exist"):
        ReplaySource("l1", tmp_path / "nope").open()


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "a.png", _rgb(1))
    (tmp_path / "b.png").write_bytes(b"\x89PNG truncated")
    _write_rgb(tmp_path / "c.png", _rgb(3))
    with ReplaySource("l1", tmp_path) as src:
        names = [Path(f.meta["path"]).name for f in _drain(src)]
        assert names == ["a.png", "c.png"]
        assert src.stats.skipped_files == 1


def test_hidden_files_and_folders_are_not_replayed(tmp_path: Path) -> None:
    """A folder copied from a Mac: ._NAME twins beside the images, a .Trashes folder. They are not
    parts: not replayed, not counted as unreadable (as training and eval do not read them)."""
    _write_rgb(tmp_path / "a.png", _rgb(1))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".Trashes").mkdir()
    _write_rgb(tmp_path / ".Trashes" / "old.png", _rgb(2))
    with ReplaySource("l1", tmp_path) as src:
        assert [Path(f.meta["path"]).name for f in _drain(src)] == ["a.png"]
        assert src.stats.skipped_files == 0


def test_folder_of_only_corrupt_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.jpg").write_bytes(b"")
    with ReplaySource("l1", tmp_path, loop=True) as src:
        with pytest.raises(SourceError, match="no readable image"):
            src.read(1.0)
        assert src.stats.skipped_files == 2


def test_reopen_restarts_the_replay(tmp_path: Path) -> None:
    for i in range(2):
        _write_rgb(tmp_path / f"{i}.png", _rgb(i))
    src = ReplaySource("l1", tmp_path)
    src.open()
    assert len(_drain(src)) == 2 and src.exhausted
    src.close()
    src.open()
    assert not src.exhausted and src.stats.frames == 0
    assert src.read(1.0).frame_id == 1
    src.close()


def test_bad_arguments() -> None:
    with pytest.raises(SourceError, match="fps"):
        ReplaySource("l1", ".", fps=0)
    with pytest.raises(SourceError, match="color"):
        ReplaySource("l1", ".", color="bgr")
    with pytest.raises(SourceError, match="cache_mb"):
        ReplaySource("l1", ".", cache_mb=-1)


def test_replays_the_shared_synthetic_parts(synthetic_parts) -> None:
    # The project's generated data set: grey PNGs in test_bad/ -> grey frames labelled "bad".
    with ReplaySource("parts", synthetic_parts.test_bad) as src:
        frames = _drain(src)
    assert len(frames) == 12
    assert all(f.image.ndim == 2 and f.image.dtype == np.uint8 for f in frames)
    assert all(f.meta["label"] == "bad" for f in frames)
    assert label_for(synthetic_parts.test_good / "x.png", synthetic_parts.root) == "good"


def test_a_finished_replay_says_camera_disconnected_in_the_heartbeat_and_metrics(
        tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    """The daemon on a replay that does not loop: every part gets its verdict, then the replay is
    at its end and will deliver nothing more. The heartbeat a reject gate reads says so (state
    "blind", camera_connected false: not safe) and so does inspectd_camera_connected (0), instead
    of a connected camera on a line that inspects nothing."""
    import shutil
    import urllib.request

    from inspectd.client import VerdictSubscriber
    from inspectd.daemon import run as run_mod
    from inspectd.daemon.config import config_from_dict

    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted(synthetic_parts.test_good.glob("*.png"))[:3]:
        shutil.copy(p, parts / p.name)
    endpoint = f"ipc://{tmp_path}/pub.sock"
    cfg = config_from_dict({"zmq": {"endpoint": endpoint}, "metrics": {"port": 0}, "heartbeat_interval_s": 0.1,
                            "state_dir": str(tmp_path / "state"),
                            "lines": [{"id": "r1", "source": {"type": "replay", "path": str(parts), "fps": 20,
                                                              "loop": False},
                                       "bundle": str(tiny_bundle), "backends": ["onnxruntime"], "threshold": 5.0}]})
    daemon = run_mod.Daemon(cfg)
    sub = VerdictSubscriber(endpoint, lines=["r1"], heartbeat_timeout_s=None)
    try:
        daemon.build()
        assert daemon.start()
        beats = []
        end = time.monotonic() + 20
        while time.monotonic() < end:
            msg = sub.poll_once(0.1)
            if msg is not None and msg.kind == "heartbeat":
                beats.append(msg.header["status"])
                if msg.header["status"]["verdicts"] == 3 and msg.header["status"]["camera_connected"] is False:
                    break
        assert beats, "no heartbeat"
        assert beats[-1]["frames"] == 3 and beats[-1]["verdicts"] == 3, beats[-1]  # every frame judged
        last = beats[-1]
        assert last["camera_connected"] is False and last["state"] == "blind", last
        assert sub.line_status("r1").camera_connected is False and not sub.line_status("r1").safe
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_server.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'inspectd_camera_connected{line="r1"} 0.0' in text, [
            x for x in text.splitlines() if x.startswith("inspectd_camera_connected")]
        assert 'inspectd_camera_reconnects_total{line="r1"} 0.0' in text  # not reopened for another pass
    finally:
        sub.close()
        daemon.stop()
