"""The claims, read off this run's numbers (nothing is fixed in advance): each is the 95% t-interval of a
per-seed paired difference (``experiments.stats.paired_difference``: every SAE of a seed saw the same
batches and is scored on the same held-out samples) and its three-outcome ``verdict`` against 0.

1. Does VSAETopK recover the true features better than TopK at matched L0? For every VSAETopK variant, every
   target L0 and each of MCC, F1 and uniqueness: VSAETopK - TopK ("holds": better, "fails": worse).
2. Does MP-SAE recover the hierarchical and the correlated features better? Per target L0, on the per-feature
   recall of the features in reach (the W most frequent): MP-SAE - TopK on parents, on children (leaves), on
   correlated and on independent features, and whether MP-SAE's gain is larger on children than on parents
   and on correlated than on independent features (difference of differences, per seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional, Sequence

from dictionary_learning_ext.registry import parse_spec

from experiments.stats import Interval, mean_interval, paired_difference, verdict

RECOVERY_METRICS = ("mcc", "f1", "uniqueness")
GROUP_METRIC = "recall"


def interval_dict(iv: Interval) -> dict[str, Any]:
    def num(x: float) -> Optional[float]:
        return None if math.isnan(x) else x

    return {"mean": num(iv.mean), "low": num(iv.low), "high": num(iv.high), "n": iv.n,
            "half_width": num(iv.half_width) if iv.n >= 2 else None}


def by_seed(rows: Sequence[Mapping[str, Any]], sae: str, target: int,
            value: Callable[[Mapping[str, Any]], Optional[float]]) -> dict[int, float]:
    """seed -> value for the matched run of ``sae`` at ``target`` (NaN where the value is missing)."""
    out = {}
    for r in rows:
        if r["role"] == "matched" and r["sae"] == sae and r["target_l0"] == target:
            v = value(r)
            out[r["seed"]] = math.nan if v is None else float(v)
    return out


def group_value(group: str, metric: str = GROUP_METRIC) -> Callable[[Mapping[str, Any]], Optional[float]]:
    return lambda r: r["groups"][group][metric]


def _comparison(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
    iv = paired_difference(a, b)
    return {"difference": interval_dict(iv), "verdict": verdict(iv)}


def vsae_topk_vs_topk(rows: Sequence[Mapping[str, Any]], saes: Sequence[str], targets: Sequence[int],
                      baseline: str) -> dict[str, Any]:
    """Claim 1: every VSAETopK variant against ``baseline`` on MCC, F1 and uniqueness at each target L0."""
    variants = [s for s in saes if parse_spec(s)[0].name == "vsae_topk"]
    comparisons, tally = [], defaultdict(lambda: {"holds": 0, "fails": 0, "not distinguishable": 0})
    for sae in variants:
        for target in targets:
            for metric in RECOVERY_METRICS:
                c = _comparison(by_seed(rows, sae, target, lambda r: r[metric]),
                                by_seed(rows, baseline, target, lambda r: r[metric]))
                comparisons.append({"sae": sae, "target_l0": target, "metric": metric, **c})
                tally[sae][c["verdict"]] += 1
    reading = []
    for sae in variants:
        t = tally[sae]
        n = sum(t.values())
        reading.append(f"{sae} vs {baseline}: better on {t['holds']} of {n} (metric, L0) comparisons, worse on "
                       f"{t['fails']}, not distinguishable on {t['not distinguishable']}")
    return {"question": f"Does VSAETopK recover the true features better than {baseline} at matched L0 "
                        "(MCC, F1, uniqueness)?",
            "direction": f"difference = VSAETopK - {baseline}; holds = better, fails = worse",
            "comparisons": comparisons, "tally": {k: dict(v) for k, v in tally.items()}, "reading": reading}


def mp_sae_structure(rows: Sequence[Mapping[str, Any]], saes: Sequence[str], targets: Sequence[int],
                     baseline: str, mp: str = "mp_sae") -> dict[str, Any]:
    """Claim 2: MP-SAE against ``baseline`` on the per-feature recall of parent / child and correlated /
    independent features, and the two differences of differences."""
    if mp not in saes:
        return {"checked": False, "reason": f"{mp} is not among the setup's SAEs"}
    comparisons = []
    for target in targets:
        diff = {}
        for group in ("parent", "child", "correlated", "independent"):
            a = by_seed(rows, mp, target, group_value(group))
            b = by_seed(rows, baseline, target, group_value(group))
            diff[group] = {s: a[s] - b[s] for s in set(a) & set(b)}
            c = _comparison(a, b)
            comparisons.append({"target_l0": target, "claim": f"{mp} recalls {group} features better than {baseline}",
                                "groups": [group], **c,
                                "means": {mp: interval_dict(mean_interval(list(a.values()))),
                                          baseline: interval_dict(mean_interval(list(b.values())))}})
        for better, worse in (("child", "parent"), ("correlated", "independent")):
            c = _comparison(diff[better], diff[worse])
            comparisons.append({"target_l0": target,
                                "claim": f"{mp}'s recall gain over {baseline} is larger on {better} than on {worse} "
                                         "features", "groups": [better, worse], **c})
    reading = []
    for c in comparisons:
        d = c["difference"]
        if d["mean"] is None:
            continue
        span = f"[{d['low']:+.3f}, {d['high']:+.3f}]" if d["low"] is not None else "(one seed: no interval)"
        reading.append(f"L0 {c['target_l0']}: {c['claim']}: {c['verdict']} (mean {d['mean']:+.3f}, 95% CI {span})")
    return {"checked": True,
            "question": f"Does {mp} recover the hierarchical and the correlated features better than {baseline}?",
            "metric": "per-feature recall: share of a feature's firings (held-out samples) on which the latent the "
                      "MCC matching assigns to it fires; 0 for a feature no latent is assigned to",
            "direction": f"difference = {mp} - {baseline} (or a difference of those differences); holds = the claim "
                         "holds, fails = the opposite holds",
            "comparisons": comparisons, "reading": reading}
