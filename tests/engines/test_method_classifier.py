"""Method classifier (paper 001): the session's tiny classifier bundle (tests/conftest.py: the
synthetic parts' good images and 12 defects of another seed), judged on a separately generated set
(a third seed: parts and defects never seen); the exported graph agrees with PyTorch; its map is the
class activation map, equal to autograd Grad-CAM; too few defects and bad options are one-line
refusals."""

from __future__ import annotations

import json

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from inspectd.cli import main
from inspectd.engines import methods
from inspectd.engines.backbone import load_backbone
from inspectd.engines.bundle import load_bundle
from inspectd.engines.methods.classifier import (GOOD, REAL, SYNTHESIZED, ClassifierModel, ClassifierOptions,
                                                 cam_resampler, defect_draw, paste, stage_starts, training_set)
from inspectd.engines.model import build_from_bundle
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.preprocess import list_images, load_prepared, sha256_file
from inspectd.engines.synthetic import make_dataset
from inspectd.stats import roc_auc

SIZE = 128  # tests/conftest.py's TINY_IMAGE_SIZE: the tiny bundles' input size


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory):
    """Good and defective parts of another seed (11): never trained on (the bundle's --bad set is
    other_defects, seed 21; its good images and golden defects are synthetic_parts, seed 0)."""
    return make_dataset(tmp_path_factory.mktemp("heldout"), n_train=0, n_test_good=12, n_test_bad=12,
                        size=SIZE, seed=11)


@pytest.fixture(scope="module")
def clf_bundle(tiny_method_bundles) -> Path:
    """The session's tiny classifier (tests/conftest.py: 4 epochs at 128 px, taps 4+10, --bad
    other_defects), shared with the eval, calibrate, tools and daemon tests: trained once."""
    return tiny_method_bundles("classifier")


def _images(bundle, folder: Path) -> np.ndarray:
    return np.stack([load_prepared(p, bundle.input_spec) for p in list_images(folder)])


def test_separates_held_out_defects_at_a_threshold_from_good_images(clf_bundle: Path, held_out) -> None:
    bundle = load_bundle(clf_bundle)
    m = bundle.manifest
    assert m.method.name == "classifier" and m.method.options["placement"] == "C"
    assert m.training.defects["n"] == 12 and len(m.training.defects["image_names"]) == 12
    assert m.training.defects["fingerprint"] and m.training.backgrounds is None
    assert m.method.details["training_set"]["real_defects"] == 12
    # held out for real: no held-out image (good or defective) is one the bundle learned from
    learned = set(m.training.image_sha256) | set(m.training.defects["image_sha256"])
    assert not learned & {sha256_file(p) for f in (held_out.test_good, held_out.test_bad) for p in list_images(f)}
    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    good = sess.run(["score"], {"images": _images(bundle, held_out.test_good)})[0]
    bad = sess.run(["score"], {"images": _images(bundle, held_out.test_bad)})[0]
    # The real threshold: the top of the held-out good scores of training (what calibrate starts from).
    threshold = m.score.good_quantiles["1.0"]
    recall, false_rejects = float(np.mean(bad > threshold)), int(np.sum(good > threshold))
    auroc = roc_auc(good, bad)
    assert auroc >= 0.85, (auroc, good, bad)
    assert recall >= 0.5 and false_rejects <= 1, (threshold, recall, false_rejects, good, bad)


