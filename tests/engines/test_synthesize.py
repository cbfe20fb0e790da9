"""`inspectd synthesize`: real runs on the generated parts, and every refusal (one line, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.cli import main
from inspectd.engines.preprocess import list_images
from inspectd.engines.synthesize import MIN_DEFECTS

REGION = "0.2,0.25,0.8,0.75"  # the plate of the generated parts


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["synthesize", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def args(good: Path, bad: Path, out: Path, masks: Path | None, *extra: str) -> list[str]:
    a = ["--good", str(good), "--bad", str(bad), "--out", str(out)]
    return a + (["--masks", str(masks)] if masks is not None else []) + list(extra)


@pytest.fixture()
def parts(tmp_path: Path, synthetic_parts):
    """A writable copy: good/ (8 of the training images), bad/ (the 12 defects), bad/masks/."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    for p in list_images(synthetic_parts.train_good)[:8]:
        shutil.copy(p, good / p.name)
    shutil.copytree(synthetic_parts.test_bad, bad)
    shutil.copytree(synthetic_parts.masks, bad / "masks")
    return good, bad


def gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def test_writes_count_images_with_masks_changed_only_inside(parts, tmp_path, capsys):
    good, bad = parts
    out = tmp_path / "syn"
    code, stdout, err = run(capsys, *args(good, bad, out, None, "--count", "10", "--seed", "3", "--region", REGION))
    assert code == 0, err
    assert "10 synthesized defects from 12 real ones" in stdout
    images = list_images(out)
    assert [p.name for p in images] == [f"syn_{i:05d}.png" for i in range(10)]
    assert sorted(p.name for p in list_images(out / "masks")) == [p.name for p in images]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["count"] == 10 and len(manifest["items"]) == 10
    assert manifest["good"]["n"] == 8 and manifest["bad"]["n"] == 12
    assert manifest["good"]["folder"] == str(good.resolve()) and manifest["bad"]["masks"] == str((bad / "masks").resolve())
    used = set()
    for item in manifest["items"]:
        img, mask, src = gray(out / item["image"]), gray(out / "masks" / item["image"]), gray(good / item["good"])
        assert img.shape == src.shape == mask.shape
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
        r = item["dilation_px"]
        band = cv2.dilate((mask > 0).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
        changed = img != src
        assert changed.any()
        assert not changed[band == 0].any(), item  # only inside the dilated mask
        # placed inside the region
        ys, xs = np.nonzero(band)
        assert xs.min() >= 0.2 * 128 - 1 and xs.max() <= 0.8 * 128 and ys.min() >= 0.25 * 128 - 1 and ys.max() <= 0.75 * 128
        used.add(item["defect"])
    assert len(used) == 10  # every defect once per round before any repeats
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn")]  # no staging left


def test_deterministic_by_seed(parts, tmp_path, capsys):
    good, bad = parts
    outs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        code, _, err = run(capsys, *args(good, bad, tmp_path / name, None, "--count", "6", "--seed", seed))
        assert code == 0, err
        outs[name] = [(p.name, p.read_bytes()) for d in (tmp_path / name, tmp_path / name / "masks") for p in list_images(d)]
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]


def test_include_real_output_is_a_bad_folder_with_masks(parts, tmp_path, capsys):
    good, bad = parts
    out = tmp_path / "syn"
    code, _, err = run(capsys, *args(good, bad, out, None, "--count", "4", "--include-real"))
    assert code == 0, err
    names = [p.name for p in list_images(out)]
    assert len(names) == 16 and sum(n.startswith("real_") for n in names) == 12
    for n in names:
        assert (gray(out / "masks" / n) > 127).any()
    real = gray(out / "real_spot_0001.png")
    assert np.array_equal(real, gray(bad / "spot_0001.png"))
    # the output is itself a complete --bad folder with masks (default BAD/masks): synthesize accepts it
    code, _, err = run(capsys, *args(good, out, tmp_path / "again", None, "--count", "2"))
    assert code == 0, err


