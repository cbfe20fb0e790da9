"""`inspectd eval` through ONNX Runtime: the report files and their numbers; a non-square ROI bundle\nthrough eval, calibrate, the parity gate and the pipeline."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.cli import main
from inspectd.engines.preprocess import list_images


def test_eval_writes_report_csv_plots_and_overlays(capsys, tmp_path, tiny_bundle, synthetic_parts):
    out = tmp_path / "report"
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good),
                 "--bad", str(synthetic_parts.test_bad), "--masks", str(synthetic_parts.masks), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["n_good"] == 12 and report["n_bad"] == 12 and report["skipped"] == 0
    assert report["image_auroc"] >= 0.9 and 0.5 < report["pixel_auroc"] <= 1.0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 24 and {r["label"] for r in rows} == {"good", "bad"}
    assert (out / "roc.png").stat().st_size > 0 and (out / "histogram.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("worst-good-*.png"))) == 5
    assert len(list((out / "overlays").glob("best-bad-*.png"))) == 5


def test_eval_refuses_an_empty_folder(capsys, tmp_path, tiny_bundle, synthetic_parts):
    (tmp_path / "empty").mkdir()
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(tmp_path / "empty"),
                 "--bad", str(synthetic_parts.test_bad), "--out", str(tmp_path / "r")])
    assert code == 1 and "at least one image in each of --good and --bad" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_eval_refuses_to_write_its_report_into_an_input_folder(capsys, tmp_path, tiny_bundle, synthetic_parts):
    """eval clears its own earlier outputs in --out (report.json, scores.csv, plots): never in a
    folder of the images being evaluated."""
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted(synthetic_parts.test_good.iterdir())[:3]:
        (good / p.name).write_bytes(p.read_bytes())
    (good / "scores.csv").write_text("the user's own file\n")
    rc = main(["eval", "--bundle", str(tiny_bundle), "--good", str(good), "--bad", str(synthetic_parts.test_bad),
               "--out", str(good)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--out is the --good folder" in err and "\n" not in err
    assert (good / "scores.csv").read_text() == "the user's own file\n"


def test_a_full_disk_is_one_line_naming_the_report(capsys, tiny_tmpfs, tiny_bundle, synthetic_parts):
    """The report folder on a real tmpfs that is full before eval writes: one line naming it."""
    from tests.helpers import fill_filesystem

    fill_filesystem(tiny_tmpfs)
    out = tiny_tmpfs / "report"
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good),
                 "--bad", str(synthetic_parts.test_bad), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("inspectd eval: error: ") and str(out) in err[-1], err[-1]
    assert "No space left on device" in err[-1] and "Traceback" not in "\n".join(err)


def test_eval_refuses_masks_it_cannot_use(capsys, tmp_path, tiny_bundle, synthetic_parts):
    """--masks that does not exist, or whose names match no defective image, used to give exit 0 and a
    silent "pixel_auroc": null: a typo looked like a result. Both are one-line refusals before scoring."""
    (tmp_path / "other").mkdir()
    cv2.imwrite(str(tmp_path / "other" / "unrelated.png"), np.zeros((8, 8), np.uint8))
    for masks, expected in ((tmp_path / "nope", "does not exist"), (tmp_path / "other", "no mask matches")):
        code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good),
                     "--bad", str(synthetic_parts.test_bad), "--masks", str(masks), "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and expected in err[-1], err[-3:]
    assert not (tmp_path / "r").exists()
    # two defective images sharing a stem would be scored against one mask: refused, naming both
    bad = tmp_path / "bad"
    shutil.copytree(synthetic_parts.test_bad, bad)
    first = list_images(bad)[0]
    cv2.imwrite(str(bad / f"{first.stem}.bmp"), cv2.imread(str(first)))
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good), "--bad", str(bad),
                 "--masks", str(synthetic_parts.masks), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and f"{first.stem}.bmp and {first.name} share the name {first.stem}" in err[-1], err[-3:]
    assert not (tmp_path / "r").exists()


def _subset(folder: Path, src: Path, names: list[str]) -> Path:
    """A real folder holding copies of `names` from `src` (a smaller image set for a second run)."""
    import shutil

    folder.mkdir()
    for name in names:
        shutil.copy(src / name, folder / name)
    return folder


def _overlay_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "overlays").glob("*.png") if p.name.startswith(("worst-good-", "best-bad-")))


def test_a_second_eval_into_the_same_folder_leaves_only_its_own_outputs(capsys, tmp_path, tiny_bundle,
                                                                        synthetic_parts):
    """Two real runs into one --out: the second's report, CSV and overlays only (the first run's
    worst-good/best-bad PNGs used to stay beside them); files the user put there are kept."""
    goods = sorted(p.name for p in synthetic_parts.test_good.iterdir())
    bads = sorted(p.name for p in synthetic_parts.test_bad.iterdir())
    out = tmp_path / "report"
    assert main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good),
                 "--bad", str(synthetic_parts.test_bad), "--out", str(out)]) == 0
    assert len(_overlay_files(out)) == 10
    (out / "notes.txt").write_text("line 3 trial\n")
    (out / "overlays" / "marked-by-hand.png").write_bytes(b"mine")
    good2 = _subset(tmp_path / "good2", synthetic_parts.test_good, goods[-2:])
    bad2 = _subset(tmp_path / "bad2", synthetic_parts.test_bad, bads[-2:])
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(good2), "--bad", str(bad2), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["n_good"] == 2 and report["n_bad"] == 2
    assert sorted(r["file"] for r in csv.DictReader(open(out / "scores.csv"))) == sorted(goods[-2:] + bads[-2:])
    overlays = _overlay_files(out)
    assert len(overlays) == 4 and all(any(n.endswith(f"-{Path(f).stem}.png") for f in goods[-2:] + bads[-2:])
                                      for n in overlays), overlays
    assert (out / "notes.txt").read_text() == "line 3 trial\n"
    assert (out / "overlays" / "marked-by-hand.png").read_bytes() == b"mine"



def _eval(bundle: Path, good: Path, bad: Path, out: Path) -> list[str]:
    return ["eval", "--bundle", str(bundle), "--good", str(good), "--bad", str(bad), "--out", str(out)]


def test_eval_refuses_a_folder_whose_report_or_scores_are_not_its_own(capsys, tmp_path, tiny_bundle,
                                                                        synthetic_parts):
    """A folder of the user's with their own report.json / scores.csv: eval cannot know they are not
    its own and used to overwrite them. Now one line naming the file and asking for another --out,
    before scoring (no plot written), and every file as it was."""
    mine = tmp_path / "line3-notes"
    mine.mkdir()
    (mine / "report.json").write_text('{"author": "me", "findings": ["scratch on part 7"]}\n')
    (mine / "scores.csv").write_text("part,score\n7,0.9\n")
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, mine))
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and str(mine / "report.json") in err and "--out" in err, err
    assert (mine / "report.json").read_text() == '{"author": "me", "findings": ["scratch on part 7"]}\n'
    assert (mine / "scores.csv").read_text() == "part,score\n7,0.9\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report.json", "scores.csv"]
    # no report.json, but a scores.csv (or a plot) of the user's: refused the same way, naming it
    (mine / "report.json").unlink()
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, mine))
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and str(mine / "scores.csv") in err and "--out" in err, err
    assert (mine / "scores.csv").read_text() == "part,score\n7,0.9\n"
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "roc.png").write_bytes(b"my own plot")
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, plots))
    err = capsys.readouterr().err.strip()
    assert code == 1 and str(plots / "roc.png") in err and (plots / "roc.png").read_bytes() == b"my own plot", err


def test_eval_replaces_an_earlier_evals_outputs_its_marker_or_an_older_report(capsys, tmp_path, tiny_bundle,
                                                                              synthetic_parts):
    """What eval writes carries "tool": "inspectd eval"; a report of an older eval (no marker, its key
    set) and the scores.csv a failed run left without its report are eval's too: replaced."""
    out = tmp_path / "old-eval"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"bundle": "bundles/line3", "bundle_id": "7eee7baa74aa", "n_good": 40,
                                                 "n_bad": 20, "skipped": 0, "image_auroc": 1.0,
                                                 "pixel_auroc": 0.91, "pixel_images": 60}, indent=2))
    (out / "scores.csv").write_text("file,label,raw_score,score\nold.png,good,1.0,0.5\n")
    (out / "overlays").mkdir()
    (out / "overlays" / "worst-good-0-old.png").write_bytes(b"old")
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, out))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["tool"] == "inspectd eval" and report["n_good"] == 12
    assert not (out / "overlays" / "worst-good-0-old.png").exists()
    # a run that died after its scores.csv (no report.json): the next run may replace what it left
    (out / "report.json").unlink()
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, out))
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["tool"] == "inspectd eval"


