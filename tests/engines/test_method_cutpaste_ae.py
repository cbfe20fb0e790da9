"""Method cutpaste-ae (CutPaste classifier + autoencoder) end to end on generated parts: it separates
good from bad, ONNX matches PyTorch, the manifest records the method, the score rule switches on a
loaded model, tiles and rgb work, and bad options are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspectd.engines.bundle import load_bundle
from inspectd.engines.methods.cutpaste_ae import RATIOS, combination_weights, ledoit_wolf
from inspectd.engines.model import ModelConfig
from inspectd.engines.preprocess import list_images, load_prepared
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import ConfigError

torch = pytest.importorskip("torch")

# Small but real: 36 training tiles, 40 passes for the classifier and the autoencoder (~10 s on 2 cores).
OPTIONS = {"epochs": 40, "classifier_epochs": 40}


def _cfg(**model: object):
    from inspectd.engines.train import TrainConfig

    mc = {"image_height": 128, "image_width": 128, "taps": [4, 10], **model}
    return TrainConfig(model=ModelConfig(**mc), method="cutpaste-ae", options=dict(OPTIONS), select=False)


@pytest.fixture(scope="module")
def cpae_bundle(tiny_method_bundles) -> Path:
    """The session's tiny cutpaste-ae bundle (tests/conftest.py, the same options as OPTIONS below),
    shared with the daemon and tools tests."""
    return tiny_method_bundles("cutpaste-ae")


def _batch(bundle, folder: Path, n: int | None = None) -> np.ndarray:
    return np.stack([load_prepared(p, bundle.input_spec) for p in list_images(folder)[:n]])


def test_separates_good_from_bad(cpae_bundle, synthetic_parts, tmp_path):
    from inspectd.engines.evaluate import evaluate

    report = evaluate(cpae_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, tmp_path / "eval",
                      masks_dir=synthetic_parts.masks)
    # 12 good vs 12 bad generated parts: measured 0.875 image / 0.93 pixel AUROC at seed 0.
    assert report["image_auroc"] >= 0.8, report
    assert report["pixel_auroc"] >= 0.8, report


def test_onnx_runtime_matches_pytorch(cpae_bundle, synthetic_parts):
    from inspectd.engines.model import build_from_bundle

    bundle = load_bundle(cpae_bundle)
    batch = np.concatenate([_batch(bundle, synthetic_parts.test_good, 4), _batch(bundle, synthetic_parts.test_bad, 4)])
    model = build_from_bundle(bundle)
    with torch.no_grad():
        t_scores, t_maps = (x.numpy() for x in model(torch.from_numpy(batch)))
    with OnnxRuntimeBackend(bundle) as backend:
        o_scores, o_maps = backend.infer(batch)
    # Stated tolerance: 1e-4 relative (and absolute) on scores, 1e-3 absolute on maps (float32, other kernels).
    np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_maps, t_maps, atol=1e-3)
    assert o_maps.shape == (8, *bundle.map_shape)


def test_manifest_records_method_and_components(cpae_bundle):
    m = load_bundle(cpae_bundle).manifest
    assert m.method.name == "cutpaste-ae"
    assert m.method.options["epochs"] == 40 and m.method.options["classifier_epochs"] == 40
    assert m.method.options["score"] == "combined"
    assert m.training.config["options"] == m.method.options
    details = m.method.details
    assert m.score.reduction == details["score_rule"] and "+" in details["score_rule"]
    std = details["standardisation"]
    assert std["score_std"]["cutpaste"] > 0 and std["score_std"]["ae"] > 0
    for key in ("cutpaste_auroc", "ae_auroc", "combined_auroc", "unweighted_sum_auroc"):
        assert 0.0 <= details["validation"][key] <= 1.0
    # The combined rule's weights: the ratio of RATIOS that validation ranks first (default combine),
    # and the weighted sum validates at least as well as the plain one.
    assert m.method.options["combine"] == "validation"
    w = details["combination_weights"]
    assert sum(w.values()) == pytest.approx(2, abs=1e-3)
    assert min(RATIOS, key=lambda r: abs(r - w["ae"] / w["cutpaste"])) == pytest.approx(w["ae"] / w["cutpaste"], rel=1e-3)
    assert details["validation"]["combined_auroc"] >= details["validation"]["unweighted_sum_auroc"] - 1e-4
    assert m.backbone.name == "efficientnet-lite0" and m.backbone.taps == [4, 10]


def test_combination_weights_follow_validation() -> None:
    """The ratio whose weighted sum separates the validation set best; both sources always count."""
    rng = np.random.default_rng(0)
    n = 50
    label = np.r_[np.zeros(n), np.ones(n)]
    strong, weak = rng.normal(size=2 * n) + 2.0 * label, rng.normal(size=2 * n) + 0.3 * label
    w = combination_weights({"cutpaste": strong, "ae": weak}, n, "validation")
    assert sum(w.values()) == pytest.approx(2) and w["ae"] < w["cutpaste"] and w["ae"] > 0
    w2 = combination_weights({"cutpaste": weak, "ae": strong}, n, "validation")
    assert w2["ae"] > w2["cutpaste"] > 0
    # a source that points the wrong way gets the smallest weight the grid allows
    w3 = combination_weights({"cutpaste": strong, "ae": np.r_[np.ones(n), np.zeros(n)]}, n, "validation")
    assert w3["ae"] / w3["cutpaste"] == pytest.approx(RATIOS[0])
    assert combination_weights({"cutpaste": strong, "ae": weak}, n, "equal") == {"cutpaste": 1.0, "ae": 1.0}


@pytest.mark.usefixtures("one_torch_thread")
def test_autoencoder_does_not_depend_on_the_cutpaste_heads_options(tmp_path, synthetic_parts) -> None:
    """The autoencoder trains on streams of its own: a different projection width and classifier
    epoch count leave its weights identical (and the CutPaste head's are not)."""
    from inspectd.engines.train import TrainConfig, train

    weights = {}
    for name, opts in (("a", {"embed-dim": "16", "classifier-epochs": "1"}),
                       ("b", {"embed-dim": "32", "classifier-epochs": "2"})):
        out = tmp_path / name
        train(synthetic_parts.train_good, out, TrainConfig(
            model=ModelConfig(image_height=64, image_width=64, taps=[4, 10]), method="cutpaste-ae",
            options={"epochs": "1", **opts}, seed=0, select=False))
        weights[name] = dict(np.load(out / "weights.npz"))
    ae = [k for k in weights["a"] if k.startswith("autoencoder.")]
    assert ae and all(np.array_equal(weights["a"][k], weights["b"][k]) for k in ae)
    assert weights["a"]["projection.0.weight"].shape != weights["b"]["projection.0.weight"].shape


def test_ledoit_wolf_matches_its_definition() -> None:
    """The O(n d) shrinkage estimate equals Ledoit & Wolf's per-sample sum written out."""
    import torch

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 5.0)
    mean, cov = ledoit_wolf(x)
    xc = (x - x.mean(0)).double()
    n, d = xc.shape
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    delta = ((s - mu * torch.eye(d, dtype=s.dtype)) ** 2).sum() / d
    beta = sum(((xc[i, :, None] * xc[i, None, :] - s) ** 2).sum() / d for i in range(n)) / n ** 2
    shrink = float(min(beta, delta) / delta)
    assert 0.0 < shrink < 1.0
    want = (1 - shrink) * s + shrink * mu * torch.eye(d, dtype=s.dtype)
    np.testing.assert_allclose(cov.numpy(), want.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mean.numpy(), x.mean(0).numpy(), rtol=1e-12)


