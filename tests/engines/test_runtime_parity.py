"""Parity gate: a backend serves only if it matches ONNX Runtime CPU on the golden images.

`PerturbedBackend` below is a TEST DOUBLE: the real ONNX Runtime backend with its outputs
deliberately shifted, standing in for a miscompiled GPU engine (no GPU here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.runtime import BACKENDS, open_backend
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import (MAP_TOLERANCE, SCORE_TOLERANCE, ParityError, make_gate,
                                             parity_gate)
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