def test_eval_warns_and_reports_when_its_images_are_training_images(capsys, tmp_path, tiny_bundle, synthetic_parts):
    """A "holdout" folder that holds trained frames (renamed: found by content) gives an optimistic
    AUROC: eval still runs (sometimes wanted) but says so in one warning line and in report.json."""
    from inspectd.engines.bundle import load_bundle

    trained = load_bundle(tiny_bundle).manifest.training.image_names
    good = tmp_path / "holdout"
    good.mkdir()
    for name in trained[:4]:
        shutil.copy(synthetic_parts.train_good / name, good / f"holdout-{name}")
    for p in list_images(synthetic_parts.test_good)[:4]:
        shutil.copy(p, good / p.name)
    code = main(_eval(tiny_bundle, good, synthetic_parts.test_bad, tmp_path / "r"))
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    overlap = report["training_overlap"]
    assert overlap["count"] == 4 and overlap["good"] == 4 and overlap["bad"] == 0, overlap
    assert overlap["by"] == "content hash" and set(overlap["examples"]) <= {f"holdout-{n}" for n in trained[:4]}
    warnings = [line for line in err.splitlines() if "training" in line]
    assert len(warnings) == 1 and "4 of the --good/--bad images" in warnings[0] and "optimistic" in warnings[0], err
    # images the bundle never saw: nothing to warn about, a zero count in the report
    code = main(_eval(tiny_bundle, synthetic_parts.test_good, synthetic_parts.test_bad, tmp_path / "r2"))
    err = capsys.readouterr().err
    assert code == 0 and "training" not in err, err
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["training_overlap"]["count"] == 0


