"""Parity gate: a backend serves only if it matches ONNX Runtime CPU on the golden images.

`PerturbedBackend` below is a TEST DOUBLE: the real ONNX Runtime backend with its outputs
deliberately shifted, standing in for a miscompiled GPU engine (no GPU here)."""

from __future__ import annotations

import json

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.runtime import BACKENDS, open_backend
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import (MAP_TOLERANCE, SCORE_TOLERANCE, ParityError, ParityReport,
                                             make_gate, parity_gate)
from tests.engines.test_runtime_toybundle import make_toy_bundle


class PerturbedBackend(OnnxRuntimeBackend):
    """TEST DOUBLE: ONNX Runtime with raw scores shifted by `shift_std` good-score standard
    deviations (on the images selected by `only_bad`), maps optionally scaled."""

    name = "perturbed-test-double"

    def __init__(self, bundle: Bundle, shift_std: float = 0.0, map_scale: float = 1.0, only_bad: bool = False,
                 **kw: object) -> None:
        super().__init__(bundle, **kw)  # type: ignore[arg-type]
        self.shift = shift_std * bundle.manifest.score.good_std
        self.map_scale, self.only_bad = map_scale, only_bad

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = super().infer(batch)
        if self.only_bad:
            # Bad toy images are the bright ones: shift only those (a flip at a high threshold).
            mask = (batch.reshape(len(batch), -1).max(axis=1) > 200).astype(np.float32)
            return scores - mask * self.shift, maps
        return scores + np.float32(self.shift), maps * np.float32(self.map_scale)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_toy_bundle(tmp_path_factory.mktemp("parity") / "toy"))


def test_reference_passes_against_itself(toy: Bundle) -> None:
    with OnnxRuntimeBackend(toy) as backend:
        report = parity_gate(backend, toy, threshold=5.0)
    assert report.passed and len(report.rows) == 5
    assert report.max_score_diff == 0.0 and report.max_map_diff == 0.0
    assert [r.kind for r in report.rows] == ["good"] * 3 + ["bad"] * 2
    assert all(r.verdict == r.reference_verdict for r in report.rows)
    assert {r.verdict for r in report.rows if r.kind == "bad"} == {"NG"}
    assert f"tolerance {SCORE_TOLERANCE}" in report.table() and report.table().splitlines()[-1].startswith("PASS")


def test_small_shift_within_tolerance_passes(toy: Bundle) -> None:
    with PerturbedBackend(toy, shift_std=SCORE_TOLERANCE / 2) as backend:
        report = parity_gate(backend, toy, threshold=5.0)
    assert report.passed
    assert report.max_score_diff == pytest.approx(SCORE_TOLERANCE / 2, rel=1e-3)


def test_score_shift_is_refused_with_the_numbers(toy: Bundle) -> None:
    with PerturbedBackend(toy, shift_std=0.3) as backend, pytest.raises(ParityError) as err:
        parity_gate(backend, toy)
    msg = str(err.value)
    assert "max score diff 0.3000 (tolerance 0.05)" in msg
    assert "worst: golden/" in msg and "vs reference" in msg
    report = err.value.report
    assert report is not None and not report.passed and len(report.rows) == 5
    assert report.max_score_diff == pytest.approx(0.3, rel=1e-3)


def test_map_difference_is_refused(toy: Bundle) -> None:
    with PerturbedBackend(toy, map_scale=1.5) as backend, pytest.raises(ParityError) as err:
        parity_gate(backend, toy)
    assert err.value.report is not None and err.value.report.max_map_diff > MAP_TOLERANCE
    assert f"(tolerance {MAP_TOLERANCE})" in str(err.value)


def test_verdict_flip_at_the_threshold_is_refused(toy: Bundle) -> None:
    """Scores within a loose tolerance but one bad image falls below the threshold: refused."""
    with OnnxRuntimeBackend(toy) as ref:
        bad_ref = float(toy.normalize(float(ref.infer(_prepared(toy, toy.golden_images()[1][0]))[0][0])))
    threshold = bad_ref - 0.1
    with PerturbedBackend(toy, shift_std=0.2, only_bad=True) as backend:
        parity_gate(backend, toy, threshold=None, tolerance=1.0)  # no threshold: passes on scores alone
        with pytest.raises(ParityError, match=r"verdict mismatches [12] at threshold") as err:
            parity_gate(backend, toy, threshold=threshold, tolerance=1.0)
    assert err.value.report is not None
    assert ("NG", "OK") in {(r.reference_verdict, r.verdict) for r in err.value.report.rows}
    assert "verdict OK vs NG" in str(err.value)


def test_nan_scores_are_refused(toy: Bundle) -> None:
    with PerturbedBackend(toy, shift_std=float("nan")) as backend, pytest.raises(ParityError, match="inf"):
        parity_gate(backend, toy, threshold=5.0)


class OneImageBackend(OnnxRuntimeBackend):
    """TEST DOUBLE: ONNX Runtime whose raw score (and optionally map) on its `call`-th inference
    (1-based; the gate scores one golden image per call) is replaced by `score` / `map_value`: a
    reference or candidate that goes non-finite or far off on exactly one image."""

    name = "one-image-test-double"

    def __init__(self, bundle: Bundle, call: int = 2, score: float | None = None, map_value: float | None = None,
                 **kw: object) -> None:
        super().__init__(bundle, **kw)  # type: ignore[arg-type]
        self.call, self.score, self.map_value, self.calls = call, score, map_value, 0

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = super().infer(batch)
        self.calls += 1
        if self.calls == self.call:
            if self.score is not None:
                scores = np.full_like(scores, self.score)
            if self.map_value is not None:
                maps = np.full_like(maps, self.map_value)
        return scores, maps


