"""DriftWatch: near zero on the calibration distribution, high when the line shifts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from inspectd.stats import DriftWatch, ks_statistic
from inspectd.errors import ConfigError


def test_ks_statistic_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=200), 1)
    b = np.round(rng.normal(0.3, 1.2, size=150), 1)
    grid = np.union1d(a, b)
    brute = max(abs((a <= x).mean() - (b <= x).mean()) for x in grid)
    assert ks_statistic(a, b) == pytest.approx(brute, abs=1e-12)
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([0, 1], [5, 6]) == 1.0


def test_stays_near_zero_on_the_calibration_distribution() -> None:
    rng = np.random.default_rng(1)
    watch = DriftWatch(rng.normal(size=2000), window=500, min_samples=50)
    values = []
    for s in rng.normal(size=3000):
        watch.update(s)
        if watch.value() is not None:
            values.append(watch.value())
    assert max(values[-50:]) < 0.15 and np.median(values) < 0.1


def test_rises_when_the_score_distribution_shifts() -> None:
    rng = np.random.default_rng(2)
    watch = DriftWatch(rng.normal(size=2000), window=500, min_samples=50, every=10)
    for s in rng.normal(size=600):
        watch.update(s)
    before = watch.value()
    for s in rng.normal(2.0, 1.0, size=600):  # lighting changed: scores up by 2 sigma
        watch.update(s)
    after = watch.value()
    assert before is not None and before < 0.15
    assert after is not None and after > 0.5


def test_none_until_min_samples_and_non_finite_ignored() -> None:
    watch = DriftWatch(np.arange(100.0), window=100, min_samples=20)
    for s in range(19):
        watch.update(float(s))
    watch.update(float("nan"))
    assert watch.value() is None and watch.count == 19
    watch.update(19.0)
    assert watch.value() is not None
    watch.reset()
    assert watch.value() is None and watch.count == 0


def test_ks_recomputed_at_most_every_n_updates() -> None:
    ref = np.random.default_rng(3).normal(size=500)
    watch = DriftWatch(ref, window=200, min_samples=10, every=50)
    for _ in range(10):
        watch.update(0.0)
    first = watch.value()
    for _ in range(49):
        watch.update(100.0)  # far off, but not yet recomputed
    assert watch.value() == first
    watch.update(100.0)
    assert watch.value() != first


def test_concurrent_update_and_read() -> None:
    watch = DriftWatch(np.random.default_rng(4).normal(size=500), window=300, min_samples=10, every=5)
    stop = threading.Event()
    seen: list[float | None] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(watch.value())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for s in np.random.default_rng(5).normal(size=5000):
            watch.update(float(s))
    finally:
        stop.set()
        t.join(timeout=5)
    assert not t.is_alive()
    assert all(v is None or 0.0 <= v <= 1.0 for v in seen)


def test_from_calibration_file_uses_ok_part_of_good_scores(tmp_path: Path) -> None:
    good = list(np.linspace(-2, 4, 601))
    path = tmp_path / "line1.calibration.json"
    path.write_text(json.dumps({"threshold": 3.0, "bundle_id": "abc", "good_scores": good}))
    watch = DriftWatch.from_calibration(path, window=200, min_samples=20)
    # The window only ever holds OK scores (<= threshold), so a line exactly like calibration, cut
    # at the threshold, must read ~0.
    for s in np.random.default_rng(6).choice([g for g in good if g <= 3.0], size=200):
        watch.update(float(s))
    assert watch.value() is not None and watch.value() < 0.15
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="good_scores"):
        DriftWatch.from_calibration(tmp_path / "bad.json")


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ConfigError):
        DriftWatch([0.0, 1.0], window=10, min_samples=20)


def test_calibration_runtime_modules_never_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, inspectd.stats, inspectd.calibration.threshold, "
            "inspectd.calibration.config_update, inspectd.calibration.calibrate, inspectd.calibration.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
