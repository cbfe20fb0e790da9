"""Line resolution and the bundle's ROI: size / tiles / ROI parsing, non-square bundles, and one ROI
applied by every consumer (eval, calibrate, parity gate, bench, daemon) from the bundle alone.

The bundles here are small but real: a hand-written ONNX graph (uint8 NHWC -> 4x4 average pool ->
squared deviation from mid-grey = anomaly map, score = map max) with a non-square input, written by
the real `write_bundle` and verified by `load_bundle`, so these tests do not depend on the trained
model and run in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from inspectd.daemon.config import config_from_dict, load_config
from inspectd.daemon.line import LineThreshold
from inspectd.daemon.pipeline import LinePipeline
from inspectd.daemon.run import Daemon, line_settings
from inspectd.daemon.sources.replay import ReplaySource
from inspectd.engines.bundle import (Bundle, check_line_roi, load_bundle, read_bundle_roi, staging_dir,
                                     write_bundle)
from inspectd.engines.preprocess import (InputSpec, load_stored, parse_image_size, parse_roi, parse_tiles, prepare,
                                         prepare_mask, read_image, resolve_image_size, sha256_file)
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import BundleError, ConfigError, DataError

from tests.engines.test_runtime_toybundle import toy_onnx
from tests.helpers import Collector

# Non-square model input (height x width) and the ROI (x, y, w, h) it is cut from in a larger frame.
H, W, POOL = 32, 64, 4
FRAME_H, FRAME_W = 120, 200
ROI = (40, 20, 128, 64)        # 2x the model input: the resize halves it
DEFECT = 12                    # px in the source frame: 6 px at the model input, over a 4-px pool cell


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,expected", [("256", (256, None)), ("640x256", (640, 256)), (" 32X4096 ", (32, 4096))])
def test_parse_image_size_accepts_a_short_side_or_height_x_width(text: str, expected: tuple) -> None:
    assert parse_image_size(text) == expected


@pytest.mark.parametrize("text,why", [
    ("0", "must be positive"), ("-32", "must be positive"), ("0x256", "must be positive"),
    ("256x-64", "must be positive"), ("100", r"multiple of 32 \(the backbone's stride\), got 100 \(try 96 or 128\)"),
    ("640x250", "multiple of 32"), ("4128", "at most 4096"), ("256x8192", "at most 4096"),
    ("abc", "expected S .* or HxW"), ("640x", "expected S"), ("1x2x3", "expected S"), ("", "expected S"),
    ("256.0", "expected S"), ("x256", "expected S"),
])
def test_parse_image_size_refuses_bad_values_in_one_line(text: str, why: str) -> None:
    with pytest.raises(DataError, match=why) as info:
        parse_image_size(text)
    assert "\n" not in str(info.value) and str(info.value).startswith("--image-size: ")


def test_parse_helpers_raise_the_requested_error_class() -> None:
    with pytest.raises(ConfigError, match="--image-size"):
        parse_image_size("7", ConfigError)
    with pytest.raises(ConfigError, match="roi: expected"):
        parse_roi("1,2", ConfigError, "roi")
    with pytest.raises(ConfigError, match="--tiles"):
        parse_tiles("9x1", ConfigError)


@pytest.mark.parametrize("text,expected", [("2x2", (2, 2)), ("1x3", (1, 3)), ("8X8", (8, 8))])
def test_parse_tiles(text: str, expected: tuple) -> None:
    assert parse_tiles(text) == expected


@pytest.mark.parametrize("text,why", [("0x2", "each be 1..8"), ("2x9", "each be 1..8"), ("-1x2", "each be 1..8"),
                                      ("2", "expected ROWSxCOLS"), ("2x2x2", "expected ROWSxCOLS"),
                                      ("axb", "expected ROWSxCOLS"), ("", "expected ROWSxCOLS")])
def test_parse_tiles_refuses_bad_values_in_one_line(text: str, why: str) -> None:
    with pytest.raises(DataError, match=why) as info:
        parse_tiles(text)
    assert "\n" not in str(info.value)


def test_parse_roi() -> None:
    assert parse_roi("40,20,128,64") == ROI and parse_roi(" 0, 0, 1, 1 ") == (0, 0, 1, 1)


@pytest.mark.parametrize("text,why", [("1,2,3", "expected x,y,w,h"), ("1,2,3,4,5", "expected x,y,w,h"),
                                      ("a,b,c,d", "expected x,y,w,h"), ("1.5,2,3,4", "expected x,y,w,h"),
                                      ("-1,0,5,5", "x,y >= 0"), ("0,0,0,5", "w,h > 0"), ("0,0,5,-2", "w,h > 0"),
                                      ("", "expected x,y,w,h")])
def test_parse_roi_refuses_bad_values_in_one_line(text: str, why: str) -> None:
    with pytest.raises(DataError, match=why) as info:
        parse_roi(text)
    assert "\n" not in str(info.value)


def test_resolve_image_size_keeps_the_aspect_on_multiples_of_32() -> None:
    assert resolve_image_size((640, 256), []) == (640, 256)                        # HxW is used as given
    ksdd = [(1250, 500), (1262, 500), (1240, 500)]                               # tall: aspect 2.5
    assert resolve_image_size((256, None), ksdd) == (640, 256)
    assert resolve_image_size((256, None), [(2048, 2448, 3)]) == (256, 320)       # wide, 2448/2048 = 1.195
    assert resolve_image_size((256, None), [(100, 100)]) == (256, 256)
    # The median, not the mean: one odd image in ten does not move the size ...
    assert resolve_image_size((256, None), [(100, 200)] * 9 + [(100, 1000)]) == (256, 512)
    # ... but images of many shapes (no one camera geometry to keep) get a square input.
    assert resolve_image_size((256, None), [(100, 100), (100, 150), (100, 200), (100, 300)]) == (256, 256)
    # With an ROI its own aspect counts (that is what gets resized), not the frame's.
    assert resolve_image_size((256, None), [(2048, 2448)], roi=(0, 0, 600, 1200)) == (512, 256)
    with pytest.raises(DataError, match="no image shapes"):
        resolve_image_size((256, None), [])
    with pytest.raises(DataError, match="long side of .* more than 4096"):
        resolve_image_size((1024, None), [(100, 500)])


# ------------------------------------------------------------------------------------ preprocessing
def _frame(defect_at: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    """A FRAME_H x FRAME_W mid-grey frame with mild noise and, optionally, a bright square (x, y)."""
    rng = np.random.default_rng(seed)
    img = np.clip(128 + rng.normal(0, 4, (FRAME_H, FRAME_W)), 0, 255).astype(np.uint8)
    if defect_at is not None:
        x, y = defect_at
        img[y:y + DEFECT, x:x + DEFECT] = 250
    return img


INSIDE = (ROI[0] + 50, ROI[1] + 20)          # well inside the ROI
OUTSIDE = (5, FRAME_H - DEFECT - 5)          # bottom-left corner, outside the ROI


def test_input_spec_carries_the_roi_and_prepare_crops_it() -> None:
    spec = InputSpec(H, W, "gray", roi=list(ROI))           # lists (from JSON) become a tuple
    assert spec.roi == ROI and spec.shape == (H, W, 1) and spec.without_roi() == InputSpec(H, W, "gray")
    frame = np.zeros((FRAME_H, FRAME_W), np.uint8)
    x, y, w, h = ROI
    frame[y:y + h, x:x + w] = 200
    out = prepare(frame, spec)
    assert out.shape == (H, W, 1) and out.min() == 200      # exactly the ROI, nothing around it
    assert prepare(frame, spec, roi=ROI).tobytes() == out.tobytes()   # the same ROI from a line is fine
    whole = prepare(frame, InputSpec(H, W, "gray"))
    assert whole.min() == 0                                  # no ROI: the whole frame
    with pytest.raises(DataError, match="invalid|x,y >= 0"):
        InputSpec(H, W, "gray", roi=(-1, 0, 5, 5))


def test_prepare_refuses_a_line_roi_that_differs_from_the_bundle() -> None:
    frame = _frame()
    with pytest.raises(DataError, match=r"ROI \[0, 0, 128, 64\] differs from the bundle's ROI \[40, 20, 128, 64\]"):
        prepare(frame, InputSpec(H, W, "gray", roi=ROI), roi=(0, 0, 128, 64))
    with pytest.raises(DataError, match="differs from a bundle trained on whole frames"):
        prepare(frame, InputSpec(H, W, "gray"), roi=ROI)
    with pytest.raises(DataError, match=r"ROI \[100, 100, 128, 64\] lies outside the 200x120 frame"):
        prepare(frame, InputSpec(H, W, "gray", roi=(100, 100, 128, 64)))


def test_masks_are_cropped_and_resized_like_the_image() -> None:
    spec = InputSpec(H, W, "gray", roi=ROI)
    mask = np.zeros((FRAME_H, FRAME_W), np.uint8)
    x, y = INSIDE
    mask[y:y + DEFECT, x:x + DEFECT] = 255
    m = prepare_mask(mask, spec, (FRAME_H, FRAME_W))
    assert m.shape == (H, W) and m.dtype == bool
    ys, xs = np.nonzero(m)
    # Source (x, y) -> model ((x - roi_x) / 2, (y - roi_y) / 2).
    assert xs.min() == (x - ROI[0]) // 2 and ys.min() == (y - ROI[1]) // 2 and m.sum() == (DEFECT // 2) ** 2
    # A half-resolution mask is brought to the source size first, then cut by the same ROI.
    half = cv2.resize(mask, (FRAME_W // 2, FRAME_H // 2), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(prepare_mask(half, spec, (FRAME_H, FRAME_W)), m)
    outside = np.zeros_like(mask)
    outside[OUTSIDE[1]:OUTSIDE[1] + DEFECT, OUTSIDE[0]:OUTSIDE[0] + DEFECT] = 255
    assert not prepare_mask(outside, spec, (FRAME_H, FRAME_W)).any()


# ------------------------------------------------------------------------------- a non-square bundle
def make_roi_bundle(out: Path, roi: tuple[int, int, int, int] | None = ROI,
                    tiles: tuple[int, int] | None = None) -> Path:
    """A verified non-square bundle whose golden images are ROI crops of frames, stored prepared
    (as `inspectd train` stores them)."""
    import onnxruntime as ort

    spec = InputSpec(H, W, "gray", roi=roi)
    staging = staging_dir(out)
    (staging / "model.onnx").write_bytes(toy_onnx(H, POOL, width=W))
    (staging / "golden").mkdir()
    good = [prepare(_frame(seed=s), spec) for s in range(3)]
    bad = [prepare(_frame(INSIDE, seed=10 + s), spec) for s in range(2)]
    names: dict[str, list[str]] = {"good": [], "bad": []}
    for kind, images in (("good", good), ("bad", bad)):
        for i, img in enumerate(images):
            rel = f"golden/{kind}_{i:02d}.png"
            cv2.imwrite(str(staging / rel), img)
            names[kind].append(rel)
    sess = ort.InferenceSession(str(staging / "model.onnx"), providers=["CPUExecutionProvider"])
    score = lambda imgs: [float(s) for s in sess.run(["score"], {"images": np.stack(imgs)})[0]]  # noqa: E731
    good_scores, bad_scores = score(good), score(bad)
    mean, std = float(np.mean(good_scores)), max(float(np.std(good_scores)), 1e-4)
    fields = {
        "schema_version": 1, "inspectd_version": "test", "created_utc": "2026-01-01T00:00:00Z",
        "model": {"sha256": sha256_file(staging / "model.onnx"), "opset": 17},
        "backbone": {"name": "toy-avgpool", "taps": [], "tap_channels": [], "tap_strides": [], "weights": "none"},
        "flow": {"steps": 0, "hidden_ratio": 0.0, "kernel_size": 1, "clamp": 1.0, "fusion": "separate",
                 "score_term": "z2"},
        "input": {"height": H, "width": W, "color_mode": "gray", "channels": 1, "resize": "cv2.INTER_AREA",
                  "roi": roi, "tiles": tiles, "tile_overlap": 32 if tiles else None},
        "map": {"height": H // POOL, "width": W // POOL, "smoothing_sigma": 0.0, "display_lo": 0.0,
                "display_hi": 0.25},
        "score": {"reduction": "max", "good_mean": mean, "good_std": std, "good_quantiles": {"0.99": max(good_scores)},
                  "n_good": len(good_scores), "source": "toy"},
        "training": {"fingerprint": "0" * 64, "image_names": [], "image_sha256": [], "holdout_names": [],
                     "n_train": 0, "n_holdout": 0, "skipped": 0, "config": {}, "final_loss": 0.0, "seconds": 0.0,
                     "device": "cpu"},
        "golden": {"good": names["good"], "bad": names["bad"], "good_scores": good_scores, "bad_scores": bad_scores},
        "calibration_images": names["good"],
    }
    write_bundle(staging, out, fields)
    return out


@pytest.fixture(scope="module")
def roi_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_roi_bundle(tmp_path_factory.mktemp("roi") / "bundle", tiles=(1, 2))


@pytest.fixture(scope="module")
def roi_bundle(roi_bundle_path: Path) -> Bundle:
    return load_bundle(roi_bundle_path)


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full camera frames: good/, bad/ (defect inside the ROI), outside/ (defect outside the ROI),
    masks/ (full-frame masks named like the bad frames)."""
    root = tmp_path_factory.mktemp("frames")
    for sub in ("good", "bad", "outside", "masks"):
        (root / sub).mkdir()
    for i in range(12):
        cv2.imwrite(str(root / "good" / f"g{i:02d}.png"), _frame(seed=100 + i))
        cv2.imwrite(str(root / "outside" / f"o{i:02d}.png"), _frame(OUTSIDE, seed=200 + i))
    for i in range(4):
        # Spread inside the ROI; the mask marks exactly the defect.
        x, y = ROI[0] + 8 + 24 * i, ROI[1] + 10 + 8 * (i % 2)
        cv2.imwrite(str(root / "bad" / f"b{i:02d}.png"), _frame((x, y), seed=300 + i))
        mask = np.zeros((FRAME_H, FRAME_W), np.uint8)
        mask[y:y + DEFECT, x:x + DEFECT] = 255
        cv2.imwrite(str(root / "masks" / f"b{i:02d}.png"), mask)
    return root


