"""What a study's numbers say: each metric as a mean over seeds with its interval, every SAE against
the study's baseline on the interval of the per-seed difference, and the smallest difference the study
can detect per metric (``experiments.stats``)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from experiments.studies.results import SaeResult, StudyResults
from experiments.stats import Interval, Verdict, detectable_difference, mean_interval, paired_difference, verdict

Getter = Callable[[SaeResult], float]


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    get: Getter
    eval_type: Optional[str] = None
    """The SAEBench eval it comes from (None: this project's analyses)."""
    digits: int = 3


def largest_threshold(rows: list[SaeResult], eval_type: str, prefix: str, suffix: str = "") -> Optional[str]:
    """The metric name with the largest threshold present (e.g. scr_metric_threshold_10)."""
    names = {m for r in rows if eval_type in r.saebench for m in r.saebench[eval_type].metrics
             if m.startswith(prefix) and m.endswith(suffix)}
    if not names:
        return None
    return max(names, key=lambda m: int(m[len(prefix):len(m) - len(suffix)] if suffix else m[len(prefix):]))


def metrics(results: StudyResults) -> list[Metric]:
    """The headline metrics of the study: the analyses' alive fraction, and every requested eval's headline
    numbers (a column even when the eval was not evaluable or failed for every SAE, so it cannot vanish)."""
    rows = results.saes
    scr = largest_threshold(rows, "scr", "scr_metric_threshold_") or "scr_metric_threshold_10"
    tpp = largest_threshold(rows, "tpp", "tpp_threshold_", "_total_metric") or "tpp_threshold_10_total_metric"
    cols = [
        Metric("fve", "FVE (core explained variance)", lambda r: r.metric("core", "explained_variance"), "core"),
        Metric("l0", "L0 (core)", lambda r: r.metric("core", "l0"), "core", digits=1),
        Metric("frac_alive", f"frac alive (fires on {analysis_tokens(rows)} analysis tokens)", lambda r: r.frac_alive),
        Metric("loss_recovered", "loss recovered (core CE score)", lambda r: r.metric("core", "ce_loss_score"), "core"),
        Metric("kl_score", "KL-div score (core)", lambda r: r.metric("core", "kl_div_score"), "core"),
        Metric("scr", f"SCR (top {scr.rsplit('_', 1)[1]})", lambda r: r.metric("scr", scr), "scr"),
        Metric("tpp", f"TPP (top {tpp.split('_')[2]})", lambda r: r.metric("tpp", tpp), "tpp"),
        Metric("sp_top1", "sparse probing top-1", lambda r: r.metric("sparse_probing", "sae_top_1_test_accuracy"),
               "sparse_probing"),
        Metric("sp_all", "sparse probing (all latents)", lambda r: r.metric("sparse_probing", "sae_test_accuracy"),
               "sparse_probing"),
        Metric("absorption", "absorption (mean fraction)",
               lambda r: r.metric("absorption", "mean_absorption_fraction_score"), "absorption"),
        Metric("full_absorption", "full absorption (mean)",
               lambda r: r.metric("absorption", "mean_full_absorption_score"), "absorption"),
        Metric("split_features", "split features (mean)",
               lambda r: r.metric("absorption", "mean_num_split_features"), "absorption", digits=2),
    ]
    requested = set(results.study.evals)
    return [c for c in cols if c.eval_type is None or c.eval_type in requested]


def analysis_tokens(rows: list[SaeResult]) -> str:
    """How many held-out tokens the alive fraction is counted over (the one alive measure of headlines and
    verdicts; training's and SAEBench core's count other tokens)."""
    counts = {r.analysis.firing.get("n_tokens") for r in rows}
    return f"{counts.pop():,}" if len(counts) == 1 and None not in counts else "the"


def outcome_text(rows: list[SaeResult], metric: Metric) -> Optional[str]:
    """What to show instead of a number when no seed has one: the eval's status ("not evaluable", "failed",
    "not run")."""
    if metric.eval_type is None:
        return None
    statuses = sorted({r.saebench[metric.eval_type].status if metric.eval_type in r.saebench else "not run"
                       for r in rows} - {"ok"})
    return " / ".join(s.replace("_", " ") for s in statuses) or None


Group = tuple[str, Optional[int]]


def by_seed(rows: list[SaeResult], get: Getter) -> dict[int, float]:
    return {r.seed: get(r) for r in rows}


def summary(results: StudyResults) -> dict[Group, dict[str, Interval]]:
    """(label, k) -> metric key -> mean over seeds with its interval."""
    cols = metrics(results)
    return {group: {m.key: mean_interval([m.get(r) for r in rows]) for m in cols}
            for group, rows in results.groups().items()}


def versus_baseline(results: StudyResults, get: Getter) -> dict[Group, Interval]:
    """(label, k) -> interval of the per-seed difference to the baseline at the same k (paired by seed)."""
    groups = results.groups()
    base = {k: by_seed(rows, get) for (label, k), rows in groups.items() if label == results.study.baseline}
    return {(label, k): paired_difference(by_seed(rows, get), base[k])
            for (label, k), rows in groups.items() if label != results.study.baseline and k in base}


@dataclass(frozen=True)
class Criterion:
    name: str
    key: str
    """Metric key (``metrics``)."""
    kind: Literal["level", "versus_baseline"]
    """On the metric's own interval, or on the interval of its difference to the baseline."""
    threshold: float


# The target a VSAETopK variant is held to (issue 7, restated): alive, reconstruction within 0.01 of the
# baseline, downstream metrics not below it.
TARGET = (
    Criterion("frac alive ≥ 0.95", "frac_alive", "level", 0.95),
    Criterion("FVE ≥ baseline − 0.01", "fve", "versus_baseline", -0.01),
    Criterion("SCR ≥ baseline", "scr", "versus_baseline", 0.0),
    Criterion("TPP ≥ baseline", "tpp", "versus_baseline", 0.0),
    Criterion("sparse probing top-1 ≥ baseline", "sp_top1", "versus_baseline", 0.0),
)


@dataclass(frozen=True)
class Judgement:
    criterion: Criterion
    label: str
    k: Optional[int]
    interval: Interval
    verdict: Verdict


def judge(results: StudyResults, criteria=TARGET) -> list[Judgement]:
    """Every criterion for every SAE label but the baseline, at every k, decided on its interval."""
    cols = {m.key: m for m in metrics(results)}
    out = []
    for c in criteria:
        if c.key not in cols:
            continue
        if c.kind == "level":
            intervals = {g: mean_interval([cols[c.key].get(r) for r in rows]) for g, rows in results.groups().items()
                         if g[0] != results.study.baseline}
        else:
            intervals = versus_baseline(results, cols[c.key].get)
        out += [Judgement(c, label, k, iv, verdict(iv, c.threshold)) for (label, k), iv in intervals.items()]
    return out


def overall(judgements: list[Judgement]) -> str:
    """One criterion of one SAE over every k: holds at every k, or where it fails / cannot be told."""
    fails = [j.k for j in judgements if j.verdict == "fails"]
    unclear = [j.k for j in judgements if j.verdict == "not distinguishable"]
    if not fails and not unclear:
        return "holds at every k"
    parts = []
    if fails:
        parts.append(f"fails at k = {', '.join(map(str, fails))}")
    if unclear:
        parts.append(f"not distinguishable at k = {', '.join(map(str, unclear))}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Sensitivity:
    metric: Metric
    sd: float
    """Median over the SAEs of the across-seed standard deviation of the difference to the baseline."""
    n: int
    detectable: float
    """The smallest true difference to the baseline the study detects (95% two-sided, 80% power)."""


def sensitivity(results: StudyResults) -> list[Sensitivity]:
    out = []
    n = len(results.seeds())
    for m in metrics(results):
        sds = [iv.sd for iv in versus_baseline(results, m.get).values() if iv.n >= 2 and not math.isnan(iv.sd)]
        sd = statistics.median(sds) if sds else math.nan
        out.append(Sensitivity(m, sd, n, detectable_difference(sd, n)))
    return out
