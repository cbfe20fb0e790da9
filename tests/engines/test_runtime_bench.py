"""Latency benchmark and the runtime CLI commands (bench, check-engine, build-engine), run
through the real `inspectd` entry point on a real (toy) bundle with ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from inspectd.cli import main
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.bench import BACKBONE_FILE, LatencyStats, paced_row, run_bench
from inspectd.engines.runtime.tensorrt_backend import unavailable_reason as trt_unavailable
from inspectd.errors import ConfigError
from tests.engines.test_runtime_toybundle import make_toy_bundle, toy_onnx


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bench") / "toy")


def test_latency_stats_percentiles() -> None:
    stats = LatencyStats.from_seconds("x", 4, [0.001 * i for i in range(1, 101)])
    assert stats.iterations == 100 and stats.max_ms == pytest.approx(100.0)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == pytest.approx(99.01)
    assert stats.images_per_s == pytest.approx(4 * 100 / 5.05)


def test_bench_all_backends_side_by_side(toy_path: Path) -> None:
    bundle = load_bundle(toy_path)
    result = run_bench(bundle, iterations=15, batch=4, warmup=2)
    ort = [r for r in result.rows if r.name == "onnxruntime"]
    assert [r.batch for r in ort] == [1, 4]
    for r in result.rows:
        assert r.iterations == 15
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms
    assert any(r.name.startswith("preprocess (prepare") for r in result.rows)
    assert any(r.name == "preprocess (load_prepared file)" for r in result.rows)
    # Backends that cannot run here are listed with their reason, not silently dropped.
    if trt_unavailable():
        assert result.skipped["tensorrt"] == trt_unavailable()
    assert "torch" in result.skipped or result.row("torch", 1) is not None
    table = result.table()
    assert "onnxruntime" in table and "p99" in table and "skipped tensorrt" in table
    assert result.engines["onnxruntime"]["providers"] == ["CPUExecutionProvider"]


def test_bench_backbone_only_row_and_head_ratio(toy_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "with-backbone"
    shutil.copytree(toy_path, path)
    (path / BACKBONE_FILE).write_bytes(toy_onnx())  # any graph with the same input stands in
    result = run_bench(load_bundle(path), backends=["onnxruntime"], iterations=10, batch=2, warmup=1)
    assert [r.batch for r in result.rows if r.name == "backbone-only (onnxruntime)"] == [1, 2]
    ratio = result.head_cost_ratio()
    assert ratio is not None and ratio > 0 and "whole engine / backbone only" in result.table()


def test_bench_refuses_bad_arguments(toy_path: Path) -> None:
    bundle = load_bundle(toy_path)
    with pytest.raises(ConfigError, match="unknown backend"):
        run_bench(bundle, backends=["openvino"], iterations=1)
    with pytest.raises(ConfigError, match="iterations"):
        run_bench(bundle, iterations=0)


def test_bench_times_preprocessing_on_the_frame_size_the_bundle_learned(tiny_bundle: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle trained on frames of one size refuses others: the bench times prepare() on that size
    by default, and an explicit other --frame is one line, not a traceback from inside the timing."""
    result = run_bench(load_bundle(tiny_bundle), backends=["onnxruntime"], iterations=2, batch=1, warmup=0)
    assert [r.name for r in result.rows if r.name.startswith("preprocess (prepare")] == [
        "preprocess (prepare 128x128 frame)"]
    capsys.readouterr()
    assert main(["bench", "--bundle", str(tiny_bundle), "--backend", "onnxruntime", "--frame", "1280x1024",
                 "--iterations", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "only the 128x128 frames it was trained on" in err[0], err


def test_cli_bench_json(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--bundle", str(toy_path), "--backend", "onnxruntime", "--backend", "tensorrt",
               "--iterations", "5", "--warmup", "1", "--batch", "3", "--frame", "64x48", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert "preprocess (prepare 64x48 frame)" in [r["name"] for r in out["rows"]]
    assert {(r["name"], r["batch"]) for r in out["rows"] if not r["name"].startswith("preprocess")} == \
        {("onnxruntime", 1), ("onnxruntime", 3)}
    if trt_unavailable():
        assert set(out["skipped"]) == {"tensorrt"}
    assert out["input_shape"] == [32, 32, 1]


def test_bench_at_a_line_rate_paces_its_calls(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--rate: batch-1 calls started at the line's rate, in a row of their own beside the back-to-back ones."""
    start = time.monotonic()
    rc = main(["bench", "--bundle", str(toy_path), "--backend", "onnxruntime", "--iterations", "10",
               "--warmup", "1", "--batch", "2", "--rate", "25", "--json"])
    took = time.monotonic() - start
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    rows = {(r["name"], r["batch"]): r for r in out["rows"]}
    assert {("onnxruntime", 1), ("onnxruntime", 2), (paced_row("onnxruntime", 25), 1)} <= set(rows)
    assert rows[(paced_row("onnxruntime", 25), 1)]["iterations"] == 10
    assert took >= 9 / 25  # ten calls started 40 ms apart
    assert main(["bench", "--bundle", str(toy_path), "--rate", "0"]) == 2
    assert "rate (0.0) must be a positive number" in capsys.readouterr().err


def test_cli_bench_bad_iterations_exits_2(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--bundle", str(toy_path), "--iterations", "0"]) == 2
    assert "inspectd bench: error: --iterations" in capsys.readouterr().err
    assert main(["bench", "--bundle", str(toy_path), "--frame", "0x5"]) == 2
    assert "--frame '0x5' is not WIDTHxHEIGHT" in capsys.readouterr().err


def test_cli_check_engine_passes_for_the_reference(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-engine", "--bundle", str(toy_path), "--backend", "onnxruntime", "--threshold", "5"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("PASS: backend onnxruntime")
    assert "golden/bad_00.png" in out and "NG" in out


def test_cli_check_engine_unavailable_backend(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = trt_unavailable()
    if reason is None:
        pytest.skip("TensorRT is usable here")
    assert main(["check-engine", "--bundle", str(toy_path), "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"inspectd check-engine: error: {reason}"


def test_cli_check_engine_bad_option_and_bad_bundle(toy_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-engine", "--bundle", str(toy_path), "--backend", "onnxruntime",
                 "--option", "warp=9"]) == 2
    assert "--option for backend onnxruntime" in capsys.readouterr().err
    assert main(["check-engine", "--bundle", str(toy_path), "--backend", "onnxruntime", "--option", "nokey"]) == 2
    capsys.readouterr()
    assert main(["check-engine", "--bundle", str(tmp_path / "nope"), "--backend", "onnxruntime"]) == 1
    assert "no bundle here" in capsys.readouterr().err


def test_cli_build_engine_without_tensorrt(toy_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = trt_unavailable()
    if reason is None:
        pytest.skip("TensorRT is usable here")
    assert main(["build-engine", "--bundle", str(toy_path), "--precision", "int8"]) == 1
    assert capsys.readouterr().err.strip() == f"inspectd build-engine: error: {reason}"
    assert not (toy_path / "engines").exists()  # nothing half-written


def test_benchmarks_latency_script_prints_markdown(toy_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("latency_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_json = tmp_path / "r.json"
    assert module.main(["--bundle", str(toy_path), "--backend", "onnxruntime", "--iterations", "5",
                        "--warmup", "1", "--batch", "2", "--no-backbone", "--json", str(out_json)]) == 0
    md = capsys.readouterr().out
    assert "| onnxruntime | 1 | 5 |" in md and "| onnxruntime | 2 | 5 |" in md
    assert "CPU target (engine <= 1.3x backbone, p50): not measured" in md
    assert json.loads(out_json.read_text())["bundle_id"] == load_bundle(toy_path).bundle_id
