"""Threshold math: the order-statistic bound holds at its stated rate on distributions whose CDF
is known exactly, refusal with the needed count, escape/AUC/intervals against independent
exact computations (math.comb / brute force)."""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest

from inspectd.calibration import threshold as th
from inspectd.errors import ConfigError, DataError


def exact_binom_cdf(x: int, n: int, p: float) -> float:
    """Independent reference: exact rational sum with math.comb."""
    q = Fraction(p)
    return float(sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(0, x + 1)))


def binom_quantile(r: int, p: float, prob: float) -> int:
    """Smallest x with P(Bin(r, p) <= x) >= prob (exact, via math.comb)."""
    acc = 0.0
    for x in range(r + 1):
        acc += math.comb(r, x) * p**x * (1 - p) ** (r - x)
        if acc >= prob:
            return x
    return r


@pytest.mark.parametrize("x,n,p", [(0, 598, 0.005), (3, 100, 0.02), (17, 400, 0.05), (0, 10, 0.5), (9, 10, 0.3)])
def test_binomial_cdf_matches_exact_sum(x: int, n: int, p: float) -> None:
    assert th.binom_cdf(x, n, p) == pytest.approx(exact_binom_cdf(x, n, p), rel=1e-10, abs=1e-15)
    assert th.binom_cdf_all(n, p)[x] == pytest.approx(exact_binom_cdf(x, n, p), rel=1e-10, abs=1e-15)


def test_needed_samples_examples_from_the_math() -> None:
    # (1 - t)^n <= 0.05: 0.5% -> 598, 1% -> 299, 5% -> 59
    assert th.needed_samples(0.005) == 598
    assert th.needed_samples(0.01) == 299
    assert th.needed_samples(0.05) == 59
    assert 0.995**598 <= 0.05 < 0.995**597


def test_too_few_good_images_is_refused_with_the_needed_count() -> None:
    good = np.random.default_rng(0).normal(size=597)
    with pytest.raises(DataError, match=r"need at least 598 good images"):
        th.false_reject_threshold(good, 0.005)
    # One more image and k = 1: the threshold is the largest good score.
    good = np.random.default_rng(0).normal(size=598)
    r = th.false_reject_threshold(good, 0.005)
    assert r.k == 1 and r.threshold == good.max() and r.good_above == 0
    assert r.bound <= 0.005


def test_chosen_order_statistic_is_the_smallest_valid_threshold() -> None:
    n, target, alpha = 2000, 0.01, 0.05
    r = th.false_reject_threshold(np.random.default_rng(1).normal(size=n), target)
    assert exact_binom_cdf(r.k - 1, n, target) <= alpha       # the guarantee holds for k
    assert exact_binom_cdf(r.k, n, target) > alpha            # k + 1 (a lower threshold) would break it
    assert r.good_above == r.k - 1
    # bound = the rate at which P(Bin(n, q) <= k - 1) = alpha
    assert exact_binom_cdf(r.k - 1, n, r.bound) == pytest.approx(alpha, rel=1e-6)
    assert r.bound <= target


def _normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


DISTRIBUTIONS = {
    # name: (sampler, exact P(X > t))
    "normal": (lambda rng, n: rng.normal(size=n), _normal_sf),
    "exponential": (lambda rng, n: rng.exponential(2.0, size=n), lambda t: math.exp(-max(t, 0.0) / 2.0)),
    "uniform": (lambda rng, n: rng.uniform(-1, 3, size=n), lambda t: min(max((3.0 - t) / 4.0, 0.0), 1.0)),
}


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n,target", [(600, 0.005), (800, 0.01), (1500, 0.05)])
def test_bound_holds_at_its_stated_rate_across_seeded_repetitions(dist: str, n: int, target: float) -> None:
    """Realized false-reject rate P(good > t), computed exactly from the known CDF, exceeds the
    target in at most ~5% of repetitions. The failure count is Binomial(R, p0) with
    p0 = P(Bin(n, target) <= k - 1) <= 0.05; we assert it lies inside that distribution's central
    99.9% range (so a bound that fails too often -- or is far too loose -- fails the test)."""
    sampler, sf = DISTRIBUTIONS[dist]
    reps = 300
    rng = np.random.default_rng(zlib.crc32(f"{dist}-{n}-{target}".encode()))
    failures = 0
    ks = set()
    for _ in range(reps):
        r = th.false_reject_threshold(sampler(rng, n), target)
        ks.add(r.k)
        failures += sf(r.threshold) > target
    (k,) = ks  # the order statistic depends only on n and target
    p0 = exact_binom_cdf(k - 1, n, target)
    assert p0 <= 0.05
    hi = binom_quantile(reps, p0, 0.9995)
    lo = binom_quantile(reps, p0, 0.0005)
    assert failures <= hi, f"{failures}/{reps} repetitions above target (expected about {p0 * reps:.1f})"
    assert failures >= lo, f"only {failures}/{reps} above target: bound far looser than stated ({p0:.3f})"
    # And in plain terms: never much above the nominal 5%.
    assert failures <= binom_quantile(reps, 0.05, 0.9995)