@pytest.mark.parametrize("ref_score", [float("nan"), float("inf")])
def test_non_finite_reference_score_on_one_image_fails_the_gate_naming_it(toy: Bundle, ref_score: float) -> None:
    """The reference goes NaN/inf on the 2nd golden image while the candidate is far off there:
    NaN used to slip through Python's max (it only wins when first) and the gate passed."""
    with OneImageBackend(toy, call=2, score=ref_score) as reference, \
            OneImageBackend(toy, call=2, score=100.0) as candidate, pytest.raises(ParityError) as err:
        parity_gate(candidate, toy, threshold=5.0, reference=reference)
    report = err.value.report
    assert report is not None and not report.passed
    assert report.max_score_diff == float("inf") and report.rows[1].score_diff == float("inf")
    assert "worst: golden/good_01.png (good)" in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("non-finite score or map on 1 image(s): golden/good_01.png")
    as_json = json.loads(json.dumps(report.as_dict(), allow_nan=False))  # check-engine --json: valid JSON
    assert as_json["max_score_diff"] is None and as_json["passed"] is False


def test_non_finite_reference_map_on_one_image_fails_the_gate(toy: Bundle) -> None:
    with OneImageBackend(toy, call=2, map_value=float("nan")) as reference, OnnxRuntimeBackend(toy) as candidate, \
            pytest.raises(ParityError) as err:
        parity_gate(candidate, toy, reference=reference)
    assert err.value.report is not None and err.value.report.max_map_diff == float("inf")
    assert "worst: golden/good_01.png" in str(err.value)


def test_a_nan_row_anywhere_fails_the_report(toy: Bundle) -> None:
    """max over the rows is not order-dependent: a NaN difference (a row built by hand) in any
    position counts as infinite."""
    with OnnxRuntimeBackend(toy) as backend:
        rows = parity_gate(backend, toy, threshold=5.0).rows
    for i in range(len(rows)):
        report = ParityReport(backend="x", bundle_id=toy.bundle_id, threshold=5.0,
                              score_tolerance=SCORE_TOLERANCE, map_tolerance=MAP_TOLERANCE,
                              rows=[replace(r, score_diff=float("nan") if j == i else r.score_diff,
                                            map_diff=float("nan") if j == i else r.map_diff)
                                    for j, r in enumerate(rows)])
        assert not report.passed and report.max_score_diff == float("inf") and report.max_map_diff == float("inf")
        assert report.worst is report.rows[i]


class CrashingBackend(OnnxRuntimeBackend):
    """TEST DOUBLE: a backend whose inference raises a non-inspectd error (like a CUDA fault)."""

    name = "crashing-test-double"

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_backend_crashing_on_a_golden_image_is_refused(toy: Bundle) -> None:
    with CrashingBackend(toy) as backend, pytest.raises(ParityError) as err:
        parity_gate(backend, toy)
    assert str(err.value) == ("backend crashing-test-double failed on golden image good_00.png: "
                              "RuntimeError: CUDA error: an illegal memory access was encountered")


def test_bundle_without_golden_or_calibration_images_cannot_be_verified(tmp_path: Path, toy: Bundle) -> None:
    stripped = Bundle(path=toy.path, manifest=toy.manifest.model_copy(
        update={"golden": toy.manifest.golden.model_copy(update={"good": [], "bad": []}),
                "calibration_images": []}))
    with OnnxRuntimeBackend(stripped) as backend, pytest.raises(ParityError, match="no golden or calibration"):
        parity_gate(backend, stripped)


def unavailable_reason() -> str | None:
    """Factory hook: for open_backend this test module is the test double's backend module."""
    return None


CLOSED: list[str] = []


class ClosingPerturbedBackend(PerturbedBackend):
    """TEST DOUBLE (as above) that records its close() calls."""

    def close(self) -> None:
        CLOSED.append(self.name)
        super().close()


def test_open_backend_gate_falls_back_to_the_next_backend(toy: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that fails the gate is refused, reported and closed; the next one serves."""
    monkeypatch.setitem(BACKENDS, "perturbed", (__name__, "ClosingPerturbedBackend"))
    CLOSED.clear()
    fallbacks: list[tuple[str, str]] = []
    backend, info = open_backend(toy, preference=["perturbed", "onnxruntime"],
                                 options={"perturbed": {"shift_std": 1.0}}, gate=make_gate(toy, threshold=5.0),
                                 on_fallback=lambda n, why: fallbacks.append((n, why)))
    try:
        assert info.backend == "onnxruntime" and backend.name == "onnxruntime"
        assert "max score diff 1.0000 (tolerance 0.05)" in info.skipped["perturbed"]
        assert [n for n, _ in fallbacks] == ["perturbed"] and CLOSED == ["perturbed-test-double"]
    finally:
        backend.close()


def test_open_backend_gate_keeps_a_matching_backend(toy: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "perturbed", (__name__, "PerturbedBackend"))
    reports = []
    backend, info = open_backend(toy, preference=["perturbed", "onnxruntime"],
                                 options={"perturbed": {"shift_std": 0.0}},
                                 gate=make_gate(toy, threshold=5.0, on_report=reports.append))
    try:
        assert info.backend == "perturbed" and not info.skipped
        assert len(reports) == 1 and reports[0].passed
    finally:
        backend.close()


def _prepared(bundle: Bundle, path: Path) -> np.ndarray:
    from inspectd.engines.preprocess import load_prepared

    return load_prepared(path, bundle.input_spec)[None]
