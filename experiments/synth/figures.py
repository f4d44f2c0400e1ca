"""The synthetic study's figures, each returned as ``{"file", "caption"}``.

* ``l0_curves.png`` -- F1, MCC, uniqueness and explained variance against L0, one line per SAE, mean over seeds
  with 95% t-intervals on both axes (the layout of SynthSAEBench's main figure); on the 16k setup the published
  means are drawn beside them.
* ``feature_groups.png`` -- per-feature recall of parent / child / correlated / independent features per SAE at
  each target L0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.analyses.figures import plt, save_figure

PANELS = (("f1", "F1 score (SAELens)"), ("mcc", "MCC"), ("uniqueness", "uniqueness"),
          ("explained_variance", "explained variance"))
MARKERS = "osD^v<>pPX*h"
GROUP_BARS = ("parent", "child", "correlated", "independent")
FLOORS = {"explained_variance": -0.1}
"""Lower edge of a panel: means below it (a collapsed SAE's negative explained variance) are drawn as a
triangle on the edge with their value, so they do not squash every other line."""


def _colors(labels: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _err(iv: dict[str, Any]) -> float:
    return iv["half_width"] if iv.get("half_width") is not None else 0.0


def plot_l0_curves(results: dict, out_dir: Path) -> dict[str, str]:
    labels = results["settings"]["setup"]["training"]["architectures"]
    colors = _colors(labels)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, title) in zip(axes.flat, PANELS):
        for i, label in enumerate(labels):
            own = sorted((e for e in results["table"] if e["sae"] == label), key=lambda e: e["target_l0"])
            if not own:
                continue
            xs = [e["sae_l0"]["mean"] for e in own]
            ys = [e[metric]["mean"] for e in own]
            floor = FLOORS.get(metric)
            if floor is not None and min(ys) < floor:  # off the scale (a collapsed SAE): marked on the bottom edge
                for x, y in zip(xs, ys):
                    if y < floor:
                        ax.plot(x, floor, marker="v", ms=7, color=colors[label], clip_on=False)
                        ax.annotate(f"{y:.2f}", (x, floor), fontsize=6, xytext=(4, 3), textcoords="offset points")
                keep = [j for j, y in enumerate(ys) if y >= floor]
                own, xs, ys = [own[j] for j in keep], [xs[j] for j in keep], [ys[j] for j in keep]
                if not own:
                    ax.plot([], [], marker=MARKERS[i % len(MARKERS)], color=colors[label], label=label)
                    continue
            ax.errorbar(xs, ys, xerr=[_err(e["sae_l0"]) for e in own], yerr=[_err(e[metric]) for e in own],
                        marker=MARKERS[i % len(MARKERS)], ms=5, capsize=3, lw=1.4, color=colors[label], label=label)
        published = results.get("published") or {}
        for l0, by_sae in (published.get("by_l0") or {}).items():
            for name, values in by_sae.items():
                if metric in values:
                    mean, _ = values[metric]
                    ax.plot(float(l0), mean, marker="*", ms=9, mfc="none", color="black")
                    ax.annotate(name, (float(l0), mean), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("L0 (mean active latents per held-out sample)")
        ax.set_ylabel(title)
        if metric in FLOORS and ax.get_ylim()[0] < FLOORS[metric]:
            ax.set_ylim(bottom=FLOORS[metric])
        elif metric not in FLOORS:  # scores in [0, 1]: from 0, so a gap is drawn at its true size
            ax.set_ylim(bottom=0)
        ax.set_title(f"{title} vs L0")
    axes.flat[0].legend(fontsize=7)
    seeds = len(results["settings"]["seeds"])
    extra = (" Black stars: the published SynthSAEBench-16k means (5 seeds) at L0 20 and 25."
             if (results.get("published") or {}).get("by_l0") else "")
    return {"file": save_figure(fig, out_dir / "l0_curves.png").name, "caption": (
        f"SAELens's ground-truth metrics against L0 for every SAE, mean over {seeds} seed(s) with 95% t-intervals "
        "(both axes): F1 of each latent as a detector of its closest true feature, MCC (Hungarian matching of "
        "decoder rows to true features), uniqueness, explained variance. k-sparse SAEs at k = the target L0s; "
        "L1-penalised SAEs at the penalties tuned to them. A triangle on the lower edge of the explained-variance "
        f"panel marks a mean below -0.1 (its value beside it).{extra}")}


def plot_feature_groups(results: dict, out_dir: Path) -> dict[str, str]:
    labels = results["settings"]["setup"]["training"]["architectures"]
    colors = _colors(labels)
    targets = results["settings"]["setup"]["training"]["l0_targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.2), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, target in zip(axes[0], targets):
        for i, label in enumerate(labels):
            entry = next((e for e in results["table"] if e["sae"] == label and e["target_l0"] == target), None)
            if entry is None:
                continue
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(GROUP_BARS))]
            ivs = [entry[f"recall_{g}"] for g in GROUP_BARS]
            heights = [iv["mean"] if iv["mean"] is not None else math.nan for iv in ivs]
            ax.bar(xs, heights, width, yerr=[_err(iv) for iv in ivs], capsize=2, color=colors[label], label=label)
        ax.set_xticks(range(len(GROUP_BARS)), list(GROUP_BARS))
        ax.set_ylim(0, 1)
        ax.set_ylabel("per-feature recall (matched latent)")
        ax.set_title(f"target L0 {target}")
        ax.xaxis.grid(False)
    axes[0][0].legend(fontsize=6)
    gt = results["ground_truth"]
    sizes = ", ".join(f"{g} {gt['group_sizes_in_reach'].get(g, 0)}" for g in GROUP_BARS)
    return {"file": save_figure(fig, out_dir / "feature_groups.png").name, "caption": (
        f"Which true features each SAE recovers, among the {gt['in_reach']} most frequent ({sizes}): for every "
        "feature, the share of its held-out firings on which the latent the MCC matching assigns to it fires (0 if "
        "none is assigned), averaged over parents (features with children), children (leaves), and the most / least "
        "correlated quarter (by communality); mean over seeds with 95% t-intervals.")}


def make_figures(results: dict, out_dir: Path) -> list[dict[str, str]]:
    return [plot_l0_curves(results, out_dir), plot_feature_groups(results, out_dir)]
