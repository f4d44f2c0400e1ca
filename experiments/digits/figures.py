"""The digits study's figures, one function each; every one returns ``{"file", "caption"}``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from experiments.analyses.figures import plt, save_figure

from .metrics import atoms_FD

LABELS = {"standard": "ReLU + L1", "top_k": "TopK", "vsae_topk": "VSAETopK", "mp_sae": "MP-SAE"}
COLORS = {"standard": "#4c72b0", "top_k": "#dd8452", "vsae_topk": "#55a868", "mp_sae": "#c44e52"}
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, not 2x10^-1, on log axes
COHERENCE_BARS = [("coherence_used_mean", "mean |cos|\nused atoms"),
                  ("coherence_nn_used_mean", "mean nearest-\nneighbour |cos|"),
                  ("coactive_coherence", "mean |cos|\nco-active pairs"),
                  ("coherence_used_max", "max |cos|\nused atoms")]


def make_figures(results: dict, models: dict[str, torch.nn.Module], matched: list[dict], x_test_ND: torch.Tensor,
                 out_dir: Path) -> list[dict[str, str]]:
    """Every figure of the study, drawn into ``out_dir``, in the order results.json lists them."""
    figures = [plot_recon_vs_l0(results, matched, out_dir), plot_inference_k(results, out_dir),
               plot_coherence(results, models, matched, out_dir)]
    for r in matched:
        figures.append(plot_atoms(r, models[r["run"]], x_test_ND, results["settings"], out_dir))
    return figures


# --- reconstruction against L0 ----------------------------------------------------------------
def _log_log_axes(ax, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (mean active latents per image)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(PLAIN)
        axis.set_minor_formatter(PLAIN)
    ax.tick_params(which="minor", labelsize=7)
    ax.legend()


def plot_recon_vs_l0(results: dict, matched: list[dict], out_dir: Path) -> dict[str, str]:
    s = results["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    error_of = (lambda r: 1 - r["fve"], lambda r: r["nmse"])  # one per panel
    for name in s["architectures"]:  # the study's order, so every legend lists them alike
        own = sorted((r for r in results["rows"] if r["architecture"] == name), key=lambda r: r["l0"])
        if not own:
            continue
        for ax, error in zip(axes, error_of):
            ax.plot([r["l0"] for r in own], [error(r) for r in own], "o-", color=COLORS[name], label=LABELS[name])
    for r in matched:  # circle the table's runs
        for ax, error in zip(axes, error_of):
            ax.plot(r["l0"], error(r), "o", ms=12, mfc="none", color=COLORS[r["architecture"]])
    _log_log_axes(axes[0], "fraction of variance unexplained, 1 - FVE (test)")
    _log_log_axes(axes[1], "normalised MSE (test)")
    axes[0].set_title("Unexplained variance vs sparsity (lower is better)")
    axes[1].set_title("Normalised MSE vs sparsity (lower is better)")
    return {"file": save_figure(fig, out_dir / "recon_vs_l0.png").name, "caption": (
        f"Held-out reconstruction error against L0 on 8x8 digits, {s['dict_size']} atoms (log-log; lower is better). "
        f"k-sparse SAEs at k = {', '.join(map(str, s['k_values']))}; the ReLU+L1 SAE over its L1 penalties. "
        f"Circled: the matched-L0 runs (k = {s['matched_k']}) of the table.")}


# --- inference-time k -------------------------------------------------------------------------
def plot_inference_k(results: dict, out_dir: Path) -> dict[str, str]:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, curve in results["inference_k"].items():
        ax.plot(curve["k"], curve["fve"], "o-", ms=3, color=COLORS[name],
                label=f"{LABELS[name]} (trained k={curve['trained_k']})")
    for k in {c["trained_k"] for c in results["inference_k"].values()}:
        ax.axvline(k, color="grey", ls="--", lw=1)
    ax.set_xlabel("k used at inference (MP: pursuit steps; TopK/VSAETopK: latents kept)")
    ax.set_ylabel("fraction of variance explained (test)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Changing k after training")
    ax.grid(alpha=0.3)
    ax.legend()
    return {"file": save_figure(fig, out_dir / "inference_k.png").name, "caption": (
        "Held-out FVE when the k of the matched-L0 runs is changed at inference (dashed: the training k). "
        "MP-SAE's reconstruction can only improve with more pursuit steps; TopK-style encoders were trained "
        "for one k.")}


# --- coherence --------------------------------------------------------------------------------
def _coherence_bars(ax, matched: list[dict], matched_k: int) -> None:
    """One group of bars per coherence measure, one bar per matched run."""
    width = 0.8 / len(matched)
    for i, r in enumerate(matched):
        xs = [j + (i - (len(matched) - 1) / 2) * width for j in range(len(COHERENCE_BARS))]
        heights = [r[key] if r[key] is not None else math.nan for key, _ in COHERENCE_BARS]
        ax.bar(xs, heights, width, color=COLORS[r["architecture"]],
               label=f"{LABELS[r['architecture']]} (L0 {r['l0']:.1f})")
    ax.set_xticks(range(len(COHERENCE_BARS)), [label for _, label in COHERENCE_BARS], fontsize=9)
    ax.set_ylabel("|cos| between distinct atoms")
    ax.set_title(f"Dictionary coherence at L0 ~ {matched_k}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.xaxis.grid(False)  # the style grids both axes; lines through the bar groups read as bars


def _nearest_neighbour_hist(ax, models: dict[str, torch.nn.Module], matched: list[dict]) -> None:
    bins = torch.linspace(0, 1, 41)
    for r in matched:
        unit_FD = atoms_FD(models[r["run"]])
        nn_cos_F = (unit_FD @ unit_FD.T).abs().fill_diagonal_(0.0).max(dim=1).values
        ax.hist(nn_cos_F.numpy(), bins=bins.numpy(), histtype="step", lw=1.8, color=COLORS[r["architecture"]],
                label=LABELS[r["architecture"]], density=True)
    ax.set_xlabel("max |cos| of an atom with any other atom")
    ax.set_ylabel("density over atoms")
    ax.set_title("Nearest-neighbour similarity of atoms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_coherence(results: dict, models: dict[str, torch.nn.Module], matched: list[dict],
                   out_dir: Path) -> dict[str, str]:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.4, 1]})
    _coherence_bars(axes[0], matched, results["settings"]["matched_k"])
    _nearest_neighbour_hist(axes[1], models, matched)
    return {"file": save_figure(fig, out_dir / "coherence.png").name, "caption": (
        "Coherence of the matched-L0 dictionaries. Left: mean |cos| between used atoms, mean over used atoms of "
        "the |cos| with their nearest used neighbour, mean |cos| between atoms active on the same image, and the "
        "max over used atoms. Right: for every atom, its largest |cos| with another atom.")}


# --- atoms ------------------------------------------------------------------------------------
def plot_atoms(r: dict, ae: torch.nn.Module, x_test_ND: torch.Tensor, s: dict[str, Any],
               out_dir: Path) -> dict[str, str]:
    """The ``n_atoms_shown`` most used atoms of one matched run as 8x8 images, with their usage."""
    unit_FD = atoms_FD(ae)
    with torch.no_grad():
        usage_F = (ae.encode(x_test_ND) != 0).float().mean(0)  # share of test images using each atom
    order = usage_F.argsort(descending=True)[: s["n_atoms_shown"]].tolist()
    side = int(math.ceil(math.sqrt(s["n_atoms_shown"])))
    fig, axs = plt.subplots(side, side, figsize=(1.1 * side, 1.25 * side))
    for ax in axs.flat:
        ax.axis("off")
    for ax, j in zip(axs.flat, order):
        img_HW = unit_FD[j].reshape(8, 8).numpy()
        lim = float(abs(img_HW).max()) or 1.0
        ax.imshow(img_HW, cmap="RdBu_r", vmin=-lim, vmax=lim)  # symmetric: white is zero
        ax.set_title(f"{100 * float(usage_F[j]):.0f}%", fontsize=7)
    label = LABELS[r["architecture"]]
    fig.suptitle(f"{label}: {len(order)} most used atoms\n"
                 f"L0 {r['l0']:.1f}, FVE {r['fve']:.3f}, {r['n_used']}/{s['dict_size']} atoms used", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # leave the top for the two-line suptitle
    path = save_figure(fig, out_dir / f"atoms_{r['architecture']}.png", tight_layout=False)
    return {"file": path.name, "caption": (
        f"{label} (L0 {r['l0']:.1f}): its {len(order)} most used atoms as 8x8 images "
        "(red positive, blue negative, each scaled to its own max |value|); above each, the share of test "
        "images on which it is active.")}
