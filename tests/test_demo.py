"""`inspectd demo`, README command 1, as a user runs it (a real child process, real daemon,
real ZeroMQ stream), with fewer parts so it stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


def _demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspectd", "demo", "--workdir", str(workdir), *extra],
                          capture_output=True, text=True, timeout=400)


def test_demo_replay_line_end_to_end(workdir):
    run = _demo(workdir, "--parts", "16", "--rate", "20")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5] summary"):
        assert step in out
    parts = re.findall(r"^\s+part_\d{4}_(good|bad)\.png\s+(good|bad)\s+(OK|NG)\s", out, re.M)
    assert len(parts) == 16
    assert all(name == truth for name, truth, _ in parts)
    agree = sum((verdict == "NG") == (truth == "bad") for _, truth, verdict in parts)
    assert agree >= 13, out
    assert re.search(r"parts inspected\s+16", out)
    ng = sum(v == "NG" for _, _, v in parts)
    overlays = list((workdir / "overlays").glob("NG_*.png"))
    assert len(overlays) == ng
    # The threshold was calibrated into the config the daemon ran with.
    assert "threshold:" in (workdir / "lines.yaml").read_text() and "file:" in (workdir / "lines.yaml").read_text()


def test_demo_teaches_from_the_gentl_simulator_and_passes_its_normal_output(workdir):
    """--source genicam: capture the simulator camera's frames (inspectd capture's code), train on
    them, calibrate on captured frames not in the training set, run: its normal output passes."""
    run = _demo(workdir, "--source", "genicam", "--parts", "6", "--rate", "20")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for step in ("[1/5] capturing 40 good frames", "[2/5] training on the camera's frames", "[3/5] calibrating",
                 "[4/5] running the daemon on the GenTL simulator camera", "[5/5] summary"):
        assert step in out, out
    teach = workdir / "genicam" / "teach"
    assert len(list(teach.glob("frame_*.png"))) == 40 and (teach / "capture.json").is_file()
    verdicts = re.findall(r"^\s+frame \d+\s+-\s+(OK|NG)\s", out, re.M)
    assert len(verdicts) == 6 and verdicts.count("OK") >= 4, out  # calibrated for 5% false rejects
    assert re.search(r"parts inspected\s+6", out)


def test_demo_rejects_bad_arguments(tmp_path):
    run = _demo(tmp_path, "--parts", "0")
    assert run.returncode == 2 and "must be > 0" in run.stderr


def test_line_parts_on_disk_match_the_last_generation_across_settings(tmp_path):
    """Regenerating the line folder for other settings must not leave the earlier settings' marker:
    going back to them would then skip generation and replay the other run's parts under this run's
    ground truth (rate 0.25, then 0.75, then 0.25 again)."""
    from inspectd.demo import make_line_parts

    folder = tmp_path / "line"
    seen = []
    for rate in (0.25, 0.75, 0.25):
        parts = make_line_parts(folder, 8, rate, seed=1)
        on_disk = sorted(p.name for p in folder.glob("*.png"))
        assert on_disk == sorted(name for name, _ in parts), (rate, on_disk)
        assert all(name.endswith(f"_{label}.png") for name, label in parts)
        assert len(list(folder.glob(".complete-*"))) == 1  # one marker: what is on disk
        seen.append(parts)
    assert seen[0] != seen[1] and seen[0] == seen[2]  # the settings really give other parts
