"""`inspectd check-config --engines` as a real subprocess on real bundles and ONNX Runtime: every
engine a line may run is opened (parity gate at the line's threshold), timed and held against the
line's budget; a bundle no backend accepts, or an engine slower than the budget, exits 1."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from inspectd.daemon.pipeline import engine_time_problem

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspectd.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def _config(tmp_path: Path, synthetic_parts: Any, lines: list[dict[str, Any]]) -> Path:
    for line in lines:
        line.setdefault("source", {"type": "replay", "path": str(synthetic_parts.test_good)})
        line.setdefault("threshold", 3.0)
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump({"lines": lines}))
    return path


def test_engines_that_fit_are_listed_and_the_check_passes(tmp_path: Path, tiny_bundle: Path,
                                                          tiny_method_bundles: Any, synthetic_parts: Any) -> None:
    cfg = _config(tmp_path, synthetic_parts, [
        {"id": "press1", "bundle": str(tiny_bundle), "latency_budget_ms": 2000, "backends": ["onnxruntime"],
         "recipes": [{"name": "B", "bundle": str(tiny_method_bundles("cutpaste-ae")), "threshold": 6.0}]}])
    res = _cli("check-config", "--engines", str(cfg))
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().splitlines()
    assert out[0].startswith(f"{cfg}: OK") and len(out) == 3, out
    for line, recipe in zip(out[1:], ("default", "B")):
        assert line.startswith(f"line press1, recipe {recipe}: bundle ") and " on onnxruntime: " in line, line
        assert "ms per frame, latency budget 2000 ms" in line
    assert "WARNING" not in res.stderr and "ERROR" not in res.stderr


def test_a_bundle_no_backend_accepts_or_a_budget_too_small_exits_1(tmp_path: Path, tiny_bundle: Path,
                                                                   synthetic_parts: Any) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    model = tampered / "model.onnx"
    model.write_bytes(model.read_bytes()[:-16] + b"\0" * 16)
    cfg = _config(tmp_path, synthetic_parts, [
        {"id": "fast", "bundle": str(tiny_bundle), "latency_budget_ms": 2000},
        {"id": "tight", "bundle": str(tiny_bundle), "latency_budget_ms": 0.01},     # no engine is this fast
        {"id": "gpu", "bundle": str(tiny_bundle), "backends": ["tensorrt"]},         # none here
        {"id": "bad", "bundle": str(tiny_bundle), "latency_budget_ms": 2000,
         "recipes": [{"name": "new", "bundle": str(tampered), "threshold": 3.0}]}])
    res = _cli("check-config", "--engines", str(cfg))
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.strip().splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 3 and "Traceback" not in res.stderr, res.stderr
    assert errors[0].startswith("ERROR: line tight, recipe default: bundle ") and "over the latency budget of 0.01 ms" in errors[0]
    assert errors[1].startswith("ERROR: line gpu, recipe default: cannot judge parts: ") and "tensorrt" in errors[1]
    assert errors[2].startswith("ERROR: line bad, recipe new: cannot judge parts: ") and "sha256" in errors[2]
    fine = [line for line in res.stdout.splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in fine] == ["line fast, recipe default", "line bad, recipe default"]


@pytest.mark.parametrize("engine_ms, budget_ms, level", [
    (60.0, 50.0, logging.ERROR), (50.0, 50.0, logging.ERROR), (30.0, 50.0, logging.WARNING),
    (25.0, 50.0, None), (3.0, 50.0, None),
])
def test_the_budget_must_hold_two_engine_calls(engine_ms: float, budget_ms: float, level: int | None) -> None:
    problem = engine_time_problem(engine_ms, budget_ms, "NG")
    assert (problem[0] if problem else None) == level
    if problem:
        assert f"{engine_ms:.1f} ms per frame" in problem[1] and "--members 1" in problem[1]


def test_a_line_that_needs_over_half_the_cpus_is_warned_about(tmp_path: Path, tiny_bundle: Path,
                                                              synthetic_parts: Any) -> None:
    """The engine's CPU per frame, measured, held against the line's rate from its config: a replay
    at 1000 fps needs more CPUs than any engine of ours leaves (warned, exit 0: parts are still
    judged), one at 0.1 fps a sliver; a line whose config gives no rate is told so."""
    cfg = _config(tmp_path, synthetic_parts, [
        {"id": "fast", "bundle": str(tiny_bundle), "latency_budget_ms": 2000,
         "source": {"type": "replay", "path": str(synthetic_parts.test_good), "fps": 1000.0}},
        {"id": "slow", "bundle": str(tiny_bundle), "latency_budget_ms": 2000,
         "source": {"type": "replay", "path": str(synthetic_parts.test_good), "fps": 0.1}},
        {"id": "free", "bundle": str(tiny_bundle), "latency_budget_ms": 2000}])
    res = _cli("check-config", "--engines", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    warned = [line for line in res.stderr.splitlines() if line.startswith("WARNING: line fast")]
    assert len(warned) == 1 and "at 1000 fps (source.fps)" in warned[0], res.stderr
    assert "ms of CPU per frame" in warned[0] and "any other busy program on this PC" in warned[0]
    slow = [line for line in res.stdout.splitlines() if line.startswith("line slow")]
    assert len(slow) == 1 and "at 0.1 fps (source.fps) 0.00 of the" in slow[0], res.stdout
    free = [line for line in res.stdout.splitlines() if line.startswith("line free")]
    assert len(free) == 1 and "the config gives no frame rate" in free[0], res.stdout
    assert "WARNING: line slow" not in res.stderr and "WARNING: line free" not in res.stderr


@pytest.mark.parametrize("cpu_ms, fps, usable, level", [
    (50.0, 20.0, 2, logging.INFO),      # 1.0 of 2 CPUs: exactly half is still room
    (55.0, 20.0, 2, logging.WARNING),   # 1.1 of 2: the default engine on the 2-core VM (§29)
    (60.0, 10.0, 2, logging.INFO),      # 0.6 of 2
    (55.0, 20.0, 4, logging.INFO),      # 1.1 of 4
])
def test_the_cpu_share_rule(cpu_ms: float, fps: float, usable: int, level: int) -> None:
    from inspectd.daemon.preflight import cpu_share

    got, said = cpu_share(cpu_ms, (fps, "source.fps"), usable)
    assert got == level, said
    assert f"{cpu_ms:.0f} ms of CPU per frame, at {fps:g} fps (source.fps) {fps * cpu_ms / 1000:.2f} of the " \
           f"{usable} CPUs" in said


def test_the_line_rate_comes_from_the_camera_feature_or_the_replay_fps(tmp_path: Path) -> None:
    from inspectd.daemon.config import load_config
    from inspectd.daemon.preflight import line_rate

    def camera(index: int) -> dict[str, Any]:
        return {"type": "genicam", "cti": "/opt/cam.cti", "device": {"index": index}}
    lines = [
        {"id": "cam", "bundle": "/b", "threshold": 3.0,
         "source": {**camera(0), "features": {"AcquisitionFrameRate": 20, "Gain": 2.0}}},
        {"id": "triggered", "bundle": "/b", "threshold": 3.0, "source": camera(1)},
        {"id": "off", "bundle": "/b", "threshold": 3.0,
         "source": {**camera(2), "features": {"AcquisitionFrameRate": True}}},   # not a rate
        {"id": "replay", "bundle": "/b", "threshold": 3.0, "source": {"type": "replay", "path": "/p", "fps": 12.5}},
        {"id": "asap", "bundle": "/b", "threshold": 3.0, "source": {"type": "replay", "path": "/p"}},
    ]
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump({"lines": lines}))
    config = load_config(path, validate_paths=False)
    assert [line_rate(cfg) for cfg in config.lines] == [
        (20.0, "source.features.AcquisitionFrameRate"), None, None, (12.5, "source.fps"), None]
