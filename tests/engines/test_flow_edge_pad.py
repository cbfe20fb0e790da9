"""ModelConfig.edge_pad: the flow's input is mirrored below and right of the frame before the backbone,
so one more row and column of feature cells look at the frame's last rows and columns (a stride-2
layer centres its output j on input pixel 2j: without it, no stride-32 cell looks at the frame's
last ~30 px). The map the engine returns is still the frame's, and its image score counts every cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspectd.engines.backbone import load_backbone
from inspectd.engines.methods.flow import FlowModel
from inspectd.engines.model_config import ModelConfig

SIZE = 128


def _model(edge_pad: int) -> FlowModel:
    mc = ModelConfig(image_height=SIZE, image_width=SIZE, taps=[4, 10, 15], components=32, steps=2, members=1,
                     edge_pad=edge_pad, reduction="max")
    return FlowModel(mc, load_backbone(mc.backbone, mc.taps)).eval()


def _corner_shares(model: FlowModel, cell: int) -> tuple[float, float]:
    """How much of what fused cell (cell, cell) sees comes from the frame's top-left and its bottom-right
    16 x 16 px corner: their shares of |d cell / d frame pixel|."""
    frame = (torch.rand(4, SIZE, SIZE, 1, generator=torch.Generator().manual_seed(0)) * 255).requires_grad_(True)
    features = model.embed(model.features(frame))[0][:, :, cell, cell]  # the engine's own input path
    (g,) = torch.autograd.grad(features.abs().sum(), frame)
    w = g.abs().sum(dim=(0, 3))
    return float(w[:16, :16].sum() / w.sum()), float(w[-16:, -16:].sum() / w.sum())


@pytest.mark.usefixtures("one_torch_thread")
def test_with_edge_pad_a_cell_looks_at_the_frames_last_rows_and_columns() -> None:
    torch.manual_seed(0)
    plain, padded = _model(0), _model(32)
    assert plain.grids == [(4, 4)] and padded.grids == [(5, 5)]
    # Without the pad the first cell draws on the top-left corner, but no cell on the bottom-right one.
    first_top_left = _corner_shares(plain, 0)[0]
    assert first_top_left > 0.08
    assert max(_corner_shares(plain, i)[1] for i in range(4)) < 0.02
    # With it, the last cell draws on the bottom-right corner as the first does on the top-left.
    assert _corner_shares(padded, 4)[1] > 0.08
    assert abs(_corner_shares(padded, 0)[0] - first_top_left) < 0.05


@pytest.mark.usefixtures("one_torch_thread")
def test_the_padded_engine_returns_the_frames_map_and_exports_with_the_same_scores(tmp_path) -> None:
    import onnxruntime as ort

    from inspectd.engines.bundle import INPUT_NAME
    from inspectd.engines.export import export_onnx

    torch.manual_seed(0)
    model = _model(32)
    model.config.map_shift = model.head.shift = (-3, -2)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 1), dtype=np.uint8))
    with torch.no_grad():
        score, amap = model(frames)
    assert amap.shape == (2, SIZE // 4, SIZE // 4)
    export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    s, m = session.run(None, {INPUT_NAME: frames.numpy()})
    np.testing.assert_allclose(s, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m, amap.numpy(), rtol=1e-4, atol=1e-4)


def test_edge_pad_is_checked_and_old_configs_load_without_it() -> None:
    ModelConfig(edge_pad=32).check()
    with pytest.raises(ValueError, match="edge_pad 16"):
        ModelConfig(edge_pad=16).check()
    with pytest.raises(ValueError, match="untiled"):
        ModelConfig(edge_pad=32, tiles=(2, 2)).check()
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).edge_pad == 0
    assert ModelConfig.from_dict(ModelConfig(edge_pad=32).to_dict()).edge_pad == 32


def test_the_train_cli_refuses_a_bad_edge_pad_in_one_line(tmp_path, capsys) -> None:
    from inspectd.cli import main

    good = tmp_path / "good"
    good.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--good", str(good), "--out", str(tmp_path / "b"), "--edge-pad", "16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--edge-pad" in err and "16" in err


@pytest.mark.usefixtures("one_torch_thread")
def test_selection_scores_each_reduction_as_the_engines_head_does() -> None:
    """Label-free selection compares reductions on the image score the engine will give: for an unpadded
    engine that is the reduction of the map it draws (before any shift), for a padded one it also
    counts the padded row and column of cells, which the drawn map leaves out."""
    from inspectd.engines.fitting import reduce_maps
    from inspectd.engines.methods.flow import _validation_scores

    torch.manual_seed(0)
    for pad in (0, 32):
        model = _model(pad)
        for p in model.flows.parameters():
            p.data.normal_(0, 0.05)  # a flow that is not the identity
        cache = [torch.randn(6, 40 + 112 + 320, *model.grids[0])]
        model.head.reduction = "mean"
        scores = _validation_scores(model, cache, 1, ["topk", "max"], torch.device("cpu"))
        assert model.head.reduction == "mean"  # the engine's own reduction is left as it was
        with torch.no_grad():
            drawn = model.head(model.nll_maps(cache))[1].flatten(1)
            for red, got in scores.items():
                model.head.reduction = red
                np.testing.assert_allclose(got, model.head(model.nll_maps(cache))[0].numpy(), rtol=1e-6)
                if pad == 0:
                    np.testing.assert_allclose(got, reduce_maps(drawn, red, model.head.topk), rtol=1e-6)
                elif red == "max":  # the padded cells count: the score is at least the drawn map's peak
                    assert np.all(got >= drawn.max(dim=1).values.numpy() - 1e-6)
