"""`inspectd train` bad input: one-line errors, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.cli import main
from tests.helpers import header_bomb_jpeg

# The seed test keeps the default ensemble (three members, each seeded from --seed).
SEEDED = ["--image-size", "64", "--epochs", "1", "--views", "1", "--taps", "4"]
# The least training that still goes the whole way (selection, export, parity, manifest): for tests
# about the folders, flags and files around it, not about the model (one flow member, not three).
FAST = [*SEEDED, "--members", "1"]


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_missing_folder(capsys, tmp_path):
    code, err = _run(capsys, "--good", str(tmp_path / "none"), "--out", str(tmp_path / "b"), *FAST)
    assert code == 1 and "folder does not exist" in err and not (tmp_path / "b").exists()


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "good").mkdir()
    code, err = _run(capsys, "--good", str(tmp_path / "good"), "--out", str(tmp_path / "b"), *FAST)
    assert code == 1 and "folder is empty" in err
    assert not (tmp_path / "b").exists() and not _leftovers(tmp_path)


def test_too_few_images(capsys, tmp_path, synthetic_parts):
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted(synthetic_parts.train_good.iterdir())[:3]:
        shutil.copy(p, good)
    code, err = _run(capsys, "--good", str(good), "--out", str(tmp_path / "b"), *FAST)
    assert code == 1 and "3 readable good images, at least 8 are needed" in err
    assert not (tmp_path / "b").exists() and not _leftovers(tmp_path)


def test_too_many_unreadable_files_refused(capsys, tmp_path, synthetic_parts):
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted(synthetic_parts.train_good.iterdir())[:10]:
        shutil.copy(p, good)
    for i in range(4):
        (good / f"broken_{i}.png").write_bytes(b"not a png at all")
    (good / "notes.txt").write_text("operator notes")
    code, err = _run(capsys, "--good", str(good), "--out", str(tmp_path / "b"), *FAST)
    assert code == 1 and "5 of 15 files are not readable images" in err
    assert not (tmp_path / "b").exists() and not _leftovers(tmp_path)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_few_unreadable_files_are_skipped_and_counted(capsys, tmp_path, synthetic_parts):
    good = tmp_path / "good"
    shutil.copytree(synthetic_parts.train_good, good)
    (good / "broken.png").write_bytes(b"\x89PNG truncated")
    (good / "damaged.jpg").write_bytes(header_bomb_jpeg())   # OpenCV raises on this one
    code = main(["train", "--good", str(good), "--out", str(tmp_path / "b"), *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "2 skipped" in out.out
    assert (tmp_path / "b" / "manifest.json").exists() and not _leftovers(tmp_path)


@pytest.mark.usefixtures("one_torch_thread")
def test_hidden_files_are_neither_read_nor_counted(capsys, tmp_path, synthetic_parts):
    """A folder copied from a Mac (a ._NAME AppleDouble twin beside every image) or with a hidden
    thumbnail: the hidden files are not images of the set. They are never trained on, and the
    unreadable count stays right (before: it went negative and the refusal could be bypassed)."""
    good = tmp_path / "good"
    shutil.copytree(synthetic_parts.train_good, good)
    names = sorted(p.name for p in good.iterdir())
    for name in names:
        (good / f"._{name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    shutil.copy(good / names[0], good / ".thumb.png")
    (good / "broken.png").write_bytes(b"\x89PNG truncated")
    code = main(["train", "--good", str(good), "--out", str(tmp_path / "b"), *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "1 skipped" in out.out and "._" not in out.err
    training = json.loads((tmp_path / "b" / "manifest.json").read_text())["training"]
    used = training["image_names"] + training["holdout_names"]
    assert training["skipped"] == 1 and sorted(used) == names


def test_a_flag_the_method_does_not_use_is_named_not_silently_recorded(capsys, tmp_path, synthetic_parts):
    """--augment, --members, --taps ... change only the methods that use them: given to another
    method they are named in one warning line (before: accepted, recorded in the manifest, ignored)."""
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted(synthetic_parts.train_good.iterdir())[:3]:  # too few: train() refuses after the warning
        shutil.copy(p, good)
    code = main(["train", "--good", str(good), "--out", str(tmp_path / "c"), "--method", "cutpaste-ae",
                 "--augment", "rotate", "--members", "2", "--taps", "4,10", "--reduction", "max"])
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "does not use" in line]
    assert code == 1 and warning == ["inspectd train: method cutpaste-ae does not use --augment, --members, "
                                     "--reduction: ignoring them"], err
    code = main(["train", "--good", str(good), "--out", str(tmp_path / "f"), "--augment", "rotate",
                 "--members", "2", "--taps", "4,10", "--reduction", "max"])
    err = capsys.readouterr().err
    assert code == 1 and "does not use" not in err and "at least 8 are needed" in err  # the flow uses them all


@pytest.mark.usefixtures("one_torch_thread")
def test_existing_bundle_needs_force(capsys, tmp_path, tiny_bundle, synthetic_parts):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(out), *FAST)
    assert code == 1 and "already holds a bundle (use --force to replace it)" in err
    assert (out / "manifest.json").read_bytes() == before
    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(out), "--force", *FAST])
    assert code == 0
    assert (out / "manifest.json").read_bytes() != before and not _leftovers(tmp_path)


def test_unknown_augmentation_is_a_usage_error(capsys, tmp_path, synthetic_parts):
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                     "--augment", "rotate,shear", *FAST)
    assert code == 2 and "unknown augmentation 'shear'" in err


def test_training_is_reproducible_with_a_seed(capsys, tmp_path, synthetic_parts):
    shas = []
    for name in ("a", "b"):
        assert main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / name),
                     "--seed", "7", *SEEDED]) == 0
        from inspectd.engines.bundle import load_bundle
        shas.append(load_bundle(tmp_path / name).manifest.model.sha256)
    assert shas[0] == shas[1]


@pytest.mark.usefixtures("one_torch_thread")
def test_colour_images_make_an_rgb_bundle(capsys, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        img = np.full((64, 64, 3), (30, 120, 200), np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(good / f"{i}.png"), img)
    assert main(["train", "--good", str(good), "--out", str(tmp_path / "b"), *FAST]) == 0
    from inspectd.engines.bundle import load_bundle
    assert load_bundle(tmp_path / "b").manifest.input.color_mode == "rgb"


def test_no_flags_train_the_configs_defaults(monkeypatch, tmp_path, synthetic_parts):
    """One source of defaults: `inspectd train` with no flags passes exactly ModelConfig's and
    TrainConfig's defaults (the ones the benchmark reports), plus label-free selection."""
    from dataclasses import fields

    import inspectd.engines.train as train_mod
    from inspectd.engines.model_config import ModelConfig

    seen = {}

    def capture(good_dir, out, cfg, force=False, golden_bad_dir=None):
        seen["cfg"] = cfg
        raise train_mod.DataError("captured")  # stop before the slow part

    monkeypatch.setattr(train_mod, "train", capture)
    assert main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b")]) == 1
    cfg, default = seen["cfg"], train_mod.TrainConfig()
    sized = {"image_height", "image_width", "color_mode"}  # from the images (size: the flow's short side)
    for f in fields(ModelConfig):
        if f.name not in sized:
            assert getattr(cfg.model, f.name) == getattr(ModelConfig(), f.name), f.name
    for name in ("augment", "views", "batch_size", "lr_max", "holdout_fraction", "seed", "roi"):
        assert getattr(cfg, name) == getattr(default, name), name
    assert cfg.select and cfg.select_epochs == list(train_mod.SELECT_EPOCHS)
    assert cfg.select_reductions == list(train_mod.SELECT_REDUCTIONS)


