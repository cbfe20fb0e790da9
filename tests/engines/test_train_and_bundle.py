"""Engine core end to end on generated parts: training separates good from bad, ONNX matches
PyTorch, bundles round-trip and refuse tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inspectd.stats import roc_auc
from inspectd.engines.bundle import load_bundle
from inspectd.engines.preprocess import list_images, load_prepared
from inspectd.engines.runtime.base import InputShapeError
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import BundleError


def _scores(backend: OnnxRuntimeBackend, folder: Path) -> np.ndarray:
    spec = backend.bundle.input_spec
    batch = np.stack([load_prepared(p, spec) for p in list_images(folder)])
    return backend.infer(batch)[0]


def test_trained_bundle_separates_good_from_bad(tiny_bundle, synthetic_parts):
    bundle = load_bundle(tiny_bundle)
    with OnnxRuntimeBackend(bundle) as backend:
        good = _scores(backend, synthetic_parts.test_good)
        bad = _scores(backend, synthetic_parts.test_bad)
    auc = roc_auc(good, bad)
    assert auc >= 0.9, f"image AUROC {auc:.3f} on generated parts (good {good}, bad {bad})"
    # Normalised scores of unseen good parts do not sit above the held-out statistics (no false
    # rejects from the normalisation; below them is possible: they come from only 4 held-out
    # images), and bad parts sit far above the good ones.
    good_median, bad_median = float(np.median(bundle.normalize(good))), float(np.median(bundle.normalize(bad)))
    assert good_median < 1.0
    assert bad_median > good_median + 3.0


def test_onnx_runtime_matches_pytorch(tiny_bundle, synthetic_parts):
    torch = pytest.importorskip("torch")
    from inspectd.engines.model import build_from_bundle

    bundle = load_bundle(tiny_bundle)
    spec = bundle.input_spec
    batch = np.stack([load_prepared(p, spec) for p in
                      list_images(synthetic_parts.test_good)[:4] + list_images(synthetic_parts.test_bad)[:4]])
    model = build_from_bundle(bundle)
    with torch.no_grad():
        t_scores, t_maps = (x.numpy() for x in model(torch.from_numpy(batch)))
    with OnnxRuntimeBackend(bundle) as backend:
        o_scores, o_maps = backend.infer(batch)
    # Stated tolerance: 1e-4 relative on scores, 1e-3 absolute on maps (float32, different kernels).
    np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_maps, t_maps, atol=1e-3)
    assert o_maps.shape == (8, *bundle.map_shape)


def test_manifest_describes_the_bundle(tiny_bundle, synthetic_parts):
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.input.color_mode == "gray" and m.input.channels == 1 and m.input.height == 128
    assert m.backbone.name == "efficientnet-lite0" and m.backbone.taps == [4, 10]
    assert m.flow.steps == 4
    assert m.training.n_train + m.training.n_holdout == 40
    assert len(m.training.image_sha256) == m.training.n_train
    assert not set(m.training.image_names) & set(m.training.holdout_names)
    assert len(m.golden.good) == 4 and len(m.golden.bad) == 4
    assert m.score.good_std > 0 and m.map.display_hi > m.map.display_lo
    # The stored golden scores are what ONNX Runtime gives on the stored golden images today.
    good_paths, bad_paths = bundle.golden_images()
    with OnnxRuntimeBackend(bundle) as backend:
        now = backend.infer(np.stack([load_prepared(p, bundle.input_spec) for p in good_paths]))[0]
    np.testing.assert_allclose(now, m.golden.good_scores, rtol=1e-5)
    # No pickle anywhere in the bundle: every file is JSON, ONNX, PNG or a plain npz.
    suffixes = {p.suffix for p in tiny_bundle.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".onnx", ".png", ".npz"}


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_flipped_byte_in_model_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256"):
        load_bundle(bundle_copy)


def test_truncated_model_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="tampered or truncated"):
        load_bundle(bundle_copy)


def test_missing_golden_file_is_refused(bundle_copy):
    (bundle_copy / "golden" / "good" / "000.png").unlink()
    with pytest.raises(BundleError, match="golden/good/000.png is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda m: m.update(surprise=1), "field surprise: Extra inputs are not permitted"),
    (lambda m: m["input"].update(height=-1), "field input.height"),
    (lambda m: m["files"].update({"../outside.txt": "0" * 64}), "outside the bundle"),
])
def test_bad_manifest_is_refused_with_the_field(bundle_copy, mutate, message):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)


def test_wrong_input_shape_and_dtype_are_named(tiny_bundle):
    with OnnxRuntimeBackend(load_bundle(tiny_bundle)) as backend:
        with pytest.raises(InputShapeError, match=r"expected input N x 128 x 128 x 1 \(NHWC\), got 1 x 64 x 64 x 1"):
            backend.infer(np.zeros((1, 64, 64, 1), np.uint8))
        with pytest.raises(InputShapeError, match="expected dtype uint8, got float32"):
            backend.infer(np.zeros((1, 128, 128, 1), np.float32))


def test_a_bundle_records_the_one_frame_size_it_learned_and_none_from_a_dataset_of_sizes(tmp_path, tiny_bundle,
                                                                                         synthetic_parts):
    """Frames all of one size (a camera's) are recorded, and frames of another size refused by the one
    preprocessing path; a folder of several sizes (a dataset such as MTD) records none and accepts any."""
    import cv2

    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.preprocess import prepare
    from inspectd.engines.train import TrainConfig, train
    from inspectd.errors import DataError

    spec = load_bundle(tiny_bundle).input_spec
    assert spec.frame_size == (128, 128)
    with pytest.raises(DataError, match=r"^frame of 96x128 px, but the bundle was trained on 128x128 frames"):
        prepare(np.zeros((128, 96), np.uint8), spec)
    assert prepare(np.zeros((128, 128), np.uint8), spec).shape == (128, 128, 1)
    mixed = tmp_path / "mixed"
    shutil.copytree(synthetic_parts.train_good, mixed)
    for p in list_images(mixed)[::2]:
        cv2.imwrite(str(p), cv2.resize(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), (150, 120)))
    cfg = TrainConfig(model=ModelConfig(image_height=64, image_width=64, taps=[4, 10], steps=2), epochs=1, seed=0,
                      select=False)
    with one_thread():
        train(mixed, tmp_path / "bundle", cfg)
    varied = load_bundle(tmp_path / "bundle").input_spec
    assert varied.frame_size is None
    assert prepare(np.zeros((128, 96), np.uint8), varied).shape == (64, 64, 1)