def test_include_real_every_manifest_name_is_its_own_file(parts, tmp_path, capsys):
    """A defect of another suffix (bmp) gets its own mask (masks/<stem>.bmp) and its own real_ copy;
    every image the manifest lists is a distinct file on disk, nothing overwritten."""
    good, bad = parts
    cv2.imwrite(str(bad / "zz_other.bmp"), gray(bad / "chip_0002.png"))
    cv2.imwrite(str(bad / "masks" / "zz_other.bmp"), gray(bad / "masks" / "chip_0002.png"))
    out = tmp_path / "syn"
    code, _, err = run(capsys, *args(good, bad, out, None, "--count", "30", "--include-real"))
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [i["image"] for i in manifest["items"] + manifest["real"]]
    assert len(listed) == len(set(listed)) == 30 + 13
    assert sorted(listed) == sorted(p.name for p in list_images(out))
    assert all((out / "masks" / n).is_file() for n in listed)
    assert {i["mask"] for i in manifest["items"] if i["defect"] == "zz_other.bmp"} == {"zz_other.bmp"}
    real = {r["defect"]: r["image"] for r in manifest["real"]}
    assert np.array_equal(gray(out / real["zz_other.bmp"]), gray(bad / "zz_other.bmp"))
    assert np.array_equal(gray(out / "masks" / real["zz_other.bmp"]) > 127, gray(bad / "masks" / "zz_other.bmp") > 127)


def test_size_mismatch_scales_the_defect_to_the_frame(parts, tmp_path, capsys):
    good, bad = parts
    big = tmp_path / "big"
    (big / "masks").mkdir(parents=True)
    for p in list_images(bad):
        cv2.imwrite(str(big / p.name), cv2.resize(gray(p), (256, 256), interpolation=cv2.INTER_LINEAR))
        cv2.imwrite(str(big / "masks" / p.name), cv2.resize(gray(bad / "masks" / p.name), (256, 256),
                                                            interpolation=cv2.INTER_NEAREST))
    out = tmp_path / "syn"
    code, _, err = run(capsys, *args(good, big, out, None, "--count", "4"))
    assert code == 0, err
    items = json.loads((out / "manifest.json").read_text())["items"]
    for item in items:
        assert gray(out / item["image"]).shape == (128, 128)
        assert item["scale"] == pytest.approx(0.5)
        src_area = (gray(bad / "masks" / item["defect"]) > 127).sum()
        assert (gray(out / "masks" / item["image"]) > 0).sum() == pytest.approx(src_area, rel=0.35)


