"""A small but real bundle for the runtime tests: a hand-written ONNX graph (uint8 NHWC ->
cast -> 4x4 average pool -> squared deviation from mid-grey = anomaly map; score = map max),
golden good/bad PNGs, written with the real `write_bundle` and verified by `load_bundle`.

It lets the runtime tests (parity gate, fallback, bench, bad input) run without the trained
`tiny_bundle` fixture and in well under a second; tests of the real model use `tiny_bundle`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inspectd.engines.bundle import load_bundle, staging_dir, write_bundle
from inspectd.engines.preprocess import sha256_file
from inspectd.errors import BundleError

TOY_SIZE = 32
TOY_POOL = 4


def toy_onnx(size: int = TOY_SIZE, pool: int = TOY_POOL, width: int | None = None) -> bytes:
    """score = max over pool x pool cells of (mean grey / 255 - 0.5)^2; input size x width (default square)."""
    h, w = size, width or size
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("ReduceMean", ["pooled"], ["gray"], axes=[1], keepdims=0),
        helper.make_node("Div", ["gray", "c255"], ["unit"]),
        helper.make_node("Sub", ["unit", "chalf"], ["dev"]),
        helper.make_node("Mul", ["dev", "dev"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", h, w, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", h // pool, w // pool])],
        initializer=[helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
                     helper.make_tensor("chalf", TensorProto.FLOAT, [], [0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def toy_images(n_good: int = 3, n_bad: int = 2, size: int = TOY_SIZE, seed: int = 0) -> tuple[list, list]:
    """Good: mid-grey with mild noise (score ~0); bad: a bright square (score near 0.25)."""
    rng = np.random.default_rng(seed)
    good = [np.clip(128 + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8) for _ in range(n_good)]
    bad = []
    for i in range(n_bad):
        img = np.clip(128 + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)
        img[4 + i:16 + i, 8:20] = 250
        bad.append(img)
    return good, bad


def make_toy_bundle(out: Path, n_good: int = 3, n_bad: int = 2, onnx_bytes: bytes | None = None,
                    force: bool = False) -> Path:
    """Write a verified toy bundle at `out`; good_mean/good_std come from its own good images."""
    import onnxruntime as ort

    staging = staging_dir(out)
    (staging / "model.onnx").write_bytes(onnx_bytes or toy_onnx())
    (staging / "golden").mkdir()
    good, bad = toy_images(n_good, n_bad)
    names_good, names_bad = [], []
    for kind, images, names in (("good", good, names_good), ("bad", bad, names_bad)):
        for i, img in enumerate(images):
            rel = f"golden/{kind}_{i:02d}.png"
            cv2.imwrite(str(staging / rel), img)
            names.append(rel)
    sess = ort.InferenceSession(str(staging / "model.onnx"), providers=["CPUExecutionProvider"])

    def raw(images: list) -> list[float]:
        return [float(s) for s in sess.run(["score"], {"images": np.stack(images)[..., None]})[0]]

    good_scores, bad_scores = raw(good), raw(bad)
    mean, std = float(np.mean(good_scores)), max(float(np.std(good_scores)), 1e-3)
    fields = {
        "schema_version": 1, "inspectd_version": "test", "created_utc": "2026-01-01T00:00:00Z",
        "model": {"sha256": sha256_file(staging / "model.onnx"), "opset": 17},
        "backbone": {"name": "toy-avgpool", "taps": [], "tap_channels": [], "tap_strides": [], "weights": "none"},
        "flow": {"steps": 0, "hidden_ratio": 0.0, "kernel_size": 1, "clamp": 1.0, "fusion": "separate",
                 "score_term": "z2"},
        "input": {"height": TOY_SIZE, "width": TOY_SIZE, "color_mode": "gray", "channels": 1,
                  "resize": "cv2.INTER_AREA"},
        "map": {"height": TOY_SIZE // TOY_POOL, "width": TOY_SIZE // TOY_POOL, "smoothing_sigma": 0.0,
                "display_lo": 0.0, "display_hi": 0.25},
        "score": {"reduction": "max", "good_mean": mean, "good_std": std, "good_quantiles": {"0.99": max(good_scores)},
                  "n_good": len(good_scores), "source": "toy"},
        "training": {"fingerprint": "0" * 64, "image_names": [], "image_sha256": [], "holdout_names": [],
                     "n_train": 0, "n_holdout": 0, "skipped": 0,
                     "config": {}, "final_loss": 0.0, "seconds": 0.0, "device": "cpu"},
        "golden": {"good": names_good, "bad": names_bad, "good_scores": good_scores, "bad_scores": bad_scores},
        "calibration_images": names_good,
    }
    write_bundle(staging, out, fields, force=force)
    return out


def test_toy_bundle_loads_and_separates_good_from_bad(tmp_path: Path) -> None:
    bundle = load_bundle(make_toy_bundle(tmp_path / "toy"))
    assert bundle.input_spec.shape == (TOY_SIZE, TOY_SIZE, 1)
    g = bundle.manifest.golden
    assert len(g.good) == 3 and len(g.bad) == 2
    # The bad images must be far outside the good distribution, or the parity tests prove nothing.
    assert min(bundle.normalize(s) for s in g.bad_scores) > 10 * max(abs(bundle.normalize(s)) for s in g.good_scores)


def test_a_model_changed_on_disk_after_loading_is_never_opened(tmp_path: Path) -> None:
    """The bundle folder is overwritten in place while the daemon runs (`train --force` to the same
    path, an rsync). A later open of the engine (a failover, a retry) must not score the new weights
    under the old manifest's normalisation, threshold and bundle id: it is refused, with the reason."""
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    bundle = load_bundle(make_toy_bundle(tmp_path / "toy"))
    OnnxRuntimeBackend(bundle).close()  # opens as loaded
    model = onnx.load_from_string(bundle.model_path.read_bytes())
    model.doc_string = "retrained"
    bundle.model_path.write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="model.onnx changed"):
        OnnxRuntimeBackend(bundle)


def test_replacing_a_bundle_never_leaves_its_path_without_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --force` onto the bundle a line runs: the new bundle takes the old one's place in one
    step (renameat2 RENAME_EXCHANGE), so a daemon's preflight or a crash in between never finds the
    path empty. Shown by failing every rename INTO the path: before, that was the second of two
    renames, and the path was left without a bundle (only a hidden .NAME.old-PID folder)."""
    import errno
    import os

    from inspectd.engines import bundle as bundle_mod

    out = make_toy_bundle(tmp_path / "toy")
    first = load_bundle(out).bundle_id
    real = os.replace

    def no_rename_into_out(src: object, dst: object) -> None:
        if Path(dst) == out:
            raise OSError(errno.EIO, "simulated crash before the new bundle was renamed into place", str(dst))
        real(src, dst)

    monkeypatch.setattr(bundle_mod.os, "replace", no_rename_into_out)
    model = onnx.load_from_string(toy_onnx())
    model.doc_string = "retrained"
    make_toy_bundle(out, onnx_bytes=model.SerializeToString(), force=True)
    assert load_bundle(out).bundle_id != first
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no old copy or staging folder left beside it
