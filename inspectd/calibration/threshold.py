"""Line thresholds from scores: a distribution-free false-reject bound from good parts, and the
escape-rate / ROC trade-off from defective parts. Pure numpy + math (no scipy, no torch).

Convention used everywhere in inspectd: a part is NG iff its normalized score is > threshold
(a score equal to the threshold is OK).

The false-reject bound
----------------------
Let the n good calibration scores X_1..X_n be i.i.d. from the line's good-score distribution F,
and let the threshold t be the k-th largest of them, t = X_(n-k+1). The realized false-reject
rate of the line is p(t) = P(X > t) = 1 - F(t).

With U_i = 1 - F(X_i) (uniform on [0, 1] for a continuous F), the k-th largest score maps to the
k-th smallest U, so p(t) = U_(k). The event {U_(k) > q} means "fewer than k of the n uniforms
fall in [0, q]", hence

    P(p(t) > q) = P(Bin(n, q) <= k - 1).

We want P(p(t) > target) <= alpha (alpha = 1 - confidence = 0.05), i.e.

    P(Bin(n, target) <= k - 1) <= alpha.

The left side grows with k, and a larger k means a lower threshold, so the smallest threshold
with the guarantee uses the LARGEST such k. If even k = 1 fails, i.e. (1 - target)^n > alpha,
no order statistic gives the guarantee and we need n >= ln(alpha) / ln(1 - target) good images
(598 for 0.5% at 95%). Ties or a discrete F only make P(X > t) smaller, so the bound stays valid.
The reported `bound` is the q at which P(Bin(n, q) <= k - 1) = alpha: the one-sided 95%
Clopper-Pearson upper limit of the false-reject rate given the k - 1 good scores above t; it is
<= target by construction.

The escape-target threshold is the mirror image on the m bad scores B_(1) <= ... <= B_(m):
a threshold just below B_(j) passes (escapes) at most the j - 1 smaller ones, and
P(escape rate > e) <= P(Bin(m, e) <= j - 1); the HIGHEST such threshold uses the largest j.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inspectd.stats import roc_auc as rank_auc
from inspectd.errors import ConfigError, DataError

DEFAULT_CONFIDENCE = 0.95


# ---------------------------------------------------------------- binomial helpers


def binom_cdf(x: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= x): terms in log space, then summed (float64-exact here; no scipy)."""
    if x < 0:
        return 0.0
    if x >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return float(min(1.0, np.exp(_log_cdf_terms(n, p, x)).sum()))


def _log_cdf_terms(n: int, p: float, x: int) -> np.ndarray:
    """log P(Bin(n, p) = i) for i = 0..x."""
    j = np.arange(1, x + 1, dtype=np.float64)
    # log C(n, i) = sum_{j<=i} log((n - j + 1) / j): vectorized, no lgamma loop.
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - j + 1.0) / j))])
    i = np.arange(x + 1, dtype=np.float64)
    return log_choose + i * math.log(p) + (n - i) * math.log1p(-p)


def binom_cdf_all(n: int, p: float) -> np.ndarray:
    """P(Bin(n, p) <= x) for x = 0..n (one pass; used to pick the order statistic)."""
    if p <= 0.0:
        return np.ones(n + 1)
    if p >= 1.0:
        out = np.zeros(n + 1)
        out[-1] = 1.0
        return out
    return np.minimum(np.cumsum(np.exp(_log_cdf_terms(n, p, n))), 1.0)


def _solve_p(f: Any, target: float) -> float:
    """The p in [0, 1] where the decreasing function f(p) crosses `target` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(x: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided (Clopper-Pearson) interval for a binomial proportion x / n."""
    if n <= 0:
        raise DataError("a confidence interval needs at least one observation")
    a = (1.0 - confidence) / 2.0
    lower = 0.0 if x == 0 else _solve_upper_tail(x, n, a)
    upper = 1.0 if x >= n else _solve_p(lambda p: binom_cdf(x, n, p), a)
    return lower, upper


def _solve_upper_tail(x: int, n: int, a: float) -> float:
    # Lower limit L: P(Bin(n, L) >= x) = a; that tail grows with p, so bisect on its complement.
    return _solve_p(lambda p: binom_cdf(x - 1, n, p), 1.0 - a)