def test_force_replaces_a_non_empty_folder(parts, tmp_path, capsys):
    good, bad = parts
    out = tmp_path / "syn"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, err = run(capsys, *args(good, bad, out, None, "--count", "2", "--force"))
    assert code == 0, err
    assert not (out / "old.txt").exists() and len(list_images(out)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, *args(good, bad, empty, None, "--count", "2"))[0] == 0  # an empty folder needs no --force


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(parts, tiny_tmpfs, capsys):
    """--out on a real tmpfs that is full before the first image is written."""
    from tests.helpers import fill_filesystem

    good, bad = parts
    fill_filesystem(tiny_tmpfs)
    out = tiny_tmpfs / "syn"
    code, _, err = run(capsys, *args(good, bad, out, None, "--count", "2"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("inspectd synthesize: error: "), lines
    assert str(out) in lines[0] and "No space left on device" in lines[0]
    assert not out.exists() and not [p for p in tiny_tmpfs.iterdir() if ".partial-" in p.name]


def _break(kind: str, good: Path, bad: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Damage the inputs one way; (argv, a fragment the error line must contain)."""
    out = tmp_path / "syn"
    if kind == "no_good":
        return args(tmp_path / "nope", bad, out, None), "nope: good folder does not exist"
    if kind == "no_bad":
        return args(good, tmp_path / "nope", out, None), "nope: defective folder does not exist"
    if kind == "good_is_file":
        return args(bad / "spot_0001.png", bad, out, None), "good folder is not a folder"
    if kind == "unreadable_good":
        (good / "zz_broken.png").write_bytes(b"not a png")
        return args(good, bad, out, None), "1 of 9 good images are not readable images: zz_broken.png"
    if kind == "unreadable_bad":
        (bad / "zz_broken.png").write_bytes(b"")
        return args(good, bad, out, None), "1 of 13 defective images are not readable images: zz_broken.png"
    if kind == "missing_mask":
        (bad / "masks" / "chip_0002.png").unlink()
        (bad / "masks" / "spot_0004.png").unlink()
        return args(good, bad, out, None), "2 of 12 defective images have no mask in"
    if kind == "no_masks_folder":
        shutil.rmtree(bad / "masks")
        return args(good, bad, out, None), "give --masks DIR"
    if kind == "masks_given_missing":
        return args(good, bad, out, tmp_path / "nomasks"), "nomasks: masks folder does not exist"
    if kind == "empty_mask":
        m = gray(bad / "masks" / "spot_0001.png")
        cv2.imwrite(str(bad / "masks" / "spot_0001.png"), np.zeros_like(m))
        return args(good, bad, out, None), "1 masks mark no defect (no pixel > 127): spot_0001.png"
    if kind == "too_few":
        for p in list_images(bad)[MIN_DEFECTS - 1:]:
            p.unlink()
        return args(good, bad, out, None), f"{MIN_DEFECTS - 1} defective images; synthesize needs at least {MIN_DEFECTS}"
    if kind == "same_stem":  # masks are named by stem: spot_0001.png cannot be told from spot_0001.bmp
        cv2.imwrite(str(bad / "spot_0001.bmp"), gray(bad / "chip_0002.png"))
        cv2.imwrite(str(bad / "masks" / "spot_0001.bmp"), gray(bad / "masks" / "chip_0002.png"))
        return args(good, bad, out, None, "--include-real"), "spot_0001.bmp and spot_0001.png share the name spot_0001"
    if kind == "count_zero":
        return args(good, bad, out, None, "--count", "0"), "--count 0: must be at least 1"
    if kind == "bad_region":
        return args(good, bad, out, None, "--region", "0.5,0,0.4,1"), "--region"
    if kind == "not_empty":
        out.mkdir()
        (out / "keep.png").write_bytes(b"x")
        return args(good, bad, out, None), "folder is not empty (use --force to replace it)"
    if kind == "out_is_input":
        return args(good, bad, bad, None, "--force"), "is or contains the input folder"
    if kind == "out_is_file":
        out.write_text("x")
        return args(good, bad, out, None, "--force"), "exists and is not a folder"
    raise AssertionError(kind)


REFUSALS = ["no_good", "no_bad", "good_is_file", "unreadable_good", "unreadable_bad", "missing_mask",
            "no_masks_folder", "masks_given_missing", "empty_mask", "same_stem", "too_few", "count_zero", "bad_region",
            "not_empty", "out_is_input", "out_is_file"]


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusals_are_one_line_and_write_nothing(kind, parts, tmp_path, capsys):
    good, bad = parts
    argv, fragment = _break(kind, good, bad, tmp_path)
    before = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*"))
    code, stdout, err = run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (1, 2), err
    assert len(lines) == 1 and lines[0].startswith("inspectd synthesize: error: "), err
    assert fragment in lines[0], lines[0]
    assert stdout == ""
    assert sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*")) == before  # nothing written


def test_missing_masks_error_names_images_and_where(parts, tmp_path, capsys):
    good, bad = parts
    (bad / "masks" / "chip_0002.png").unlink()
    _, _, err = run(capsys, *args(good, bad, tmp_path / "syn", None))
    assert "chip_0002.png" in err and str(bad / "masks") in err and "<image name>.png" in err
