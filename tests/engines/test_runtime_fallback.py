"""open_backend's fallback when a backend's own start-up fails with its library's error (not ours):
CUDA out of memory while another process holds the GPU, a failed graph capture, a device that does
not exist. The GPU backend here is a FAKE (no GPU can exist on this machine), registered under its
own name; the fallback is the real ONNX Runtime backend on the real toy bundle."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from inspectd.engines import runtime
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.base import Backend
from tests.engines.test_runtime_toybundle import make_toy_bundle


class FakeGpuBackend(Backend):
    """FAKE: a GPU backend whose start-up fails the way torch / pycuda do, with their own errors."""
    name = "fakegpu"

    def __init__(self, bundle, **_options) -> None:
        super().__init__(bundle)
        raise RuntimeError("CUDA error: out of memory (FAKE GPU)")

    def infer(self, batch):  # never reached: start-up fails
        raise AssertionError("unreachable")


def test_a_backend_failing_with_its_librarys_own_error_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_gpu_backend")
    module.unavailable_reason = lambda: None
    module.FakeGpuBackend = FakeGpuBackend
    monkeypatch.setitem(sys.modules, "fake_gpu_backend", module)
    monkeypatch.setitem(runtime.BACKENDS, "fakegpu", ("fake_gpu_backend", "FakeGpuBackend"))
    bundle = load_bundle(make_toy_bundle(tmp_path / "toy"))
    skipped: list[tuple[str, str]] = []
    backend, info = runtime.open_backend(bundle, ["fakegpu", "onnxruntime"],
                                         on_fallback=lambda name, why: skipped.append((name, why)))
    try:
        assert info.backend == "onnxruntime"
        assert skipped and skipped[0][0] == "fakegpu" and "out of memory" in skipped[0][1], skipped
    finally:
        backend.close()


def test_a_backend_option_of_the_wrong_type_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd check-engine --option threads=abc`: exit 2 naming the option, not a ValueError traceback."""
    from inspectd.cli import main

    bundle = make_toy_bundle(tmp_path / "toy")
    for value in ("abc", "4x", "-1"):
        code = main(["check-engine", "--bundle", str(bundle), "--backend", "onnxruntime", "--option", f"threads={value}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "intra_op_threads" in err[-1] and "Traceback" not in "\n".join(err), (value, err[-3:])
