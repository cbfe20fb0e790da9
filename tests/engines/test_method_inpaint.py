"""Method "inpaint" (paper 004): trains on generated parts and separates bad from good, ONNX Runtime
matches PyTorch, the dynamic loop is an ONNX Loop whose pass count responds, SSIM and fuzzy masks
behave, grey / rgb / tiled inputs export, bad options are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from inspectd.cli import main
from inspectd.engines.bundle import load_bundle
from inspectd.engines.methods.inpaint import (InpaintModel, InpaintOptions, apply_fuzzy, cell_weight,
                                              export_engine, export_fixed_iterations, fuzzy_cell_masks, ssim_map,
                                              ssim_kernel)
from inspectd.engines.model import build_from_bundle
from inspectd.engines.model_config import ModelConfig
from tests.helpers import (assert_bad_option_refused, assert_onnx_matches_torch, assert_onnx_separates,
                           ort_session, prepared_images)


@pytest.fixture(scope="module")
def bundle_path(tiny_method_bundles) -> Path:
    """The session's tiny inpaint bundle (tests/conftest.py: 10 epochs at 64 px, shared with the
    daemon and tools tests)."""
    return tiny_method_bundles("inpaint")


@pytest.fixture(scope="module")
def test_images(bundle_path: Path, synthetic_parts) -> tuple[np.ndarray, np.ndarray]:
    return (prepared_images(bundle_path, synthetic_parts.test_good),
            prepared_images(bundle_path, synthetic_parts.test_bad))


def test_trained_engine_separates_bad_from_good(bundle_path: Path, test_images) -> None:
    assert_onnx_separates(bundle_path, *test_images)
    m = load_bundle(bundle_path).manifest
    assert m.method.name == "inpaint" and m.method.options["size"] == 64
    assert m.method.details["threshold_m"] > 0 and m.backbone is None


@pytest.mark.usefixtures("one_torch_thread")
def test_onnx_runtime_matches_torch_and_batches_are_independent(bundle_path: Path, test_images) -> None:
    assert_onnx_matches_torch(bundle_path, np.concatenate(test_images))


@pytest.mark.usefixtures("one_torch_thread")
def test_dynamic_loop_is_in_the_graph_and_its_pass_count_responds(bundle_path: Path, test_images,
                                                                   tmp_path: Path) -> None:
    graph = onnx.load(str(bundle_path / "model.onnx")).graph
    loops = [n for n in graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    body = next(a.g for a in loops[0].attribute if a.name == "body")
    cond = body.output[0].name  # the early-exit condition is computed in the body, not a constant
    assert any(cond in n.output and n.op_type != "Constant" for n in body.node)

    model = build_from_bundle(load_bundle(bundle_path))
    good = torch.from_numpy(test_images[0])
    passes, converged = model.iterations(good)
    assert float(passes.mean()) < model.dyn.max_iterations and bool(converged.any())
    assert bool(((passes < model.dyn.max_iterations) == converged).all())
    model.threshold.fill_(-1.0)  # never agrees: every image runs the full count
    passes, converged = model.iterations(good)
    assert bool((passes == model.dyn.max_iterations).all()) and not bool(converged.any())

    export_fixed_iterations(model, tmp_path / "fixed2.onnx", 2)  # the benchmark's fixed-count engines
    model.dyn.max_iterations = 2
    with torch.no_grad():
        want = model(good[:2])[0].numpy()
    got = ort_session(tmp_path / "fixed2.onnx").run(["score"], {"images": test_images[0][:2]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_ssim_is_one_on_identical_images_and_falls_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 48, 48, generator=g) * 0.5 + 0.25
    k = ssim_kernel()
    for exps in (None, (0.3, 0.6, 2.1), (0.2, 0.5, 2.3)):
        assert torch.allclose(ssim_map(x, x, k, exps), torch.ones_like(x), atol=1e-4)
        values = [float(ssim_map(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), k, exps).mean())
                  for s in (0.02, 0.1, 0.3)]
        assert 1 > values[0] > values[1] > values[2], (exps, values)


def test_fuzzy_masks_are_complementary_within_a_pair() -> None:
    masks = fuzzy_cell_masks(7, 16, torch.Generator().manual_seed(1))
    assert masks.shape == (7, 16, 16)
    for i in (0, 2, 4):
        assert bool((masks[i] ^ masks[i + 1]).all())
    assert 0.3 < float(masks[6].float().mean()) < 0.7
    w = cell_weight(64, 16)  # 4-px cells: half the original kept at the centre, little at the border
    assert float(w.max()) <= 0.5 and float(w[0, 0, 0, 0]) < float(w[0, 0, 1, 1])
    x = torch.rand(2, 1, 64, 64)
    noise = torch.rand(2, 1, 64, 64)
    out = apply_fuzzy(x, masks[:2, None].float(), cell_weight(64, 16), noise)
    keep = torch.nn.functional.interpolate(masks[:2, None].float(), size=(64, 64)) == 0
    assert torch.equal(out[keep], x[keep]) and not torch.equal(out[~keep], x[~keep])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("color_mode, tiles", [("rgb", (1, 1)), ("gray", (2, 1))])
def test_rgb_and_tiled_engines_export(color_mode: str, tiles: tuple[int, int], tmp_path: Path) -> None:
    mc = ModelConfig(image_height=64, image_width=64, color_mode=color_mode, tiles=tiles, tile_overlap=32)
    torch.manual_seed(0)
    model = InpaintModel(mc, InpaintOptions(size=32, grid=8, max_iterations=3)).eval()
    model.threshold.fill_(1e-3)
    ch = 3 if color_mode == "rgb" else 1
    images = torch.randint(0, 256, (2, mc.input_height, mc.input_width, ch), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = model(images)
    assert score.shape == (2,) and amap.shape == (2, mc.input_height // 4, mc.input_width // 4)
    export_engine(model, tmp_path / "m.onnx")
    s, m = ort_session(tmp_path / "m.onnx").run(None, {"images": images.numpy()})
    np.testing.assert_allclose(s, score.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(m, amap.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("option, message", [
    ("grid=0", "option grid=0"),
    ("ssim_class=IV", "option ssim-class='IV': choose I, II or III"),
    ("size=40", "option size=40"),
    ("max_iterations=0", "option max-iterations=0"),
])
def test_bad_options_are_config_errors(option: str, message: str, synthetic_parts, tmp_path: Path) -> None:
    assert_bad_option_refused("inpaint", option, message, synthetic_parts.train_good, tmp_path / "b")


def test_cli_bad_option_exits_with_one_line(capsys, synthetic_parts, tmp_path: Path) -> None:
    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                 "--method", "inpaint", "--option", "grid=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err and "option grid=0" in err[-1], err
    assert not (tmp_path / "b").exists()