def test_eval_counts_the_defects_a_classifier_learned_from(capsys, tmp_path, tiny_method_bundles, other_defects,
                                                           synthetic_parts):
    """The classifier trains on defects: evaluating it on those as --bad is evaluating on training data."""
    code = main(_eval(tiny_method_bundles("classifier"), synthetic_parts.test_good, other_defects.test_bad,
                      tmp_path / "r"))
    err = capsys.readouterr().err
    assert code == 0, err
    overlap = json.loads((tmp_path / "r" / "report.json").read_text())["training_overlap"]
    assert overlap["count"] == overlap["bad"] == 12 and overlap["good"] == 0, overlap
    assert sum("training" in line for line in err.splitlines()) == 1, err


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A real 512 KiB tmpfs: room for one small eval report, not for a bigger one after it."""
    from tests.helpers import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "reports", "512k") as mnt:
        yield mnt


def test_an_eval_that_fails_midway_leaves_no_report_of_an_earlier_run(capsys, tmp_path, small_tmpfs, tiny_bundle,
                                                                      synthetic_parts):
    """A real full disk: the first (small) run fits, the disk is then filled, and the second (bigger)
    run runs out of space partway through its outputs. No report.json may remain (the first run's
    used to, beside the second's scores.csv, looking complete), nor the first run's overlays."""
    from tests.helpers import fill_filesystem

    goods = sorted(p.name for p in synthetic_parts.test_good.iterdir())
    bads = sorted(p.name for p in synthetic_parts.test_bad.iterdir())
    out = small_tmpfs / "report"
    good1 = _subset(tmp_path / "good1", synthetic_parts.test_good, goods[:1])
    bad1 = _subset(tmp_path / "bad1", synthetic_parts.test_bad, bads[:1])
    assert main(["eval", "--bundle", str(tiny_bundle), "--good", str(good1), "--bad", str(bad1),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    first_overlays = _overlay_files(out)
    assert len(first_overlays) == 2 and (out / "report.json").is_file()
    (out / "notes.txt").write_text("keep me\n")
    fill_filesystem(small_tmpfs)
    capsys.readouterr()
    good2 = _subset(tmp_path / "good2", synthetic_parts.test_good, goods[1:])
    bad2 = _subset(tmp_path / "bad2", synthetic_parts.test_bad, bads[1:])
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(good2), "--bad", str(bad2), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("inspectd eval: error: ") and str(out) in err[-1], err[-3:]
    assert "No space left on device" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (out / "report.json").exists()
    assert not set(first_overlays) & set(_overlay_files(out))
    assert (out / "notes.txt").read_text() == "keep me\n"


# A real (tiny) bundle with a non-square input and an ROI, through every consumer of the bundle.
ROI = (12, 24, 104, 80)   # the plate of the 128x128 synthetic parts, x, y, w, h


@pytest.fixture(scope="module")
def roi_bundle(tmp_path_factory, synthetic_parts) -> Path:
    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.train import TrainConfig, train

    out = tmp_path_factory.mktemp("roi-bundle") / "b"
    cfg = TrainConfig(model=ModelConfig(image_height=64, image_width=96, taps=[4, 10]), epochs=6, views=1, select=False,
                      seed=0, roi=ROI)
    with one_thread():  # as tests/conftest.py one_torch_thread
        train(synthetic_parts.train_good, out, cfg, golden_bad_dir=synthetic_parts.test_bad)
    return out


def test_a_non_square_roi_bundle_goes_through_eval_calibrate_parity_and_the_pipeline(
        capsys, tmp_path, roi_bundle, synthetic_parts):
    from inspectd.calibration.calibrate import CalibrationRequest, calibrate
    from inspectd.daemon.line import LineThreshold
    from inspectd.daemon.pipeline import LinePipeline
    from inspectd.daemon.run import line_settings
    from inspectd.daemon.config import config_from_dict
    from inspectd.daemon.sources.replay import ReplaySource
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.preprocess import InputSpec, load_prepared
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from inspectd.engines.runtime.parity import parity_gate
    from tests.helpers import Collector

    bundle = load_bundle(roi_bundle)
    assert bundle.input_spec == InputSpec(64, 96, "gray", roi=ROI, frame_size=(128, 128))
    assert bundle.map_shape[0] < bundle.map_shape[1]
    # eval: full 128x128 files in, cropped and resized like training; masks cut the same way
    out = tmp_path / "report"
    assert main(["eval", "--bundle", str(roi_bundle), "--good", str(synthetic_parts.test_good), "--bad",
                 str(synthetic_parts.test_bad), "--masks", str(synthetic_parts.masks), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_good"] == 12 and report["n_bad"] == 12 and report["skipped"] == 0
    assert report["image_auroc"] > 0.6 and report["pixel_auroc"] > 0.6
    # calibrate: scores of the full frames through the bundle's ROI
    res = calibrate(CalibrationRequest(bundle=roi_bundle, good=synthetic_parts.test_good, line="L1",
                                       config=tmp_path / "none.yaml", target_false_reject=0.25,
                                       report_dir=tmp_path / "calib", write_config=False),
                    progress_stream=open(os.devnull, "w"))
    paths = sorted(synthetic_parts.test_good.iterdir())
    with OnnxRuntimeBackend(bundle) as backend:
        direct = {p.name: float(bundle.normalize(float(backend.infer(load_prepared(p, bundle.input_spec)[None])[0][0])))
                  for p in paths}
        # parity gate on the stored (already cropped) golden images
        gate = parity_gate(backend, bundle, threshold=res.report["threshold"])
    assert np.allclose(res.good_scores, [direct[p.name] for p in paths], atol=1e-5)
    assert gate.passed and len(gate.rows) == 8
    # the daemon's pipeline: the line does not repeat the ROI, the bundle's applies
    cfg = config_from_dict({"lines": [{"id": "L1", "bundle": str(roi_bundle), "threshold": 1e6,
                                       "backends": ["onnxruntime"], "latency_budget_ms": 5000, "queue_size": 64,
                                       "source": {"type": "replay", "path": str(synthetic_parts.test_good)}}]})
    collect = Collector()
    pipe = LinePipeline(line_settings(cfg.lines[0]), ReplaySource("L1", synthetic_parts.test_good), bundle,
                        LineThreshold("L1", value=1e6), collect).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = collect.wait_for(len(paths))
    finally:
        pipe.stop(timeout_s=3.0)
    got = {Path(v.meta["path"]).name: v.score for v in verdicts}
    assert all(v.error is None for v in verdicts)
    assert got.keys() == direct.keys() and all(abs(got[k] - direct[k]) < 1e-4 for k in got)


def _widened(src: Path, dst: Path, n: int) -> Path:
    """The first n images of src at 160x128 instead of 128x128, as a camera whose Width changed gives them."""
    dst.mkdir()
    for p in list_images(src)[:n]:
        cv2.imwrite(str(dst / p.name), cv2.resize(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), (160, 128)))
    return dst


def test_frames_of_another_size_than_the_bundle_learned_are_refused_by_eval_and_calibrate(
        capsys, tmp_path, tiny_bundle, synthetic_parts):
    """The bundle learned 128x128 frames (the size of every image it was trained on, recorded in its
    manifest): eval skips other sizes saying why, refuses a folder of nothing else in one line, and
    calibrate refuses them in one line, writing nothing."""
    wide = _widened(synthetic_parts.test_good, tmp_path / "wide", 3)
    mixed = tmp_path / "mixed"
    shutil.copytree(synthetic_parts.test_good, mixed)
    for p in wide.iterdir():
        shutil.copy(p, mixed / p.name)
    said = "frame of 160x128 px, but the bundle was trained on 128x128 frames"
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(mixed), "--bad", str(synthetic_parts.test_bad),
                 "--out", str(tmp_path / "r1")])
    err = capsys.readouterr().err
    assert code == 0 and f"eval: 3 images skipped, the first: {wide.parent / 'mixed'}" in err and said in err, err
    assert json.loads((tmp_path / "r1" / "report.json").read_text())["skipped"] == 3
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(wide), "--bad", str(synthetic_parts.test_bad),
                 "--out", str(tmp_path / "r2")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1 and len(lines) == 1 and "no usable images in --good (3 skipped" in lines[0] and said in lines[0]
    config = tmp_path / "lines.yaml"
    config.write_text(f"lines:\n  - id: line1\n    source: {{type: replay, path: {tmp_path}}}\n"
                      f"    bundle: {tiny_bundle}\n    threshold: 5.0\n")
    before = config.read_bytes()
    every = _widened(synthetic_parts.test_good, tmp_path / "every", 12)
    code = main(["calibrate", "--bundle", str(tiny_bundle), "--good", str(every), "--line", "line1",
                 "--target-false-reject", "0.3", "--config", str(config), "--threads", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code != 0 and len(lines) == 1 and said in lines[0], lines
    assert config.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if "line1" in p.name) == []
