"""TensorRT backend. TensorRT and pycuda cannot be installed here: the tests marked as such
exercise the backend's shape and profile logic WITHOUT TensorRT; the ones that need a GPU
skip with the printed reason. The factory test runs for real: on this machine
open_backend(["tensorrt", "onnxruntime"]) must serve with onnxruntime and say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime import open_backend
from inspectd.engines.runtime.tensorrt_backend import (check_profile, chunks, resolve_shape,
                                                        unavailable_reason)
from inspectd.errors import BackendUnavailable, InspectdError
from tests.engines.test_runtime_toybundle import make_toy_bundle


def test_unavailable_reason_names_the_missing_library() -> None:
    reason = unavailable_reason()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason is not None and reason.startswith("TensorRT not installed")
        return
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        assert reason is not None and reason.startswith("pycuda not installed")


def test_factory_skips_tensorrt_with_reason_and_serves_onnxruntime(tmp_path: Path) -> None:
    if unavailable_reason() is None:
        pytest.skip("TensorRT is usable on this machine: the fallback path is not what would run")
    bundle = load_bundle(make_toy_bundle(tmp_path / "b"))
    told: list[tuple[str, str]] = []
    backend, info = open_backend(bundle, preference=["tensorrt", "onnxruntime"],
                                 on_fallback=lambda name, why: told.append((name, why)))
    try:
        assert info.backend == "onnxruntime" and backend.name == "onnxruntime"
        assert set(info.skipped) == {"tensorrt"}
        assert info.skipped["tensorrt"] == unavailable_reason()
        assert info.as_dict()["skipped"]["tensorrt"].startswith(("TensorRT not installed", "pycuda not installed",
                                                                "no CUDA device"))
        assert told == [("tensorrt", info.skipped["tensorrt"])]
        scores, maps = backend.infer(np.full((1, 32, 32, 1), 128, np.uint8))
        assert scores.shape == (1,) and maps.shape == (1, 8, 8)
    finally:
        backend.close()


def test_only_tensorrt_requested_is_a_clear_error(tmp_path: Path) -> None:
    if unavailable_reason() is None:
        pytest.skip("TensorRT is usable on this machine")
    bundle = load_bundle(make_toy_bundle(tmp_path / "b"))
    with pytest.raises(BackendUnavailable, match=r"no backend could serve bundle .*tensorrt: "):
        open_backend(bundle, preference=["tensorrt"])


# --- shape / profile logic, without TensorRT -------------------------------------------------

def test_chunks_cover_the_batch_in_profile_sized_pieces() -> None:
    """Without TensorRT: a batch larger than the engine's max batch is split, nothing lost."""
    assert chunks(1, 8) == [(0, 1)]
    assert chunks(8, 8) == [(0, 8)]
    assert chunks(19, 8) == [(0, 8), (8, 16), (16, 19)]
    covered = [i for a, b in chunks(37, 5) for i in range(a, b)]
    assert covered == list(range(37))
    with pytest.raises(ValueError):
        chunks(3, 0)


def test_resolve_shape_sets_only_the_batch() -> None:
    """Without TensorRT: engine shapes report the dynamic batch as -1."""
    assert resolve_shape((-1, 64, 64), 8) == (8, 64, 64)
    assert resolve_shape((-1,), 4) == (4,)
    assert resolve_shape((2, 64, 64), 8) == (2, 64, 64)
    with pytest.raises(InspectdError, match="dynamic dimensions beyond the batch"):
        resolve_shape((-1, -1, 64), 8)


def test_check_profile_accepts_the_bundle_input_and_refuses_others() -> None:
    """Without TensorRT: the (min, opt, max) profile read from an engine must fit the bundle."""
    spec = (256, 256, 1)
    assert check_profile("images", [(1, 256, 256, 1), (1, 256, 256, 1), (8, 256, 256, 1)], spec) == 8
    with pytest.raises(BackendUnavailable, match=r"does not match the bundle input N x 256 x 256 x 1"):
        check_profile("images", [(1, 224, 224, 3), (1, 224, 224, 3), (8, 224, 224, 3)], spec)
    with pytest.raises(BackendUnavailable, match="batch >= 4"):
        check_profile("images", [(4, 256, 256, 1), (4, 256, 256, 1), (8, 256, 256, 1)], spec)


# --- real TensorRT (skipped here) --------------------------------------------------------------

def test_tensorrt_engine_matches_reference(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT backend unavailable: {reason}")
    from inspectd.engines.runtime.parity import parity_gate
    from inspectd.engines.runtime.tensorrt_backend import TensorRTBackend, build_engine

    bundle = load_bundle(make_toy_bundle(tmp_path / "b"))
    build_engine(bundle, precision="fp32", max_batch=4)  # the backend only loads; it never builds
    with TensorRTBackend(bundle, precision="fp32", max_batch=4) as backend:
        parity_gate(backend, bundle, threshold=3.0)
        scores, maps = backend.infer(np.full((6, 32, 32, 1), 128, np.uint8))  # > max batch: split
        assert scores.shape == (6,) and maps.shape == (6, 8, 8)