def test_default_input_size_is_the_methods(monkeypatch, tmp_path, synthetic_parts):
    """Without --image-size the flow trains at its validated short side (384) and the other methods
    at 256; a given --image-size wins for every method."""
    import inspectd.engines.train as train_mod
    from inspectd.engines.model_config import DEFAULT_SHORT_SIDE, default_short_side

    seen = []

    def capture(good_dir, out, cfg, force=False, golden_bad_dir=None):
        seen.append((cfg.method, cfg.model.image_height, cfg.model.image_width))
        raise train_mod.DataError("captured")  # stop before the slow part

    monkeypatch.setattr(train_mod, "train", capture)
    base = ["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b")]
    assert main(base) == 1
    assert main([*base, "--method", "cutpaste-ae"]) == 1
    assert main([*base, "--method", "cutpaste-ae", "--image-size", "96"]) == 1
    assert main([*base, "--image-size", "64x96"]) == 1
    assert default_short_side("flow") == 384
    assert default_short_side("cutpaste-ae") == DEFAULT_SHORT_SIDE == 256
    # the synthetic parts are square, so a short side S gives S x S
    assert seen == [("flow", 384, 384), ("cutpaste-ae", 256, 256), ("cutpaste-ae", 96, 96), ("flow", 64, 96)]


