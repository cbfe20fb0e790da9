"""The flow models the top principal components of its features (ModelConfig.components): the
projection is fitted on the training positions, travels in the graph (ONNX Runtime = PyTorch),
and old bundles (components 0) keep their per-channel path."""

from __future__ import annotations

import pytest
import torch

from inspectd.engines.methods.flow import FlowModel, fit_statistics
from inspectd.engines.backbone import EfficientNetFeatures
from inspectd.engines.model_config import ModelConfig


def _model(components: int) -> FlowModel:
    config = ModelConfig(image_height=64, image_width=64, taps=[4], components=components, steps=2)
    return FlowModel(config, EfficientNetFeatures(config.backbone, config.taps))  # 40 channels at tap 4


def test_projection_keeps_the_largest_variance_directions_and_standardises_them() -> None:
    g = torch.Generator().manual_seed(0)
    # 40-channel "embeddings" whose variance lives in 3 known directions, plus small noise.
    directions = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]           # orthonormal columns
    amplitude = torch.randn(64, 3, 2, 2, generator=g) * torch.tensor([9.0, 5.0, 3.0]).view(1, 3, 1, 1)
    cache = torch.einsum("ck,nkhw->nchw", directions, amplitude) + 0.01 * torch.randn(64, 40, 2, 2, generator=g)
    cache = cache + 4.0  # an offset the centre must remove
    model = _model(3)
    fit_statistics(model, [cache.half()], 64)
    basis = model.basis0.reshape(3, 40)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-4, rtol=0)   # orthonormal rows
    # Largest first, and spanning the directions the data varies in (up to sign).
    overlap = (basis @ directions).abs()
    assert torch.all(overlap.diagonal() > 0.99), overlap
    f = model.flow_input(0, cache)
    assert f.shape == (64, 3, 2, 2)
    torch.testing.assert_close(f.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-2, rtol=0)
    torch.testing.assert_close(f.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)


def test_components_above_the_channel_count_keep_every_channel_and_zero_adds_no_buffers() -> None:
    assert _model(1000).flows[0].steps[0].c1 + _model(1000).flows[0].steps[0].c2 == 40
    assert _model(1000).basis0.shape == (40, 40, 1, 1)
    old = _model(0)
    assert not any(name.startswith(("basis", "centre")) for name in old.state_dict())
    x = torch.randn(2, 40, 2, 2)
    assert torch.equal(old.project(0, x), x)


@pytest.mark.parametrize("components", [-1, 1])
def test_bad_component_counts_are_refused(components: int) -> None:
    with pytest.raises(ValueError, match=f"components {components}"):
        ModelConfig(components=components).check()


@pytest.mark.parametrize("flag, value", [("--components", "1"), ("--members", "9")])
def test_cli_refuses_a_bad_flow_design_in_one_line(capsys, tmp_path, synthetic_parts, flag: str, value: str) -> None:
    from inspectd.cli import main

    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{flag[2:]} {value}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_bundles_from_before_the_projection_load_without_it() -> None:
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).components == 0
    assert ModelConfig.from_dict(ModelConfig().to_dict()).components == ModelConfig().components > 0
