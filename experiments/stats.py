"""Intervals over seeds and the verdicts a study draws from them.

Every number a study reports is a mean over its seeds with a 95% Student-t interval
(mean ± t_{0.975, n-1} · s / √n, s the sample standard deviation). A comparison between two SAEs is
made on the interval of their per-seed differences (paired: both were trained on the same data order
for a given seed), and a criterion has three outcomes: it holds (the whole interval is on the good side
of the threshold), it fails (the whole interval is on the bad side), or it is not distinguishable at
this n (the interval straddles the threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from scipy import stats

LEVEL = 0.95
POWER = 0.8
Verdict = Literal["holds", "fails", "not distinguishable"]
NOT_DISTINGUISHABLE: Verdict = "not distinguishable"


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its two-sided Student-t interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    """Sample standard deviation (n - 1 in the denominator)."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 3, missing: str = "–") -> str:
        if math.isnan(self.mean):
            return missing
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_quantile(p: float, df: int) -> float:
    return float(stats.t.ppf(p, df))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and ``level`` t-interval of ``values`` (NaNs are dropped: an eval that did not run)."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval:
    """Interval of the mean of a[s] - b[s] over the seeds s both have (and where both are numbers)."""
    seeds = sorted(set(a) & set(b))
    return mean_interval([a[s] - b[s] for s in seeds], level)


def verdict(interval: Interval, threshold: float = 0.0) -> Verdict:
    """"holds" if the whole interval is at or above ``threshold``, "fails" if it is entirely below,
    "not distinguishable" otherwise (or when there is no interval: fewer than 2 seeds)."""
    if interval.n < 2 or math.isnan(interval.low):
        return NOT_DISTINGUISHABLE
    if interval.low >= threshold:
        return "holds"
    if interval.high < threshold:
        return "fails"
    return NOT_DISTINGUISHABLE


def detectable_difference(sd: float, n: int, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test over ``n`` seeds detects at ``level`` with
    ``power``, given the standard deviation ``sd`` of the per-seed differences:
    (t_{(1+level)/2, n-1} + t_{power, n-1}) · sd / √n (the usual normal-approximation formula with t
    quantiles). NaN below 2 seeds."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return (t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
