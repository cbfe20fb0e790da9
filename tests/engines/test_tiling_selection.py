"""Non-square inputs, in-graph tiling and label-free selection (issue: detection quality)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inspectd.engines.methods.flow import FlowModel as AnomalyModel
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.backbone import EfficientNetFeatures
from inspectd.engines.validation import KINDS, make_validation_set, synthesize


def _model(**kw) -> AnomalyModel:
    torch.manual_seed(0)
    cfg = ModelConfig(taps=[4, 10], **kw)
    model = AnomalyModel(cfg, EfficientNetFeatures(cfg.backbone, cfg.taps)).eval()
    # Non-trivial flows (the last subnet conv starts at zero: every step would be the identity).
    with torch.no_grad():
        for flow in model.flows:
            for step in flow.steps:
                step.subnet.conv2.weight.normal_(0, 0.05)
        model.head.nll_std.fill_(1e-5)  # untrained backbone: tiny features; bring the map to O(1)
    return model


@pytest.mark.usefixtures("one_torch_thread")
def test_tiles_are_the_single_tile_model_run_per_tile_and_stitched() -> None:
    tiled = _model(image_height=64, image_width=96, tiles=(2, 2), tile_overlap=32, smoothing_sigma=0)
    single = _model(image_height=64, image_width=96, smoothing_sigma=0)
    single.load_state_dict(tiled.state_dict())
    c = tiled.config
    assert (c.input_height, c.input_width) == (96, 160)  # 64 + 32 stride, 96 + 64 stride
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 96, 160, 1), dtype=np.uint8))
    with torch.no_grad():
        _, amap = tiled(img)
        assert amap.shape == (1, 24, 40)
        # Tile (row 1, col 1) covers pixels [32:96, 64:160]; its map [8:24, 16:40]. Where no other tile
        # overlaps (map rows 16.., cols 24..), the stitched map is exactly that tile's own map.
        _, own = single(img[:, 32:96, 64:160])
        assert torch.allclose(amap[0, 16:, 24:], own[0, 8:, 8:], atol=1e-5)
        # Map rows 8..16 x cols 16..24 are covered by all four tiles: there the map is their mean.
        tiles = [single(img[:, y:y + 64, x:x + 96])[1][0] for y in (0, 32) for x in (0, 64)]
        offsets = [(0, 0), (0, 16), (8, 0), (8, 16)]
        mean = sum(t[8 - oy:16 - oy, 16 - ox:24 - ox] for t, (oy, ox) in zip(tiles, offsets)) / 4
        assert torch.allclose(amap[0, 8:16, 16:24], mean, atol=1e-5)
        assert not torch.allclose(tiles[0][8:16, 16:24], tiles[3][0:8, 0:8], atol=1e-3)  # tiles do differ


@pytest.mark.usefixtures("one_torch_thread")
def test_non_square_model_exports_and_scores(tmp_path: Path) -> None:
    from inspectd.engines.export import export_onnx
    import onnxruntime as ort

    model = _model(image_height=64, image_width=128, tiles=(1, 2), tile_overlap=32)
    export_onnx(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 255, (2, 64, 224, 1), dtype=np.uint8)
    score, amap = sess.run(None, {"images": x})
    with torch.no_grad():
        ts, tm = model(torch.from_numpy(x))
    assert score.shape == (2,) and amap.shape == (2, 16, 56)
    assert np.allclose(score, ts.numpy(), atol=1e-4) and np.allclose(amap, tm.numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_defects_change_the_image_locally(kind: str) -> None:
    rng = np.random.default_rng(3)
    img = (cv2.GaussianBlur(rng.normal(128, 30, (96, 128)).astype(np.float32), (0, 0), 2)
           .clip(0, 255).astype(np.uint8)[:, :, None])
    out = synthesize(img, kind, rng)
    changed = np.abs(out.astype(int) - img.astype(int)).max(axis=2) > 3
    assert out.shape == img.shape and out.dtype == np.uint8
    assert 0 < changed.mean() < 0.5, f"{kind}: {changed.mean():.3f} of the pixels changed"


def test_validation_set_is_made_only_from_the_given_images() -> None:
    good = [np.full((64, 64, 1), 100 + i, np.uint8) for i in range(3)]
    val = make_validation_set(good, seed=0, per_image=2)
    assert len(val.good) == 3 and len(val.bad) == 6 and set(val.kinds) <= set(KINDS)
    again = make_validation_set(good, seed=0, per_image=2)
    assert all(np.array_equal(a, b) for a, b in zip(val.bad, again.bad))  # deterministic


def test_tile_defect_lights_its_tile_and_selection_reads_only_the_training_folder(tmp_path: Path) -> None:
    """A real `inspectd train` with tiles and selection in a child process that records every file it
    opens: no image outside the training folder is read; a defect in one tile lights that tile."""
    from inspectd.engines.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_train=16, n_test_good=2, n_test_bad=2, size=96)
    out = tmp_path / "bundle"
    script = textwrap.dedent(f"""
        import json, sys
        opened = []
        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].lower().endswith(
                    (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
                opened.append(args[0])
        sys.addaudithook(hook)
        from inspectd.cli import main
        code = main(["train", "--good", {str(data.train_good)!r}, "--out", {str(out)!r}, "--image-size", "64",
                     "--tiles", "2x2", "--epochs", "3", "--views", "1", "--taps", "4,10"])
        print("OPENED " + json.dumps(opened))
        sys.exit(code)
    """)
    # One PyTorch thread in the child (as tests/deploy's children run): on a 2-core machine two threads
    # collapse as soon as anything else takes a core (tests/conftest.py one_torch_thread); the files
    # opened and the map do not depend on it.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    opened = json.loads(proc.stdout.split("OPENED ", 1)[1])
    train_dir = str(data.train_good.resolve())
    outside = [p for p in opened if not str(Path(p).resolve()).startswith((train_dir, str(out.parent.resolve())))]
    assert opened and not outside, outside
    assert not any(str(data.test_bad) in p or str(data.test_good) in p for p in opened)

    manifest = json.loads((out / "manifest.json").read_text())
    sel = manifest["training"]["config"]["selection"]
    assert sel["enabled"] and sel["chosen"]["reduction"] in ("mean", "topk", "max")
    assert {c["reduction"] for c in sel["candidates"]} == {"mean", "topk", "max"}
    # Where the map is drawn: chosen from the same held-out images, kept in the engine's config.
    shift = sel["map_shift"]["chosen"]["map_shift"]
    assert sel["map_shift"]["enabled"] and manifest["training"]["config"]["model"]["map_shift"] == shift
    assert manifest["input"]["height"] == 96 and manifest["input"]["width"] == 96  # 2 tiles of 64, 32 shared

    import onnxruntime as ort

    from inspectd.engines.preprocess import load_prepared
    from inspectd.engines.bundle import load_bundle

    bundle = load_bundle(out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    good = load_prepared(sorted(data.test_good.iterdir())[0], bundle.input_spec)
    bad = good.copy()
    cv2.circle(bad, (80, 80), 9, 255, -1)  # bright blob inside the bottom-right tile only (pixels 64..96)
    _, maps = sess.run(None, {"images": np.stack([good, bad])})
    diff = maps[1] - maps[0]
    y, x = np.unravel_index(np.argmax(diff), diff.shape)
    h, w = diff.shape
    assert y >= h // 2 and x >= w // 2, (y, x, diff.shape)
