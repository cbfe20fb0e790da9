"""Bad input to the runtime: wrong batch shape or dtype, and a bundle that verifies but whose
ONNX is garbage. Each must be one clear error naming what was expected / which bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inspectd.engines.bundle import MANIFEST, load_bundle
from inspectd.engines.preprocess import sha256_file
from inspectd.engines.runtime import InputShapeError, open_backend
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import BackendUnavailable, BundleError
from tests.engines.test_runtime_toybundle import make_toy_bundle


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bad") / "toy")


@pytest.mark.parametrize("batch, expected", [
    (np.zeros((1, 32, 32, 1), np.float32), "expected dtype uint8, got float32"),
    (np.zeros((32, 32, 1), np.uint8), "expected input N x 32 x 32 x 1 (NHWC), got 32 x 32 x 1"),
    (np.zeros((1, 32, 32, 3), np.uint8), "expected input N x 32 x 32 x 1 (NHWC), got 1 x 32 x 32 x 3"),
    (np.zeros((1, 1, 32, 32), np.uint8), "expected input N x 32 x 32 x 1 (NHWC), got 1 x 1 x 32 x 32"),
    (np.zeros((0, 32, 32, 1), np.uint8), "got 0 x 32 x 32 x 1"),
    ([[0]], "expected a numpy uint8 array, got list"),
])
def test_wrong_batch_names_expected_and_got(toy_path: Path, batch: object, expected: str) -> None:
    with OnnxRuntimeBackend(load_bundle(toy_path)) as backend:
        with pytest.raises(InputShapeError) as err:
            backend.infer(batch)  # type: ignore[arg-type]
        assert expected in str(err.value) and "\n" not in str(err.value)
        # The backend is still usable after refusing a bad batch: nothing lost.
        scores, maps = backend.infer(np.full((2, 32, 32, 1), 128, np.uint8))
        assert scores.shape == (2,) and maps.shape == (2, 8, 8)


def _garbage_onnx_bundle(src: Path, dst: Path) -> Path:
    """A copy of a bundle with model.onnx replaced by garbage and the manifest hashes
    re-written, i.e. a bundle that passes verification but whose model cannot load."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "model.onnx").write_bytes(b"this is not an onnx model\x00\x01" * 10)
    digest = sha256_file(dst / "model.onnx")
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["model"]["sha256"] = digest
    manifest["files"]["model.onnx"] = digest
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_garbage_onnx_is_a_bundle_error_naming_the_bundle(toy_path: Path, tmp_path: Path) -> None:
    path = _garbage_onnx_bundle(toy_path, tmp_path / "garbage-bundle")
    bundle = load_bundle(path)  # verification passes: the hashes match the garbage
    with pytest.raises(BundleError) as err:
        OnnxRuntimeBackend(bundle)
    msg = str(err.value)
    assert str(path) in msg and "model.onnx" in msg and "\n" not in msg


def test_garbage_onnx_through_the_factory_names_bundle_and_reason(toy_path: Path, tmp_path: Path) -> None:
    bundle = load_bundle(_garbage_onnx_bundle(toy_path, tmp_path / "garbage-bundle"))
    with pytest.raises(BackendUnavailable) as err:
        open_backend(bundle, preference=["tensorrt", "onnxruntime"])
    msg = str(err.value)
    assert f"no backend could serve bundle {bundle.bundle_id}" in msg
    assert "onnxruntime: " in msg and "cannot load model.onnx" in msg and "tensorrt: " in msg