def upper_bound_one_sided(x: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper limit: the p with P(Bin(n, p) <= x) = 1 - confidence."""
    return 1.0 if x >= n else _solve_p(lambda p: binom_cdf(x, n, p), 1.0 - confidence)


def needed_samples(target: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Smallest n for which the largest score bounds a `target` rate: (1 - target)^n <= alpha."""
    check_rate(target, "target")
    alpha = 1.0 - confidence
    n = max(1, math.ceil(math.log(alpha) / math.log1p(-target)))
    # Guard the float rounding of the closed form on both sides.
    while n > 1 and (1.0 - target) ** (n - 1) <= alpha:
        n -= 1
    while (1.0 - target) ** n > alpha:
        n += 1
    return n


def check_rate(value: float, name: str, upper: float = 0.5) -> float:
    """A rate strictly inside (0, upper); ConfigError with the value otherwise."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value < upper:
        raise ConfigError(f"{name} {value!r} is outside (0, {upper:.0%})")
    return float(value)


def parse_rate(text: str, name: str = "rate", upper: float = 0.5) -> float:
    """'0.5%' -> 0.005, '0.005' -> 0.005; ConfigError for anything else or outside (0, upper)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not a rate (write e.g. 0.5% or 0.005)") from None
    if not math.isfinite(value) or not 0.0 < value < upper:
        raise ConfigError(f"{name} {s} is outside (0, {upper:.0%})")
    return value


def _scores(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise DataError(f"no {what} scores")
    bad = ~np.isfinite(a)
    if bad.any():
        raise DataError(f"{int(bad.sum())} of {a.size} {what} scores are not finite (NaN/inf)")
    return a


# ---------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class FalseRejectThreshold:
    threshold: float            # NG iff normalized score > threshold
    k: int                      # threshold = k-th largest good score
    n_good: int
    target: float               # false-reject target
    confidence: float
    bound: float                # one-sided upper confidence limit of the false-reject rate (<= target)
    good_above: int             # good calibration scores > threshold (in-sample false rejects)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def false_reject_threshold(good_scores: Any, target: float,
                           confidence: float = DEFAULT_CONFIDENCE) -> FalseRejectThreshold:
    """Smallest threshold whose false-reject rate is below `target` with `confidence`
    (order statistic, distribution-free; see the module docstring for the math).
    DataError saying how many good images are needed when there are too few."""
    check_rate(target, "false-reject target")
    good = _scores(good_scores, "good")
    n = good.size
    alpha = 1.0 - confidence
    cdf = binom_cdf_all(n, target)           # cdf[x] = P(Bin(n, target) <= x)
    ok = np.nonzero(cdf[:n] <= alpha)[0]     # x = k - 1 values that keep the guarantee
    if ok.size == 0:
        need = needed_samples(target, confidence)
        raise DataError(f"{n} good images cannot support a false-reject target of {target:.3%} at "
                        f"{confidence:.0%} confidence: need at least {need} good images "
                        f"(or a target of at least {1.0 - alpha ** (1.0 / n):.3%} with these {n})")
    k = int(ok[-1]) + 1
    t = float(np.sort(good)[::-1][k - 1])
    above = int((good > t).sum())
    return FalseRejectThreshold(threshold=t, k=k, n_good=n, target=target, confidence=confidence,
                                bound=upper_bound_one_sided(k - 1, n, confidence), good_above=above)


@dataclass(frozen=True)
class EscapeThreshold:
    target: float
    confidence: float
    n_bad: int
    # Highest threshold whose escape rate is <= target with `confidence`; None if too few bad images.
    threshold: float | None
    needed_bad: int             # bad images the confident version needs
    # Highest threshold whose in-sample escape rate is <= target (point estimate, no confidence).
    empirical_threshold: float
    false_reject_at_threshold: float | None      # good-set rate at `threshold` (point estimate)
    false_reject_at_empirical: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def escape_threshold(bad_scores: Any, target: float, good_scores: Any = None,
                     confidence: float = DEFAULT_CONFIDENCE) -> EscapeThreshold:
    """The threshold that would meet an escape (NG passed as OK) target instead, and what it
    costs in false rejects on the good set, so the trade-off is visible."""
    check_rate(target, "escape target", upper=1.0)
    bad = np.sort(_scores(bad_scores, "bad"))
    m = bad.size
    alpha = 1.0 - confidence
    cdf = binom_cdf_all(m, target)
    ok = np.nonzero(cdf[:m] <= alpha)[0]
    confident: float | None = None
    if ok.size:
        j = int(ok[-1]) + 1
        confident = float(np.nextafter(bad[j - 1], -np.inf))   # just below the j-th smallest bad score
    j_emp = min(int(math.floor(target * m)) + 1, m)
    empirical = float(np.nextafter(bad[j_emp - 1], -np.inf))
    good = None if good_scores is None else _scores(good_scores, "good")

    def fr(t: float | None) -> float | None:
        return None if t is None or good is None else float((good > t).mean())

    return EscapeThreshold(target=target, confidence=confidence, n_bad=m, threshold=confident,
                           needed_bad=needed_samples(target, confidence) if target < 0.5 else 1,
                           empirical_threshold=empirical, false_reject_at_threshold=fr(confident),
                           false_reject_at_empirical=fr(empirical))


@dataclass(frozen=True)
class EscapeRate:
    threshold: float
    escapes: int
    n_bad: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def escape_rate(bad_scores: Any, threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> EscapeRate:
    """Fraction of bad parts passed as OK (score <= threshold) with a Clopper-Pearson interval."""
    bad = _scores(bad_scores, "bad")
    x = int((bad <= threshold).sum())
    lo, hi = clopper_pearson(x, bad.size, confidence)
    return EscapeRate(threshold=float(threshold), escapes=x, n_bad=bad.size, rate=x / bad.size,
                      ci_low=lo, ci_high=hi, confidence=confidence)


def roc_auc(good_scores: Any, bad_scores: Any) -> float:
    """Image ROC AUC = P(bad score > good score) + P(tie) / 2, after checking the scores."""
    return rank_auc(_scores(good_scores, "good"), _scores(bad_scores, "bad"))