@pytest.mark.usefixtures("one_torch_thread")
def test_score_rule_switches_on_a_loaded_model(cpae_bundle, synthetic_parts):
    from inspectd.engines.model import build_from_bundle

    bundle = load_bundle(cpae_bundle)
    batch = torch.from_numpy(_batch(bundle, synthetic_parts.test_bad, 4))
    model = build_from_bundle(bundle)
    out = {}
    with torch.no_grad():
        for rule in ("cutpaste", "ae", "combined"):
            model.score_rule = rule
            out[rule] = model(batch)
    assert all(bool(torch.isfinite(s).all() and torch.isfinite(m).all()) for s, m in out.values())
    # combined = z_cutpaste + z_ae; its map is the mean of the two standardised maps
    torch.testing.assert_close(out["combined"][0], out["cutpaste"][0] + out["ae"][0])
    torch.testing.assert_close(out["combined"][1], 0.5 * (out["cutpaste"][1] + out["ae"][1]))


@pytest.mark.usefixtures("one_torch_thread")
def test_tiles_and_rgb(synthetic_parts, tmp_path):
    from inspectd.engines.model import build_from_bundle
    from inspectd.engines.train import train

    cfg = _cfg(image_height=64, image_width=64, tiles=(2, 2), tile_overlap=32, color_mode="rgb")
    cfg.options = {"epochs": 1, "classifier_epochs": 1}
    train(synthetic_parts.train_good, tmp_path / "b", cfg)  # train() itself gates ONNX vs PyTorch (1e-3)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.input.channels == 3 and bundle.manifest.input.height == 96
    batch = _batch(bundle, synthetic_parts.test_bad, 3)
    with OnnxRuntimeBackend(bundle) as backend:
        o_scores, o_maps = backend.infer(batch)
    with torch.no_grad():
        t_scores, t_maps = (x.numpy() for x in build_from_bundle(bundle)(torch.from_numpy(batch)))
    np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-4)
    assert o_maps.shape == (3, 24, 24) and np.isfinite(o_maps).all()


@pytest.mark.parametrize("options, words", [
    ({"bogus": 1}, ["'bogus'", "not an option of method cutpaste-ae"]),
    ({"epochs": "many"}, ["epochs", "expected int"]),
    ({"embed_dim": 2.5}, ["embed_dim", "expected int"]),
    ({"epochs": 0}, ["epochs", "1..1000"]),
    ({"score": "best"}, ["score", "combined, cutpaste, ae"]),
    ({"combine": "max"}, ["combine", "validation, equal"]),
    ({"ae_scale": 3}, ["ae-scale", "choose 1, 2 or 4"]),
    ({"ae_per_position": "maybe"}, ["ae_per_position", "expected bool"]),
])
def test_bad_options_are_one_line_errors(synthetic_parts, tmp_path, options, words):
    from inspectd.engines.train import train

    cfg = _cfg()
    cfg.options = options
    with pytest.raises(ConfigError) as info:
        train(synthetic_parts.train_good, tmp_path / "b", cfg)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "b").exists()


def test_cli_bad_option(capsys, synthetic_parts, tmp_path):
    from inspectd.cli import main

    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                 "--method", "cutpaste-ae", "--option", "bogus=1", "--image-size", "64", "--taps", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and "bogus" in err[0], err
    assert not (tmp_path / "b").exists()