@pytest.mark.usefixtures("one_torch_thread")
def test_force_never_replaces_what_is_not_a_bundle(capsys, tmp_path, synthetic_parts):
    """`--force` replaces a bundle. Pointed at the training images themselves (or at a folder that
    holds them, or any folder that is not a bundle), it must refuse before any work: it used to train,
    then delete the images."""
    good = tmp_path / "good"
    shutil.copytree(synthetic_parts.train_good, good)
    n = len(list(good.iterdir()))
    for out in (good, tmp_path):
        code, err = _run(capsys, "--good", str(good), "--out", str(out), "--force", *FAST)
        assert code == 1 and "not a bundle" in err, err
        assert len(list(good.iterdir())) == n
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    code, err = _run(capsys, "--good", str(good), "--out", str(notes), "--force", *FAST)
    assert code == 1 and "not a bundle" in err and (notes / "notes.txt").read_text() == "keep me"
    (notes / "manifest.json").write_text('{"made_by": "inspectd synthesize", "count": 3}')  # not a bundle's
    code, err = _run(capsys, "--good", str(good), "--out", str(notes), "--force", *FAST)
    assert code == 1 and "not a bundle" in err and (notes / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "made-for-it"
    empty.mkdir()
    assert main(["train", "--good", str(good), "--out", str(empty), *FAST]) == 0   # an empty folder: fine


def test_an_unusable_output_or_golden_bad_folder_is_refused_before_training(capsys, tmp_path, synthetic_parts,
                                                                            monkeypatch):
    """An --out that cannot be written, or a --golden-bad folder that cannot be read, is found before
    the training (minutes to hours), not after it."""
    from inspectd.engines import methods

    fitted: list[int] = []
    flow = methods.get("flow")
    real_fit = flow.fit
    monkeypatch.setattr(type(flow), "fit", lambda self, data: (fitted.append(1), real_fit(data))[1])
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(afile / "b"), *FAST)
    assert code == 1 and str(afile) in err, err
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                     "--golden-bad", str(tmp_path / "missing"), *FAST)
    assert code == 1 and "missing" in err, err
    assert fitted == [] and not _leftovers(tmp_path)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_capture_folder_trains_without_counting_its_record_as_a_bad_image(capsys, tmp_path, synthetic_parts):
    """`inspectd capture` writes capture.json beside the frames and prints `inspectd train --good <that
    folder>`: its own record is not an unreadable image (it made 8 captured frames fail the 10 % rule)."""
    good = tmp_path / "cap"
    shutil.copytree(synthetic_parts.train_good, good)
    for extra in list(sorted(good.iterdir()))[8:]:
        extra.unlink()
    (good / "capture.json").write_text("{}")
    code = main(["train", "--good", str(good), "--out", str(tmp_path / "b"), *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    from inspectd.engines.bundle import load_bundle
    assert load_bundle(tmp_path / "b").manifest.training.skipped == 0


def test_a_hidden_ratio_that_cannot_work_is_a_usage_error(capsys, tmp_path, synthetic_parts):
    for value in ("nan", "0", "-1", "inf"):
        code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                         "--hidden-ratio", value, *FAST)
        assert code == 2 and "hidden_ratio" in err, (value, err)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_full_disk_is_one_line_naming_the_bundle_and_leaves_nothing(capsys, tiny_tmpfs, synthetic_parts):
    """--out on a real tmpfs that is full by the time the bundle is written (the folder itself can
    still be made, so the up-front probe passes): one line naming where, no half-written folder."""
    from tests.helpers import fill_filesystem

    fill_filesystem(tiny_tmpfs)
    out = tiny_tmpfs / "b"
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(out), *FAST, "--no-select")
    assert code == 1 and err.startswith("inspectd train: error: ") and str(out) in err, err
    assert "No space left on device" in err
    assert not out.exists() and not _leftovers(tiny_tmpfs)
