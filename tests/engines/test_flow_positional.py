"""Position channels (ModelConfig.positional): the flow's density is conditioned on where a cell
sits, so a feature that is normal somewhere on a fixtured part but out of place where it appears is
an anomaly. Real flows trained on cached features (the product's _fit_candidate on a cache shaped
like the backbone's), with the ImageNet backbone loaded as in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspectd.engines.methods.flow import _fit_candidate
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.train import TrainConfig
from inspectd.stats import roc_auc

GRID = 4          # 128 px input at fused stride 32
CHANNELS = 152    # Lite0 taps 4 + 10: 40 + 112


def _features(means: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.tensor(means + 0.1 * rng.normal(size=(n, *means.shape[1:])), dtype=torch.float32)


def _auroc(positional: int) -> float:
    """Held-out good feature maps (each cell near its own mean) vs maps whose cells are rotated
    round the grid: every anomalous cell holds a feature that is normal at another cell. 1x1 subnets,
    so the flow has no neighbouring cells to infer a position from: only the position channels."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # the flow's initial weights: the same whatever ran before in the session
    means = rng.normal(0.0, 1.0, (1, CHANNELS, GRID, GRID))
    train, good, moved = _features(means, 64, rng), _features(means, 32, rng), _features(means, 32, rng)
    cells = moved.reshape(32, CHANNELS, GRID * GRID)
    moved = torch.stack([c[:, torch.roll(torch.arange(GRID * GRID), 1 + i % (GRID * GRID - 1))]
                         for i, c in enumerate(cells)]).reshape(good.shape)
    mc = ModelConfig(image_height=128, image_width=128, taps=[4, 10], components=16, steps=2,
                     kernel_size=1, positional=positional, reduction="max")
    cfg = TrainConfig(model=mc, epochs=15, select=False, batch_size=8)
    model, _ = _fit_candidate(cfg, [train], [np.zeros((128, 128), np.uint8)] * 64, torch.device("cpu"))
    with torch.no_grad():
        scores = [model.head(model.nll_maps([x]))[0].numpy() for x in (good, moved)]
    return float(roc_auc(scores[0], scores[1]))


@pytest.mark.usefixtures("one_torch_thread")
def test_position_channels_find_a_feature_out_of_place_and_none_cannot() -> None:
    with_position, without = _auroc(16), _auroc(0)
    # 0.935-0.995 over torch seeds 0-5 (measured): well above what the same flow without them reaches
    assert with_position >= 0.9, with_position
    assert without <= 0.75, without   # the same features, pooled over positions, look normal


@pytest.mark.parametrize("value", ["-4", "6"])
def test_cli_refuses_a_bad_positional_count_in_one_line(capsys, tmp_path, synthetic_parts, value: str) -> None:
    from inspectd.cli import main

    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                 "--positional", value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"positional {value}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_bundles_from_before_position_channels_load_without_them() -> None:
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).positional == 0
    assert ModelConfig.from_dict(ModelConfig(positional=8).to_dict()).positional == 8


@pytest.mark.usefixtures("one_torch_thread")
def test_a_bundle_with_position_channels_records_them_and_onnx_runtime_matches_torch(tmp_path, synthetic_parts) -> None:
    """Trained from the command line as a user would; the position channels are constants in the graph."""
    from inspectd.cli import main
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.model import build_from_bundle
    from inspectd.engines.preprocess import list_images, load_prepared
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    out = tmp_path / "b"
    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(out), "--image-size", "128",
                 "--taps", "4,10", "--steps", "2", "--epochs", "2", "--no-select", "--positional", "8"])
    assert code == 0
    bundle = load_bundle(out)
    assert bundle.manifest.training.config["model"]["positional"] == 8
    batch = np.stack([load_prepared(p, bundle.input_spec)
                      for p in list_images(synthetic_parts.test_good)[:2] + list_images(synthetic_parts.test_bad)[:2]])
    model = build_from_bundle(bundle)
    with torch.no_grad():
        t_scores, t_maps = (x.numpy() for x in model(torch.from_numpy(batch)))
    with OnnxRuntimeBackend(bundle) as backend:
        o_scores, o_maps = backend.infer(batch)
    np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-4)   # the tolerance of the other methods' tests
    np.testing.assert_allclose(o_maps, t_maps, atol=1e-3)