@pytest.mark.usefixtures("one_torch_thread")
def test_onnx_runtime_matches_torch(clf_bundle: Path, held_out) -> None:
    """ONNX Runtime vs the torch backend (build_from_bundle): scores within 1e-3 (relative, log-odds at
    least 1), maps within 1e-3 of their largest magnitude."""
    bundle = load_bundle(clf_bundle)
    imgs = np.concatenate([_images(bundle, held_out.test_good)[:4], _images(bundle, held_out.test_bad)[:4]])
    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    o_score, o_map = sess.run(None, {"images": imgs})
    with torch.no_grad():
        t_score, t_map = (t.numpy() for t in build_from_bundle(bundle)(torch.from_numpy(imgs)))
    assert o_map.shape == t_map.shape == (8, SIZE // 4, SIZE // 4)
    assert np.max(np.abs(o_score - t_score)) <= 1e-3 * max(1.0, float(np.max(np.abs(t_score))))
    assert np.max(np.abs(o_map - t_map)) <= 1e-3 * max(1.0, float(np.max(np.abs(t_map))))


@pytest.mark.usefixtures("one_torch_thread")
def test_cam_stride_16_is_the_same_network_on_every_other_cell(tmp_path: Path, synthetic_parts) -> None:
    """cam-stride 16 (atrous last stage): before any training, its last feature maps on the even
    positions equal the stride-32 network's (ImageNet weights, same input); the bundle it trains
    draws a map from a CAM twice as fine and exports (ONNX Runtime = torch)."""
    mc = ModelConfig(image_height=96, image_width=128, taps=[4])
    coarse = ClassifierModel(mc, load_backbone(mc.backbone, [15]), ClassifierOptions()).eval()
    fine = ClassifierModel(mc, load_backbone(mc.backbone, [15]), ClassifierOptions(cam_stride=16)).eval()
    images = torch.randint(0, 256, (2, 96, 128, 1), dtype=torch.uint8)
    with torch.no_grad():
        a, b = coarse.late(coarse.early(images)), fine.late(fine.early(images))
    assert a.shape[-2:] == (3, 4) and b.shape[-2:] == (6, 8)
    assert torch.allclose(b[..., ::2, ::2], a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not torch.allclose(b[..., 1::2, 1::2], a, rtol=1e-2, atol=1e-2)  # the new cells are new
    with pytest.raises(ValueError, match="cam-stride"):
        methods.get("classifier").parse_options({"cam-stride": "8"})

    from inspectd.engines.train import TrainConfig, train

    out = tmp_path / "fine"
    # Placement A (no background pastes): 60 training images instead of 180 to extract features for
    # and fine-tune on; the pastes are not what this test is about (the atrous network, its map and
    # its export are).
    train(synthetic_parts.train_good, out, TrainConfig(
        model=ModelConfig(image_height=SIZE, image_width=SIZE, taps=[4, 10]), method="classifier",
        options={"epochs": "1", "cam-stride": "16", "placement": "A"}, bad=str(synthetic_parts.test_bad),
        seed=0, select=False))
    bundle = load_bundle(out)
    assert bundle.manifest.method.options["cam_stride"] == 16
    model = build_from_bundle(bundle).eval()
    assert model.map_rows.shape == (SIZE // 4, SIZE // 16)  # read from an 8 x 8 CAM at 128 px
    imgs = _images(bundle, synthetic_parts.test_bad)[:4]
    o_score, o_map = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": imgs})
    with torch.no_grad():
        t_score, t_map = (t.numpy() for t in model(torch.from_numpy(imgs)))
    assert np.max(np.abs(o_score - t_score)) <= 1e-3 * max(1.0, float(np.max(np.abs(t_score))))
    assert np.max(np.abs(o_map - t_map)) <= 1e-3 * max(1.0, float(np.max(np.abs(t_map))))


@pytest.mark.usefixtures("one_torch_thread")
def test_cam_equals_autograd_grad_cam_on_random_inputs() -> None:
    """GAP + one linear layer: Grad-CAM of the NG log-odds = ReLU(CAM - bias) / (h w), and the CAM's mean
    is the score the head computes."""
    torch.manual_seed(0)
    mc = ModelConfig(image_height=64, image_width=96, taps=[4])
    model = ClassifierModel(mc, load_backbone(mc.backbone, [15]), ClassifierOptions()).eval()  # ImageNet weights
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
        model.head.bias.normal_(0, 1.0)
    images = torch.randint(0, 256, (3, 64, 96, 1), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.late(model.early(images))
    feats = feats.clone().requires_grad_(True)
    logits = model.logits(feats)
    score = logits[:, 1] - logits[:, 0]
    (grads,) = torch.autograd.grad(score.sum(), feats)
    alpha = grads.mean(dim=(2, 3))                                   # Grad-CAM channel weights
    grad_cam = torch.relu((alpha[:, :, None, None] * feats).sum(1)).detach()
    with torch.no_grad():
        cam = model.cam(feats)
        bias = model.head.bias[1] - model.head.bias[0]
        h, w = feats.shape[-2:]
        assert (h, w) == (2, 3)
        assert torch.allclose(torch.relu(cam - bias) / (h * w), grad_cam, rtol=1e-5, atol=1e-6)
        assert grad_cam.abs().max() > 0.1  # not trivially zero
        assert torch.allclose(cam.mean(dim=(1, 2)), score.detach(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(model(images)[0], score.detach(), rtol=1e-4, atol=1e-4)
        # The map is the CAM resampled, unsmoothed: its maximum stays in the CAM's strongest cell.
        amap = model(images)[1]
        assert amap.shape == (3, 16, 24)
        assert torch.allclose(amap, model.cam_to_map(model.cam(feats)), rtol=1e-4, atol=1e-4)
        for k in range(3):
            r, c = divmod(int(amap[k].argmax()), 24)
            i, j = divmod(int(cam[k].argmax()), 3)
            assert (min(1, round((4 * r + 1.5) / 32)), min(2, round((4 * c + 1.5) / 32))) == (i, j)


@pytest.mark.usefixtures("one_torch_thread")
def test_map_is_drawn_where_each_cam_cell_looks() -> None:
    """CAM cell (i, j) of the ImageNet backbone looks at input pixel (32 i, 32 j) (padding k // 2 centres
    every stride-2 output on input pixel 2j): the centroid of |d cell / d input| near it lands there,
    not on the cell's block centre 32 i + 16; and the map puts a one-cell CAM's peak on that pixel."""
    torch.manual_seed(0)
    mc = ModelConfig(image_height=128, image_width=128, taps=[4])
    model = ClassifierModel(mc, load_backbone(mc.backbone, [15]), ClassifierOptions()).eval()
    x = (torch.randn(4, 3, 128, 128) * 0.5).requires_grad_(True)
    bb = model.backbone
    a = bb.act(bb._bn0(bb._conv_stem(x)))
    for block in bb._blocks:
        a = block(a)
    assert a.shape[-2:] == (4, 4)
    (g,) = torch.autograd.grad(a[:, :, 2, 2].abs().sum(), x)
    w = g.abs().sum(dim=(0, 1))
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    near = ((yy - 64).abs() <= 40) & ((xx - 64).abs() <= 40)  # a window centred on the expected pixel
    w = w * near
    cy, cx = float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())
    assert abs(cy - 64) <= 4 and abs(cx - 64) <= 4, (cy, cx)  # the block centre would be (80, 80)
    cam = torch.zeros(1, 4, 4)
    cam[0, 2, 1] = 1.0
    amap = model.cam_to_map(cam)[0]
    assert amap.shape == (32, 32)
    r, c = divmod(int(amap.argmax()), 32)
    assert r * 4 <= 64 < (r + 1) * 4 + 1 and c * 4 <= 32 < (c + 1) * 4 + 1, (r, c)
    rows = cam_resampler(128, 32, 4)
    assert torch.allclose(rows.sum(1), torch.ones(32))  # convex weights: a constant CAM stays constant
    assert rows[0, 0] > 0.9 and rows[-1, -1] == 1.0  # past the last cell's centre (pixel 96): clamped


def test_training_set_placements_and_paste_geometry() -> None:
    rng = np.random.default_rng(0)
    good = [np.full((32, 32, 1), 100, np.uint8) for _ in range(3)]
    bad = [np.full((32, 32, 1), 200, np.uint8) for _ in range(2)]
    bg = [np.zeros((32, 32, 1), np.uint8)]
    for placement, n in (("A", 3 + 4), ("B", 3 * (3 + 4)), ("C", 3 * (3 + 4))):
        opts = methods.get("classifier").parse_options({"placement": placement.lower(), "pastes": "2"})
        imgs, kinds = training_set(good, bad, bg, opts, rng)
        assert len(imgs) == n and (kinds == REAL).sum() == n * 4 // 7  # flips double the defects; balanced per copy
        assert (kinds == GOOD).sum() == n * 3 // 7 and not (kinds == SYNTHESIZED).any()
    # synthesized defects are flipped and pasted like the real ones and keep their own kind
    syn = [np.full((32, 32, 1), 150, np.uint8) for _ in range(5)]
    imgs, kinds = training_set(good, bad, bg, ClassifierOptions(placement="C", pastes=1), rng, syn)
    assert len(imgs) == 2 * (3 + 4 + 10) and (kinds == SYNTHESIZED).sum() == 2 * 10 and (kinds == REAL).sum() == 2 * 4
    assert all(imgs[i].max() == 150 for i in np.flatnonzero(kinds == SYNTHESIZED))
    opts = ClassifierOptions(part_scale=0.5)
    centred = paste(bad[0], bg[0], opts, rng, centred=True)
    assert (centred[8:24, 8:24] == 200).all() and centred.sum() == 200 * 16 * 16
    shifted = [np.argwhere(paste(bad[0], bg[0], opts, rng, centred=False)[..., 0])[0] for _ in range(8)]
    assert len({tuple(s) for s in shifted}) > 1  # C: offsets vary
    boxed = paste(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32, 1), bg[0],
                  ClassifierOptions(box="0,0,0.5,0.5", part_scale=1.0), rng, centred=True)
    assert (boxed[8:24, 8:24, 0] == np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)[:16, :16]).all()
    assert stage_starts("efficientnet-lite0") == [0, 1, 3, 5, 8, 11, 15]


def test_defect_draw_keeps_the_real_share_however_many_are_synthesized() -> None:
    real, syn = torch.arange(0, 10), torch.arange(10, 1010)  # 10 real, 1000 synthesized
    gen = torch.Generator().manual_seed(0)
    for share in (0.5, 0.25, 1.0):
        d = defect_draw(real, syn, 8000, share, gen)
        assert abs(float((d < 10).float().mean()) - share) < 0.02, share
        assert set(d[d < 10].tolist()) == set(range(10))  # every real defect is drawn
    assert defect_draw(real, syn[:0], 100, 0.5, gen).max() < 10  # none synthesized: all real


def _train(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["train", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_too_few_or_no_defects_are_one_line_refusals(capsys, tmp_path: Path, synthetic_parts) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for p in list_images(synthetic_parts.test_bad)[:3]:
        shutil.copy(p, few / p.name)
    base = ["--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"), "--method", "classifier",
            "--image-size", "64"]
    code, err = _train(capsys, *base, "--bad", str(few))
    assert code == 1 and len(err) == 1, err
    assert "3 readable defective images; method classifier needs at least 8" in err[0]
    code, err = _train(capsys, *base)
    assert code == 2 and len(err) == 1 and "give --bad FOLDER with at least 8" in err[0], err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("option, message", [
    ("placement=D", "option placement='D': choose A (none), B (centred) or C (every offset) for method classifier"),
    ("box=0.5,0,0.2,1", "option box='0.5,0,0.2,1': needs 0 <= x0 < x1 <= 1"),
    ("part-scale=0", "option part-scale=0.0: must be in [0.1, 1] for method classifier"),
    ("train-stages=9", "option train-stages=9: must be 1..6 for method classifier"),
    ("flip=maybe", "option flip='maybe': expected bool for method classifier"),
    ("real-share=0", "option real-share=0.0: must be in (0, 1] for method classifier"),
    ("cam-stride=8", "option cam-stride=8: choose 32 (the backbone's own) or 16 (last stride-2 block made atrous)"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path: Path, synthetic_parts, option: str, message: str) -> None:
    code, err = _train(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                       "--method", "classifier", "--bad", str(synthetic_parts.test_bad), "--option", option)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_good_only_methods_ignore_bad_and_backgrounds_with_one_warning(capsys, synthetic_parts) -> None:
    from inspectd.engines.preprocess import InputSpec
    from inspectd.engines.train import TrainConfig, _extra_folders

    cfg = TrainConfig(bad=str(synthetic_parts.test_bad), backgrounds=str(synthetic_parts.test_good))
    assert _extra_folders(methods.get("flow"), cfg, InputSpec(64, 64, "gray")) == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"inspectd train: method flow does not use --bad: ignoring {synthetic_parts.test_bad}",
                   f"inspectd train: method flow does not use --backgrounds: ignoring {synthetic_parts.test_good}"]
    extra = _extra_folders(methods.get("classifier"), cfg, InputSpec(64, 64, "gray"))
    assert len(extra["bad"][1]) == 12 and len(extra["backgrounds"][1]) == 12
    assert extra["bad"][1][0].shape == (64, 64, 1)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_synthesize_folder_keeps_its_real_and_synthesized_defects_apart(capsys, tmp_path: Path,
                                                                           synthetic_parts) -> None:
    """`inspectd synthesize --include-real` writes one --bad folder; training reads its manifest: the
    real copies count towards the minimum, the synthesized ones are drawn at the rest of the share."""
    from inspectd.engines.preprocess import InputSpec
    from inspectd.engines.train import TrainConfig, _extra_folders

    syn = tmp_path / "syn"
    assert main(["synthesize", "--good", str(synthetic_parts.train_good), "--bad", str(synthetic_parts.test_bad),
                 "--masks", str(synthetic_parts.masks), "--out", str(syn), "--count", "20", "--include-real"]) == 0
    extra = _extra_folders(methods.get("classifier"), TrainConfig(bad=str(syn)), InputSpec(64, 64, "gray"))
    assert [p.name for p in extra["bad"][0]] == sorted(f"real_{p.stem}.png" for p in list_images(synthetic_parts.test_bad))
    assert [p.name for p in extra["synthetic"][0]] == [f"syn_{i:05d}.png" for i in range(20)]
    code, err = _train(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "ok"),
                       "--method", "classifier", "--bad", str(syn), "--image-size", "64", "--option", "epochs=1")
    assert code == 0, err
    m = load_bundle(tmp_path / "ok").manifest
    # Synthesized defects built on the good images training held out are never trained on: they would
    # put those images' content in as NG while they set the score statistics as unseen good parts.
    made = json.loads((syn / "manifest.json").read_text())["items"]
    on_held_out = [i["image"] for i in made if i["good"] in set(m.training.holdout_names)]
    assert on_held_out, "no synthesized defect on a held-out image: the case is not exercised"
    assert f"{len(on_held_out)} of 20 synthesized defects were built on the good images held out" in " ".join(err)
    used = m.training.synthetic_defects["image_names"]
    assert m.training.defects["n"] == 12 and m.training.synthetic_defects["n"] == 20 - len(on_held_out)
    assert not set(used) & set(on_held_out)
    assert m.method.details["training_set"]["synthesized_defects"] == 20 - len(on_held_out)
    assert m.method.details["training_set"]["real_share"] == 0.5
    # 7 real + 20 synthesized: too few real defects, however many were synthesized
    for p in [p for p in list_images(syn) if p.name.startswith("real_")][:5]:
        p.unlink()
    capsys.readouterr()
    code, err = _train(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                       "--method", "classifier", "--bad", str(syn))
    assert code == 1 and len(err) == 1 and "readable real defective images" in err[0] and "at least 8" in err[0], err
    (syn / "manifest.json").write_text("{not json")
    code, err = _train(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                       "--method", "classifier", "--bad", str(syn))
    assert code == 1 and len(err) == 1 and "manifest.json: not a readable synthesize manifest" in err[0], err
    assert not (tmp_path / "b").exists()