def test_manifest_records_roi_and_tiles_and_the_spec_carries_the_roi(roi_bundle: Bundle) -> None:
    i = roi_bundle.manifest.input
    assert (i.height, i.width) == (H, W) and i.roi == ROI and i.tiles == (1, 2) and i.tile_overlap == 32
    assert roi_bundle.input_spec == InputSpec(H, W, "gray", roi=ROI) and roi_bundle.roi == ROI
    assert roi_bundle.map_shape == (H // POOL, W // POOL)
    raw = json.loads((roi_bundle.path / "manifest.json").read_text())
    assert raw["input"]["roi"] == list(ROI) and raw["input"]["tiles"] == [1, 2]
    assert read_bundle_roi(roi_bundle.path) == ROI


def test_bundles_without_the_new_fields_still_load(tmp_path: Path, roi_bundle_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(roi_bundle_path, old)
    raw = json.loads((old / "manifest.json").read_text())
    for key in ("roi", "tiles", "tile_overlap"):
        del raw["input"][key]
    (old / "manifest.json").write_text(json.dumps(raw))
    b = load_bundle(old)
    assert b.roi is None and b.manifest.input.tiles is None and b.input_spec == InputSpec(H, W, "gray")
    assert read_bundle_roi(old) is None


@pytest.mark.parametrize("field,value,why", [("roi", [0, 0, 0, 5], "w,h > 0"), ("roi", [1, 2, 3], "Field required"),
                                             ("tiles", [0, 2], "1..8"), ("tile_overlap", -1, "greater than or equal to 0")])
def test_a_bad_roi_or_tiling_in_the_manifest_is_refused_in_one_line(tmp_path: Path, roi_bundle_path: Path,
                                                                    field: str, value: Any, why: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(roi_bundle_path, bad)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["input"][field] = value
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=rf"field input\.{field}.*{why}") as info:
        load_bundle(bad)
    assert "\n" not in str(info.value)


def test_a_defect_outside_the_roi_scores_like_a_good_frame(roi_bundle: Bundle) -> None:
    spec = roi_bundle.input_spec
    with OnnxRuntimeBackend(roi_bundle) as backend:
        def score(frame: np.ndarray) -> float:
            return float(roi_bundle.normalize(float(backend.infer(prepare(frame, spec)[None])[0][0])))

        good = [score(_frame(seed=s)) for s in range(50, 56)]
        outside = [score(_frame(OUTSIDE, seed=s)) for s in range(50, 56)]
        inside = [score(_frame(INSIDE, seed=s)) for s in range(50, 56)]
        whole = InputSpec(H, W, "gray")  # the same frames without the ROI: the outside defect shows
        whole_outside = [float(roi_bundle.normalize(float(backend.infer(prepare(_frame(OUTSIDE, seed=s), whole)[None])[0][0])))
                         for s in range(50, 56)]
    assert max(outside) < max(good) + 3 and min(inside) > max(good) + 20
    assert min(whole_outside) > max(good) + 20   # so "outside" only looks good because of the crop


def test_eval_crops_images_and_masks_by_the_bundle_roi(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                       roi_bundle_path: Path, frames: Path) -> None:
    from inspectd.cli import main

    out = tmp_path / "report"
    code = main(["eval", "--bundle", str(roi_bundle_path), "--good", str(frames / "good"),
                 "--bad", str(frames / "bad"), "--masks", str(frames / "masks"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["n_good"] == 12 and report["n_bad"] == 4 and report["skipped"] == 0
    assert report["image_auroc"] == 1.0
    # Masks cut by the same ROI: the map is hot where the mask says (0.9996 here; masks resized
    # without the crop land elsewhere and give 0.94).
    assert report["pixel_auroc"] > 0.99 and report["pixel_images"] == 16
    # Overlays in the model's frame and, through the ROI, on the whole camera frame.
    small = cv2.imread(str(out / "overlays" / "best-bad-0-b00.png"))
    frame = cv2.imread(str(next((out / "overlays").glob("best-bad-0-*-frame.png"))))
    assert small.shape == (H, W, 3) and frame.shape == (FRAME_H, FRAME_W, 3)
    x, y, w, h = ROI
    inside, outside = frame[y + 2:y + h - 2, x + 2:x + w - 2], frame[y + h + 2:, :]
    # The defect's heat lies inside the ROI; outside it the frame is the plain grey image.
    assert (inside.max(axis=2).astype(int) - inside.min(axis=2)).max() > 20
    assert (outside.max(axis=2).astype(int) - outside.min(axis=2)).max() == 0
    # Defects outside the ROI are not seen: as bad images they rank like good ones.
    code = main(["eval", "--bundle", str(roi_bundle_path), "--good", str(frames / "good"),
                 "--bad", str(frames / "outside"), "--out", str(tmp_path / "r2")])
    assert code == 0
    assert 0.2 < json.loads((tmp_path / "r2" / "report.json").read_text())["image_auroc"] < 0.8


def test_calibrate_parity_and_bench_use_the_bundle_roi(tmp_path: Path, roi_bundle: Bundle, frames: Path) -> None:
    from inspectd.calibration.calibrate import CalibrationRequest, calibrate
    from inspectd.engines.runtime.bench import sample_frame, sample_inputs
    from inspectd.engines.runtime.parity import parity_gate

    good = tmp_path / "calib"
    shutil.copytree(frames / "good", good)
    res = calibrate(CalibrationRequest(bundle=roi_bundle.path, good=good, line="L1", config=tmp_path / "none.yaml",
                                       target_false_reject=0.25, bad=frames / "bad", report_dir=tmp_path / "rep",
                                       write_config=False), progress_stream=open("/dev/null", "w"))
    # Scored through the bundle's ROI: the same numbers as prepare() on each frame by hand.
    with OnnxRuntimeBackend(roi_bundle) as backend:
        by_hand = [float(roi_bundle.normalize(float(backend.infer(
            prepare(read_image(p, "gray"), roi_bundle.input_spec)[None])[0][0]))) for p in sorted(good.iterdir())]
        # The golden images are stored already cropped: the gate scores them as they are.
        report = parity_gate(backend, roi_bundle, threshold=res.report["threshold"])
    assert np.allclose(res.good_scores, by_hand) and res.report["roc_auc"] == 1.0
    assert report.passed and len(report.rows) == 5 and [r.verdict for r in report.rows] == ["OK"] * 3 + ["NG"] * 2
    assert sample_inputs(roi_bundle, 2).shape == (2, H, W, 1)
    frame = sample_frame(roi_bundle, (64, 48))          # grown to hold the ROI
    assert frame.shape == (max(48, ROI[1] + ROI[3]), max(64, ROI[0] + ROI[2]))
    golden = load_stored(roi_bundle.golden_images()[0][0], roi_bundle.input_spec)
    # The golden image pasted at the ROI: preparing the frame gives (nearly) it back.
    assert np.abs(prepare(frame, roi_bundle.input_spec).astype(int) - golden.astype(int)).mean() < 3
    with pytest.raises(DataError, match="stored image is 32x64x1, the model takes 64x32x1"):
        load_stored(roi_bundle.golden_images()[0][0], InputSpec(W, H, "gray"))


# ------------------------------------------------------------------------------------------- daemon
def _config(bundle: Path, frames_dir: Path, roi: list[int] | None) -> dict[str, Any]:
    line: dict[str, Any] = {"id": "L1", "bundle": str(bundle), "threshold": 10.0, "backends": ["onnxruntime"],
                            "latency_budget_ms": 5000, "queue_size": 64,
                            "source": {"type": "replay", "path": str(frames_dir)}}
    if roi is not None:
        line["roi"] = roi
    return {"zmq": {"endpoint": "tcp://127.0.0.1:0"}, "lines": [line]}


def test_the_daemon_applies_the_bundle_roi_without_the_line_repeating_it(tmp_path: Path, roi_bundle: Bundle,
                                                                         frames: Path) -> None:
    replay = tmp_path / "replay"
    (replay / "good").mkdir(parents=True)
    for p in sorted((frames / "outside").iterdir())[:4]:
        shutil.copy(p, replay / "good" / p.name)      # defects outside the ROI: OK
    shutil.copytree(frames / "bad", replay / "bad")   # defects inside: NG
    cfg = config_from_dict(_config(roi_bundle.path, replay, None)).lines[0]
    settings = line_settings(cfg)   # the daemon's own config -> settings path
    assert cfg.roi is None and settings.roi is None
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("L1", replay), roi_bundle, LineThreshold("L1", value=10.0), out).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = out.wait_for(8)
    finally:
        pipe.stop(timeout_s=3.0)
    by_label = {lab: [v.verdict for v in verdicts if v.meta.get("label") == lab] for lab in ("good", "bad")}
    assert by_label == {"good": ["OK"] * 4, "bad": ["NG"] * 4}, [(v.verdict, v.error) for v in verdicts]
    assert all(v.error is None for v in verdicts)


def test_the_daemon_refuses_a_line_roi_that_disagrees_with_its_bundle(tmp_path: Path, roi_bundle_path: Path,
                                                                       frames: Path) -> None:
    whole = make_roi_bundle(tmp_path / "whole", roi=None)
    cases = [(roi_bundle_path, [0, 0, 128, 64], r"lines\[0\]\.roi \(line L1\): \[0, 0, 128, 64\] differs from the "
                                                  r"ROI \[40, 20, 128, 64\] the bundle .* was trained with"),
             (whole, list(ROI), r"lines\[0\]\.roi \(line L1\): \[40, 20, 128, 64\] but the bundle .* was trained "
                                r"on whole frames \(no ROI\); retrain with --roi 40,20,128,64")]
    for bundle, roi, why in cases:
        daemon = Daemon(config_from_dict(_config(bundle, frames, roi)))
        with pytest.raises(ConfigError, match=why) as info:
            daemon.build()
        assert "\n" not in str(info.value) and not daemon.lines
    # The same ROI as the bundle's is accepted (the line may repeat it).
    check_line_roi(list(ROI), ROI, "x", roi_bundle_path)
    check_line_roi(None, ROI, "x", roi_bundle_path)
    check_line_roi(None, None, "x", whole)


def test_check_config_refuses_a_line_roi_that_disagrees_with_its_bundle(tmp_path: Path, roi_bundle_path: Path,
                                                                        frames: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(_config(roi_bundle_path, frames, [40, 20, 128, 60])))
    proc = subprocess.run([sys.executable, "-m", "inspectd.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert f"{path}: lines[0].roi: [40, 20, 128, 60] differs from the ROI [40, 20, 128, 64]" in err[0]
    # No line ROI, or the bundle's own: accepted.
    for roi in (None, list(ROI)):
        path.write_text(yaml.safe_dump(_config(roi_bundle_path, frames, roi)))
        assert load_config(path, validate_paths=True).lines[0].roi == (tuple(roi) if roi else None)


# ------------------------------------------------------------------------------------------- train CLI
def _train_cli(*argv: str, cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "inspectd.cli", "train", *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("roi,why", [("1,2,3", "--roi: expected x,y,w,h"), ("=-1,0,5,5", "--roi: expected x,y >= 0"),
                                     ("0,0,0,5", "w,h > 0"), ("a,b,c,d", "--roi: expected x,y,w,h"),
                                     ("150,0,100,50", r"--roi 150,0,100,50 lies outside the 200x120 training image")])
def test_train_refuses_a_bad_roi_in_one_line(tmp_path: Path, frames: Path, roi: str, why: str) -> None:
    flag = ["--roi" + roi] if roi.startswith("=") else ["--roi", roi]
    code, err = _train_cli("--good", str(frames / "good"), "--out", str(tmp_path / "b"), *flag, cwd=tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("inspectd train: error: ") and re.search(why, err[0]), err[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flag,value,why", [
    ("--image-size", "0x256", "--image-size: a side must be positive, got 0"),
    ("--image-size", "640x", "--image-size: expected S"),
    ("--image-size", "250", "--image-size: a side must be a multiple of 32"),
    ("--tiles", "9x1", "--tiles: rows and columns must each be 1..8"),
])
def test_train_refuses_a_bad_image_size_or_tiling_in_one_line(tmp_path: Path, frames: Path, flag: str, value: str,
                                                              why: str) -> None:
    code, err = _train_cli("--good", str(frames / "good"), "--out", str(tmp_path / "b"), flag, value, cwd=tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("inspectd train: error: ") and why in err[0], err[0]
    assert not (tmp_path / "b").exists()


def test_check_config_with_a_line_roi_names_an_unreadable_manifest(tmp_path: Path, frames: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{not json")
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(_config(bundle, frames, None)))
    load_config(path, validate_paths=True)          # no line ROI: nothing to compare, as before
    path.write_text(yaml.safe_dump(_config(bundle, frames, list(ROI))))
    with pytest.raises(ConfigError, match=r"lines\[0\]\.roi: cannot compare with the bundle's ROI: .*manifest.json: "
                                          r"cannot read input.roi") as info:
        load_config(path, validate_paths=True)
    assert "\n" not in str(info.value)