def test_ties_keep_the_bound_conservative() -> None:
    good = np.repeat(np.arange(100, dtype=float), 10)  # 1000 scores, heavy ties
    r = th.false_reject_threshold(good, 0.01)
    assert r.threshold in good
    assert r.good_above <= r.k - 1          # ties at the threshold are OK, not false rejects
    assert (good > r.threshold).mean() <= 0.01


def test_roc_auc_with_ties_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    good = np.round(rng.normal(size=300), 1)
    bad = np.round(rng.normal(1.5, 1, size=120), 1)
    diff = bad[:, None] - good[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert th.roc_auc(good, bad) == pytest.approx(brute, abs=1e-12)
    assert th.roc_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert th.roc_auc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert th.roc_auc([1.0, 1.0], [1.0]) == 0.5


def test_clopper_pearson_solves_its_defining_equations() -> None:
    for x, n in [(0, 50), (3, 50), (50, 50), (7, 392)]:
        lo, hi = th.clopper_pearson(x, n)
        assert 0.0 <= lo <= x / n <= hi <= 1.0
        if x < n:
            assert exact_binom_cdf(x, n, hi) == pytest.approx(0.025, rel=1e-6)
        else:
            assert hi == 1.0
        if x > 0:
            assert 1 - exact_binom_cdf(x - 1, n, lo) == pytest.approx(0.025, rel=1e-6)
        else:
            assert lo == 0.0


def test_escape_rate_and_escape_threshold_trade_off() -> None:
    rng = np.random.default_rng(4)
    good = rng.normal(size=1000)
    bad = rng.normal(3.0, 1.0, size=400)
    t = th.false_reject_threshold(good, 0.01).threshold
    esc = th.escape_rate(bad, t)
    assert esc.escapes == int((bad <= t).sum()) and esc.rate == esc.escapes / 400
    assert esc.ci_low <= esc.rate <= esc.ci_high

    e = th.escape_threshold(bad, 0.02, good)
    assert e.threshold is not None and e.n_bad == 400
    # The confident escape threshold passes at most the allowed number of bad parts ...
    j_minus_1 = int((bad <= e.threshold).sum())
    assert exact_binom_cdf(j_minus_1, 400, 0.02) <= 0.05
    # ... and is the highest such: the next bad score up would pass one more and break it.
    assert exact_binom_cdf(j_minus_1 + 1, 400, 0.02) > 0.05
    assert int((bad <= e.empirical_threshold).sum()) <= 0.02 * 400
    assert e.empirical_threshold >= e.threshold
    # The cost of meeting the escape target is visible on the good set.
    assert e.false_reject_at_threshold == pytest.approx(float((good > e.threshold).mean()))


def test_escape_threshold_with_too_few_bad_images_gives_point_estimate_only() -> None:
    bad = np.linspace(2, 5, 40)
    e = th.escape_threshold(bad, 0.01)
    assert e.threshold is None and e.needed_bad == 299
    assert (bad <= e.empirical_threshold).sum() == 0


@pytest.mark.parametrize("text,value", [("0.5%", 0.005), ("0.005", 0.005), (" 2% ", 0.02), ("49.9%", 0.499)])
def test_parse_rate_accepts_percent_and_fraction(text: str, value: float) -> None:
    assert th.parse_rate(text, "--target-false-reject") == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "0%", "50%", "0.5", "-1%", "abc", "nan", "inf", ""])
def test_parse_rate_refuses_targets_outside_open_interval(text: str) -> None:
    with pytest.raises(ConfigError, match="--target-false-reject"):
        th.parse_rate(text, "--target-false-reject")


def test_non_finite_scores_are_refused() -> None:
    with pytest.raises(DataError, match="not finite"):
        th.false_reject_threshold(np.r_[np.zeros(700), np.nan], 0.01)
