"""Where the anomaly map is drawn: shift_map moves a map by whole map pixels (borders replicated),
MapHead draws its stitched map at ModelConfig.map_shift, and `inspectd train`'s label-free choice
(fitting.select_map_shift) finds the shift that undoes a known misplacement of an engine's map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.fitting import select_map_shift
from inspectd.engines.model import MapHead, place_maps, shift_map
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.train import TrainConfig


def test_shift_map_moves_content_and_replicates_borders() -> None:
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 3, 4] = 1.0
    m[0, 0, 0, :] = 0.5                     # top row: replicated when the map moves down
    out = shift_map(m, (2, -1))             # 2 down, 1 left
    assert out.shape == m.shape
    assert out[0, 0, 5, 3] == 1.0 and out.sum() > 0
    assert torch.all(out[0, 0, :3, :] == 0.5)  # rows 0..2 repeat the old top row
    assert torch.equal(shift_map(m, (0, 0)), m)
    back = shift_map(out, (-2, 1))
    assert back[0, 0, 3, 4] == 1.0


def test_map_head_draws_the_stitched_map_at_the_configured_shift() -> None:
    base = ModelConfig(image_height=64, image_width=64, smoothing_sigma=0.0, reduction="max")
    maps = [torch.rand(2, 4, 4)]            # a 4x4 source grid, upsampled to the 16x16 map
    _, plain = MapHead(base, 1)(maps)
    _, moved = MapHead(ModelConfig(**{**base.to_dict(), "tiles": (1, 1), "map_shift": (3, -2)}), 1)(maps)
    torch.testing.assert_close(moved, shift_map(plain[:, None], (3, -2))[:, 0])


def test_map_shift_is_checked_and_old_configs_load_unshifted() -> None:
    with pytest.raises(ValueError, match="map_shift"):
        ModelConfig(map_shift=(9, 0)).check()        # 36 input px at map stride 4: over 32
    ModelConfig(map_shift=(-8, 8)).check()
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).map_shift == (0, 0)
    assert ModelConfig.from_dict(ModelConfig(map_shift=(1, -2)).to_dict()).map_shift == (1, -2)


class MisplacedTemplateEngine(nn.Module):
    """Test double of an engine (real computation, not a trained model): |image - mean good image|,
    pooled to the map grid, then drawn `misplaced` map pixels off, before a real MapHead. A feature
    engine whose cells look elsewhere than their blocks behaves like this."""

    def __init__(self, config: ModelConfig, good: list[np.ndarray], misplaced: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.misplaced = misplaced
        self.register_buffer("template", torch.from_numpy(np.mean(good, axis=0)).permute(2, 0, 1)[None].float())
        self.head = MapHead(config, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()
        cells = F.avg_pool2d((x - self.template).abs().mean(1, keepdim=True), self.config.map_stride)
        return self.head([shift_map(cells, self.misplaced)[:, 0]])


@pytest.mark.usefixtures("one_torch_thread")
def test_selection_undoes_a_known_misplacement() -> None:
    rng = np.random.default_rng(0)  # plain parts: the template engine sees every defect clearly
    held_out = [np.clip(128 + rng.normal(0, 3, (128, 128, 1)), 0, 255).astype(np.uint8) for _ in range(8)]
    chosen = {}
    for misplaced in ((0, 0), (3, 2)):
        config = ModelConfig(image_height=128, image_width=128, smoothing_sigma=1.0)
        engine = MisplacedTemplateEngine(config, held_out, misplaced).eval()
        record = select_map_shift(engine, TrainConfig(model=config, seed=0), held_out, torch.device("cpu"))
        chosen[misplaced] = tuple(record["chosen"]["map_shift"])
        assert config.map_shift == chosen[misplaced] and engine.head.shift == chosen[misplaced]
        unshifted = record["candidates"][0]
        assert unshifted["shift"] == [0, 0] and record["chosen"]["pixel_auroc"] >= unshifted["pixel_auroc"]
        assert record["chosen"]["input_px"] == [4 * v for v in chosen[misplaced]]
        # Every candidate stays within the largest shift allowed (32 input px = 8 map px here).
        assert all(max(abs(v) for v in row["shift"]) <= 8 for row in record["candidates"])
    # 16 synthetic defects leave the aligned engine's optimum within a map pixel of no shift; the
    # misplaced engine's choice moves by exactly the misplacement, undoing it.
    assert all(abs(v) <= 1 for v in chosen[(0, 0)]), chosen
    assert (chosen[(3, 2)][0] - chosen[(0, 0)][0], chosen[(3, 2)][1] - chosen[(0, 0)][1]) == (-3, -2), chosen


class TwoSourceEngine(nn.Module):
    """Test double with two map heads, as cutpaste-ae has (cutpaste_head / ae_head): the same
    template difference drawn `first` and `second` map pixels off, combined as that method does."""

    def __init__(self, config: ModelConfig, good: list[np.ndarray], first: tuple[int, int],
                 second: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.a = MisplacedTemplateEngine(config, good, first)
        self.b = MisplacedTemplateEngine(config, good, second)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (sa, ma), (sb, mb) = self.a(images), self.b(images)
        return sa + sb, 0.5 * (ma + mb)


@pytest.mark.usefixtures("one_torch_thread")
def test_each_map_head_gets_its_own_shift_and_bundles_rebuild_with_them() -> None:
    rng = np.random.default_rng(0)
    held_out = [np.clip(128 + rng.normal(0, 3, (128, 128, 1)), 0, 255).astype(np.uint8) for _ in range(8)]
    config = ModelConfig(image_height=128, image_width=128, smoothing_sigma=1.0)
    engine = TwoSourceEngine(config, held_out, (0, 0), (3, 2)).eval()
    record = select_map_shift(engine, TrainConfig(model=config, seed=0), held_out, torch.device("cpu"))
    chosen = {name: tuple(r["chosen"]["map_shift"]) for name, r in record["heads"].items()}
    assert set(chosen) == {"a.head", "b.head"}
    # One shared shift could undo at most one of the two misplacements; per head, both are undone.
    assert (chosen["b.head"][0] - chosen["a.head"][0], chosen["b.head"][1] - chosen["a.head"][1]) == (-3, -2), chosen
    assert engine.a.head.shift == chosen["a.head"] and engine.b.head.shift == chosen["b.head"]
    assert config.head_shifts == chosen and config.map_shift == (0, 0)
    # The manifest's config round-trips, and place_maps (build_from_bundle) draws each head there.
    saved = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert saved.head_shifts == chosen and saved.shift_of("a.head") == chosen["a.head"]
    rebuilt = TwoSourceEngine(saved, held_out, (0, 0), (3, 2)).eval()
    place_maps(rebuilt, saved)
    frames = torch.from_numpy(np.stack(held_out[:2]))
    torch.testing.assert_close(rebuilt(frames)[1], engine(frames)[1])


def test_head_shifts_are_checked() -> None:
    with pytest.raises(ValueError, match="head_shifts.ae_head"):
        ModelConfig(head_shifts={"ae_head": (0, 9)}).check()
    assert ModelConfig(map_shift=(1, 1), head_shifts={"ae_head": (0, -2)}).shift_of("cutpaste_head") == (1, 1)


@pytest.mark.parametrize("reduction", ["max", "topk", "mean"])
def test_a_defect_at_the_frame_edge_keeps_its_score_wherever_the_map_is_drawn(reduction: str) -> None:
    """Shifting the map up / left moves the first rows and columns of cells partly out of the frame;
    the image score is taken before that, so a defect seen only by those cells keeps its whole score."""
    base = ModelConfig(image_height=64, image_width=64, smoothing_sigma=1.0, reduction=reduction)
    source = torch.zeros(1, 4, 4)
    source[0, 0, 0] = 10.0                  # a defect only the top-left cell sees
    scores = {shift: MapHead(ModelConfig(**{**base.to_dict(), "tiles": (1, 1), "map_shift": shift}), 1)([source])[0]
              for shift in ((0, 0), (-3, -2), (3, 2))}
    torch.testing.assert_close(scores[(-3, -2)], scores[(0, 0)])
    torch.testing.assert_close(scores[(3, 2)], scores[(0, 0)])


def test_bundles_written_before_score_their_shifted_map_as_their_graphs_do() -> None:
    """A manifest without score_before_shift is an older bundle: its model.onnx scores the shifted map,
    so the engine rebuilt from its weights (torch backend, parity gate) must too."""
    old = ModelConfig.from_dict({"image_height": 64, "image_width": 64, "map_shift": [-3, -2],
                                 "smoothing_sigma": 1.0, "reduction": "max"})
    assert old.score_before_shift is False and ModelConfig().score_before_shift is True
    assert ModelConfig.from_dict(ModelConfig().to_dict()).score_before_shift is True
    source = torch.zeros(1, 4, 4)
    source[0, 0, 0] = 10.0
    score, amap = MapHead(old, 1)([source])
    torch.testing.assert_close(score, amap.flatten(1).max(dim=1).values)  # the cropped map's maximum
    new = ModelConfig.from_dict({**old.to_dict(), "score_before_shift": True})
    assert score.item() < MapHead(new, 1)([source])[0].item()


def test_the_exported_engine_scores_a_corner_defect_as_it_does_unshifted(tiny_bundle, tmp_path) -> None:
    """Real bundle, real export, real ONNX Runtime: a dark spot in the frame's top-left corner scores the
    same whether the bundle's map is drawn where it was trained or shifted up and left."""
    import onnxruntime as ort

    from inspectd.engines.bundle import INPUT_NAME, load_bundle
    from inspectd.engines.export import export_onnx
    from inspectd.engines.model import build_from_bundle
    from inspectd.engines.preprocess import load_prepared

    bundle = load_bundle(tiny_bundle)
    frame = load_prepared(bundle.golden_images()[0][0], bundle.input_spec)  # a held-out good part
    spot = frame.copy()
    spot[2:14, 2:14] = 0
    scores = {}
    for shift in ((0, 0), (-4, -4)):
        model = build_from_bundle(bundle)
        model.config.map_shift = shift
        place_maps(model, model.config)
        path = tmp_path / f"shift{shift[0]}.onnx"
        export_onnx(model, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        scores[shift] = [float(session.run(None, {INPUT_NAME: x[None]})[0][0]) for x in (frame, spot)]
    assert scores[(0, 0)][1] > scores[(0, 0)][0]   # the spot is seen
    assert scores[(-4, -4)][1] == pytest.approx(scores[(0, 0)][1], rel=1e-4)
