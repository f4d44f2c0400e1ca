"""Controlled digits study: MP-SAE against shallow SAEs at matched L0 (Costa et al. 2025, on MNIST).

    python -m experiments.digits_study OUT_DIR [--force] [--seed 0] [--quick]

sklearn's bundled 8x8 handwritten digits (1797 images, no download) stand in for MNIST. Four
registered architectures are trained on the same batches, with the same dictionary size, learning
rate and schedule: the standard ReLU + L1 SAE ("standard", its L1 penalty tuned so that its L0
lands near each target k), TopK ("top_k"), VSAETopK ("vsae_topk") and MP-SAE ("mp_sae") at k in
``k_values``. On the held-out images it reports reconstruction (FVE, normalised MSE) against L0,
MP-SAE's reconstruction against the number of pursuit steps used at inference, and the coherence
of each learned dictionary (|cos| between distinct atoms: all atoms, atoms that are used, and atoms
used together on one image), and draws the most used atoms of each as 8x8 images.

Writes ``OUT_DIR/results.json`` (self-describing: ``table`` = the matched-L0 rows, ``rows`` = every
run, ``figures`` = file + caption), the PNG figures and the trained dictionaries
(``OUT_DIR/dictionaries/<run>/{ae.pt, config.json}``, loadable with ``load_dictionary``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from dictionary_learning_ext import get_architecture
from saebench_adapters.atomic import write_bytes, write_json

ARCHITECTURES = ("standard", "top_k", "vsae_topk", "mp_sae")
LABELS = {"standard": "ReLU + L1", "top_k": "TopK", "vsae_topk": "VSAETopK", "mp_sae": "MP-SAE"}
COLORS = {"standard": "#4c72b0", "top_k": "#dd8452", "vsae_topk": "#55a868", "mp_sae": "#c44e52"}
LM_NAME = "sklearn-digits"  # the trainers' configs require a model name; these are pixels, not LM activations
RESULTS = "results.json"
# Stand-in for trainSAE's step-count defaults that assume 10k+ steps: scaled to the run.
SCHEDULE_FRACTIONS = {"warmup_steps": 0.05, "sparsity_warmup_steps": 0.1, "threshold_start_step": 0.1, "decay_start": 0.8}


class StudyError(ValueError):
    """Bad arguments or an out_dir holding a different study."""


@dataclass(frozen=True)
class StudySettings:
    dict_size: int
    steps: int
    batch_size: int
    lr: float
    k_values: tuple[int, ...]
    matched_k: int
    l1_grid: tuple[float, ...]
    """Initial L1 penalties of the standard SAE; one refinement per target k follows."""
    inference_ks: tuple[int, ...]
    n_atoms_shown: int
    test_fraction: float = 0.2


FULL = StudySettings(
    dict_size=256, steps=3000, batch_size=128, lr=2e-3, k_values=(5, 10, 20), matched_k=10,
    l1_grid=(0.03, 0.1, 0.3, 1.0), inference_ks=tuple(range(1, 21)), n_atoms_shown=64,
)
QUICK = StudySettings(
    dict_size=64, steps=150, batch_size=64, lr=3e-3, k_values=(10,), matched_k=10,
    l1_grid=(0.1, 1.0), inference_ks=tuple(range(1, 21)), n_atoms_shown=16,
)


# --- data ------------------------------------------------------------------------------------
def load_digits_split(seed: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train/test images (N, 64), scaled so that a training image has mean squared norm 64 (one unit
    per pixel, like normalised activations), not centred (b_dec learns the offset)."""
    from sklearn.datasets import load_digits

    pixels = torch.tensor(load_digits().data, dtype=torch.float32)  # (1797, 64), values 0..16
    order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * pixels.shape[0]))
    test, train = pixels[order[:n_test]], pixels[order[n_test:]]
    scale = float(train.square().sum(-1).mean().div(train.shape[1]).sqrt())
    meta = {"name": "sklearn.datasets.load_digits", "n_train": train.shape[0], "n_test": test.shape[0],
            "dim": pixels.shape[1], "image_shape": [8, 8], "pixel_scale": scale,
            "preprocessing": "pixels (0..16) divided by pixel_scale so E||x||^2 = 64 on the train split; not centred"}
    return train / scale, test / scale, meta


# --- training --------------------------------------------------------------------------------
def trainer_config(name: str, s: StudySettings, seed: int, k: Optional[int] = None, l1: Optional[float] = None) -> dict:
    """A registry trainer config; which knobs apply is read from the architecture's config fields."""
    arch = get_architecture(name)
    names = arch.field_names
    values: dict[str, Any] = dict(steps=s.steps, activation_dim=64, dict_size=s.dict_size, layer=0, lm_name=LM_NAME,
                                  lr=s.lr, seed=seed, device="cpu")
    for key, frac in SCHEDULE_FRACTIONS.items():
        if key in names:
            values[key] = max(1, int(frac * s.steps))
    if k is not None:
        values["k"] = k
    if l1 is not None:
        values["l1_penalty"] = l1
    return arch.trainer_config(**values)


def train_together(configs: list[dict], x_train: torch.Tensor, s: StudySettings, seed: int) -> list[tuple[Any, float]]:
    """Train every config on the same sequence of batches; returns (trainer, seconds spent in its updates)."""
    trainers = []
    for cfg in configs:
        cfg = dict(cfg)
        trainers.append(cfg.pop("trainer")(**cfg))
    seconds = [0.0] * len(trainers)
    gen = torch.Generator().manual_seed(seed)
    for step in range(s.steps):
        x = x_train[torch.randint(0, x_train.shape[0], (s.batch_size,), generator=gen)]
        for i, trainer in enumerate(trainers):
            start = time.perf_counter()
            trainer.update(step, x)
            seconds[i] += time.perf_counter() - start
    return list(zip(trainers, seconds))


def save_dictionary(trainer: Any, folder: Path) -> None:
    """The trainSAE layout (ae.pt + config.json), so load_dictionary reads it back."""
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, buf)
    write_bytes(folder / "ae.pt", buf.getvalue())
    write_json(folder / "config.json", {"trainer": json.loads(json.dumps(trainer.config, default=str))})


# --- measurements ----------------------------------------------------------------------------
@contextlib.contextmanager
def inference_k(ae: torch.nn.Module, k: Optional[int]) -> Iterator[None]:
    """Temporarily run a k-sparse dictionary with another k (its ``k`` buffer, which encode reads)."""
    if k is None:
        yield
        return
    k_buffer = getattr(ae, "k", None)
    if not isinstance(k_buffer, torch.Tensor):
        raise StudyError(f"{type(ae).__name__} has no k buffer; inference-time k applies to k-sparse dictionaries")
    saved = k_buffer.clone()
    k_buffer.fill_(k)
    try:
        yield
    finally:
        k_buffer.copy_(saved)


@torch.no_grad()
def reconstruction(ae: torch.nn.Module, x_ND: torch.Tensor, k: Optional[int] = None) -> dict[str, Any]:
    with inference_k(ae, k):
        f_NF = ae.encode(x_ND)
        x_hat_ND = ae.decode(f_NF)
    sse = (x_ND - x_hat_ND).square().sum()
    return {
        "fve": float(1 - sse / (x_ND - x_ND.mean(0)).square().sum()),
        "nmse": float(sse / x_ND.square().sum()),
        "l0": float((f_NF != 0).sum(-1).float().mean()),
        "codes": f_NF,
    }


def atoms_FD(ae: torch.nn.Module) -> torch.Tensor:
    """Unit-normalised atoms (dictionary_learning's layout: decoder.weight is (D, F))."""
    return F.normalize(ae.decoder.weight.detach().T.float(), dim=-1)


@torch.no_grad()
def coherence(atoms: torch.Tensor, f_NF: torch.Tensor) -> dict[str, float]:
    """|cos| between distinct atoms: over all atoms, over atoms used on >= 1 test image, each used atom's
    nearest used neighbour, and over pairs of atoms active on the same image (pair-weighted mean)."""
    F_ = atoms.shape[0]
    cos_FF = (atoms @ atoms.T).abs().fill_diagonal_(0.0)
    off_FF = ~torch.eye(F_, dtype=torch.bool)
    used_F = (f_NF != 0).any(0)
    used_off = off_FF & used_F[:, None] & used_F[None, :]
    active_NF = (f_NF != 0).float()
    n_active_N = active_NF.sum(-1)
    pair_sum = ((active_NF @ cos_FF) * active_NF).sum()
    pair_count = (n_active_N * (n_active_N - 1)).sum()
    used_cos = cos_FF[used_F][:, used_F]
    return {
        "coherence_mean": float(cos_FF[off_FF].mean()),
        "coherence_max": float(cos_FF[off_FF].max()),
        # None (JSON null) when fewer than two atoms are used / active together: nothing to compare.
        "coherence_used_mean": float(cos_FF[used_off].mean()) if used_off.any() else None,
        "coherence_used_max": float(cos_FF[used_off].max()) if used_off.any() else None,
        "coherence_nn_used_mean": float(used_cos.max(dim=1).values.mean()) if used_F.sum() > 1 else None,
        "coactive_coherence": float(pair_sum / pair_count) if pair_count > 0 else None,
        "n_used": int(used_F.sum()),
        "frac_used": float(used_F.float().mean()),
    }


def measure(ae: torch.nn.Module, x_test: torch.Tensor) -> dict[str, Any]:
    rec = reconstruction(ae, x_test)
    return {"l0": rec["l0"], "fve": rec["fve"], "nmse": rec["nmse"], **coherence(atoms_FD(ae), rec["codes"])}


# --- the study -------------------------------------------------------------------------------
def _run_name(name: str, k: Optional[int], l1: Optional[float]) -> str:
    return f"{name}_k{k}" if k is not None else f"{name}_l1_{l1:.4g}"


def _l1_for_target(points: list[tuple[float, float]], target: float) -> float:
    """Interpolate log(l1) against log(L0) between the two runs that bracket ``target`` (L0 falls as
    the penalty rises); outside the measured range, extrapolate from the nearest two."""
    pts = sorted((math.log(l1), math.log(max(l0, 1e-3))) for l1, l0 in points)
    t = math.log(target)
    pairs = list(zip(pts, pts[1:]))
    chosen = next(((a, b) for a, b in pairs if min(a[1], b[1]) <= t <= max(a[1], b[1])), None)
    if chosen is None:
        chosen = pairs[0] if t > pts[0][1] else pairs[-1]
    (x0, y0), (x1, y1) = chosen
    if abs(y1 - y0) < 1e-9:
        return math.exp((x0 + x1) / 2)
    return math.exp(x0 + (t - y0) * (x1 - x0) / (y1 - y0))


def _train_and_record(specs: list[tuple[str, Optional[int], Optional[float]]], x_train, x_test, s, seed, out_dir):
    configs = [trainer_config(name, s, seed, k=k, l1=l1) for name, k, l1 in specs]
    rows, models = [], {}
    for (name, k, l1), (trainer, seconds) in zip(specs, train_together(configs, x_train, s, seed)):
        run = _run_name(name, k, l1)
        save_dictionary(trainer, out_dir / "dictionaries" / run)
        ae = trainer.ae.eval()
        models[run] = ae
        rows.append({"run": run, "architecture": name, "trainer_class": type(trainer).__name__, "k": k,
                     "l1_penalty": l1, **measure(ae, x_test), "train_seconds": round(seconds, 2),
                     "dictionary": f"dictionaries/{run}"})
    return rows, models


def run_digits_study(out_dir: Path, force: bool = False, seed: int = 0, quick: bool = False) -> dict:
    """Run (or, if ``out_dir/results.json`` holds the same study and not ``force``, reuse) the study."""
    out_dir = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StudyError(f"seed must be an int >= 0, got {seed!r}")
    results_path = out_dir / RESULTS
    if results_path.is_file() and not force:
        existing = json.loads(results_path.read_text())
        if (existing.get("settings", {}).get("seed"), existing.get("settings", {}).get("quick")) == (seed, quick):
            return existing
        raise StudyError(
            f"{results_path} holds a study with seed={existing.get('settings', {}).get('seed')}, "
            f"quick={existing.get('settings', {}).get('quick')}, not seed={seed}, quick={quick}; pass force=True "
            "(--force) to replace it or choose another OUT_DIR"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = QUICK if quick else FULL
    torch.manual_seed(seed)
    x_train, x_test, data_meta = load_digits_split(seed, s.test_fraction)

    k_based = [name for name in ARCHITECTURES if "k" in get_architecture(name).field_names]
    l1_based = [name for name in ARCHITECTURES if name not in k_based]
    specs = [(name, k, None) for name in k_based for k in s.k_values]
    specs += [(name, None, l1) for name in l1_based for l1 in s.l1_grid]
    rows, models = _train_and_record(specs, x_train, x_test, s, seed, out_dir)
    # One refinement per target k: the L1 penalty that interpolates to L0 = k.
    refine = []
    for name in l1_based:
        points = [(r["l1_penalty"], r["l0"]) for r in rows if r["architecture"] == name]
        tried = {round(l1, 6) for l1, _ in points}
        for k in s.k_values:
            l1 = float(f"{_l1_for_target(points, k):.4g}")
            if round(l1, 6) not in tried:
                tried.add(round(l1, 6))
                refine.append((name, None, l1))
    if refine:
        more_rows, more_models = _train_and_record(refine, x_train, x_test, s, seed, out_dir)
        rows += more_rows
        models.update(more_models)
    for r in rows:
        r["target_k"] = r["k"]
    for name in l1_based:
        own = [r for r in rows if r["architecture"] == name]
        for k in s.k_values:
            closest = min(own, key=lambda r: abs(math.log(max(r["l0"], 1e-3) / k)))
            if closest["target_k"] is None or abs(closest["l0"] - k) < abs(closest["l0"] - closest["target_k"]):
                closest["target_k"] = k
    matched = [r for r in rows if r["target_k"] == s.matched_k]
    matched.sort(key=lambda r: ARCHITECTURES.index(r["architecture"]))

    inference = inference_k_curves(models, matched, x_test, s)
    table = [{key: r[key] for key in ("architecture", "k", "l1_penalty", "l0", "fve", "nmse", "coherence_mean",
                                      "coherence_max", "coherence_used_mean", "coherence_used_max",
                                      "coherence_nn_used_mean", "coactive_coherence", "frac_used")} for r in matched]
    results: dict[str, Any] = {
        "title": "Controlled digits study: MP-SAE vs shallow SAEs at matched L0",
        "description": (
            f"sklearn 8x8 digits ({data_meta['n_train']} train / {data_meta['n_test']} test images) standing in for "
            f"MNIST; {s.dict_size} atoms; ReLU+L1, TopK, VSAETopK and MP-SAE trained on the same {s.steps} batches of "
            f"{s.batch_size} (lr {s.lr}); table rows: the runs at L0 ~ {s.matched_k} (the L1 penalty of the "
            "standard SAE tuned to it; its actual L0 is reported); metrics on the held-out images."
        ),
        "settings": {**asdict(s), "seed": seed, "quick": quick, "architectures": list(ARCHITECTURES)},
        "dataset": data_meta,
        "definitions": {
            "fve": "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the test images",
            "nmse": "sum ||x - x_hat||^2 / sum ||x||^2 over the test images",
            "l0": "mean number of non-zero codes per test image",
            "coherence_mean / coherence_max": "mean / max |cos| between distinct atoms of the dictionary",
            "coherence_used_mean / coherence_used_max": "the same over atoms active on at least one test image",
            "coherence_nn_used_mean": "mean over used atoms of the largest |cos| with another used atom",
            "coactive_coherence": "mean |cos| over pairs of atoms active on the same test image",
            "frac_used": "fraction of atoms active on at least one test image",
        },
        "table": table,
        "rows": rows,
        "inference_k": inference,
    }
    results["claim"] = claim_check(matched, inference)
    results["figures"] = make_figures(results, models, matched, x_test, out_dir)
    results["elapsed_seconds"] = round(time.perf_counter() - start, 1)
    write_json(results_path, results)
    return results


def inference_k_curves(models: dict, matched: list[dict], x_test: torch.Tensor, s: StudySettings) -> dict[str, Any]:
    """FVE of each k-sparse matched run when its k is changed at inference (trained at matched_k)."""
    curves = {}
    for r in matched:
        if r["k"] is None:
            continue
        ae = models[r["run"]]
        curve = [reconstruction(ae, x_test, k=k) for k in s.inference_ks]
        fve = [c["fve"] for c in curve]
        curves[r["architecture"]] = {
            "trained_k": r["k"], "k": list(s.inference_ks), "fve": fve, "nmse": [c["nmse"] for c in curve],
            "l0": [c["l0"] for c in curve],
            "monotone": all(b >= a - 1e-6 for a, b in zip(fve, fve[1:])),
        }
    return curves


def claim_check(matched: list[dict], inference: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims, checked on this run's numbers (nothing here is fixed in advance): MP-SAE
    reconstructs better at matched L0, and its dictionary holds more correlated (coherent) atoms."""
    mp = next((r for r in matched if r["architecture"] == "mp_sae"), None)
    others = [r for r in matched if r["architecture"] != "mp_sae"]
    if mp is None or not others:
        return {"checked": False, "reason": "MP-SAE or the shallow SAEs missing from the matched-L0 rows"}
    best_other = max(others, key=lambda r: r["fve"])
    claim: dict[str, Any] = {
        "checked": True,
        "mp_fve": mp["fve"], "best_shallow": best_other["architecture"], "best_shallow_fve": best_other["fve"],
        "mp_reconstructs_best_at_matched_l0": mp["fve"] > best_other["fve"],
        "mp_monotone_in_inference_k": inference.get("mp_sae", {}).get("monotone"),
    }
    for key, verdict in (("coherence_used_mean", "mp_more_coherent_dictionary"),
                         ("coherence_nn_used_mean", "mp_atoms_have_closer_neighbours"),
                         ("coactive_coherence", "mp_uses_more_correlated_atoms_together")):
        shallow = [r[key] for r in others if r[key] is not None]
        claim[f"mp_{key}"] = mp[key]
        claim[f"max_shallow_{key}"] = max(shallow) if shallow else None
        claim[verdict] = None if mp[key] is None or not shallow else mp[key] > max(shallow)
    return claim


# --- figures ---------------------------------------------------------------------------------
def _save(fig, out_dir: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(out_dir / name, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def make_figures(results: dict, models: dict, matched: list[dict], x_test: torch.Tensor, out_dir: Path) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    figures = []

    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, not 2x10^-1, on log axes

    # 1. reconstruction against L0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ARCHITECTURES:
        own = sorted((r for r in results["rows"] if r["architecture"] == name), key=lambda r: r["l0"])
        if not own:
            continue
        l0 = [r["l0"] for r in own]
        for ax, get in zip(axes, (lambda r: 1 - r["fve"], lambda r: r["nmse"])):
            ax.plot(l0, [get(r) for r in own], "o-", color=COLORS[name], label=LABELS[name])
    for r in matched:
        for ax, value in zip(axes, (1 - r["fve"], r["nmse"])):
            ax.plot(r["l0"], value, "o", ms=12, mfc="none", color=COLORS[r["architecture"]])
    for ax, ylabel in zip(axes, ("fraction of variance unexplained, 1 - FVE (test)", "normalised MSE (test)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0 (mean active latents per image)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        ax.tick_params(which="minor", labelsize=7)
        ax.legend()
    fig.tight_layout()
    axes[0].set_title("Unexplained variance vs sparsity (lower is better)")
    axes[1].set_title("Normalised MSE vs sparsity (lower is better)")
    figures.append({"file": _save(fig, out_dir, "recon_vs_l0.png"), "caption": (
        f"Held-out reconstruction error against L0 on 8x8 digits, {s['dict_size']} atoms (log-log; lower is better). k-sparse SAEs at "
        f"k = {', '.join(map(str, s['k_values']))}; the ReLU+L1 SAE over its L1 penalties. Circled: the "
        f"matched-L0 runs (k = {s['matched_k']}) of the table.")})

    # 2. inference-time k
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, curve in results["inference_k"].items():
        ax.plot(curve["k"], curve["fve"], "o-", ms=3, color=COLORS[name], label=f"{LABELS[name]} (trained k={curve['trained_k']})")
    trained = {c["trained_k"] for c in results["inference_k"].values()}
    for k in trained:
        ax.axvline(k, color="grey", ls="--", lw=1)
    ax.set_xlabel("k used at inference (MP: pursuit steps; TopK/VSAETopK: latents kept)")
    ax.set_ylabel("fraction of variance explained (test)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Changing k after training")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.append({"file": _save(fig, out_dir, "inference_k.png"), "caption": (
        "Held-out FVE when the k of the matched-L0 runs is changed at inference (dashed: the training k). "
        "MP-SAE's reconstruction can only improve with more pursuit steps; TopK-style encoders were trained "
        "for one k.")})

    # 3. coherence
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.4, 1]})
    keys = [("coherence_used_mean", "mean |cos|\nused atoms"),
            ("coherence_nn_used_mean", "mean nearest-\nneighbour |cos|"),
            ("coactive_coherence", "mean |cos|\nco-active pairs"),
            ("coherence_used_max", "max |cos|\nused atoms")]
    width = 0.8 / len(matched)
    for i, r in enumerate(matched):
        xs = [j + (i - (len(matched) - 1) / 2) * width for j in range(len(keys))]
        axes[0].bar(xs, [r[k] if r[k] is not None else math.nan for k, _ in keys], width, color=COLORS[r["architecture"]],
                    label=f"{LABELS[r['architecture']]} (L0 {r['l0']:.1f})")
    axes[0].set_xticks(range(len(keys)), [label for _, label in keys], fontsize=9)
    axes[0].set_ylabel("|cos| between distinct atoms")
    axes[0].set_title(f"Dictionary coherence at L0 ~ {s['matched_k']}")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3, axis="y")
    bins = torch.linspace(0, 1, 41)
    for r in matched:
        atoms = atoms_FD(models[r["run"]])
        cos = (atoms @ atoms.T).abs().fill_diagonal_(0.0).max(dim=1).values
        axes[1].hist(cos.numpy(), bins=bins.numpy(), histtype="step", lw=1.8, color=COLORS[r["architecture"]],
                     label=LABELS[r["architecture"]], density=True)
    axes[1].set_xlabel("max |cos| of an atom with any other atom")
    axes[1].set_ylabel("density over atoms")
    axes[1].set_title("Nearest-neighbour similarity of atoms")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    figures.append({"file": _save(fig, out_dir, "coherence.png"), "caption": (
        "Coherence of the matched-L0 dictionaries. Left: mean |cos| between used atoms, mean over used atoms of "
        "the |cos| with their nearest used neighbour, mean |cos| between atoms active on the same image, and the "
        "max over used atoms. Right: for every atom, its largest |cos| with another atom.")})

    # 4. atoms per architecture
    n = s["n_atoms_shown"]
    side = int(math.ceil(math.sqrt(n)))
    for r in matched:
        ae = models[r["run"]]
        atoms = atoms_FD(ae)
        with torch.no_grad():
            usage_F = (ae.encode(x_test) != 0).float().mean(0)  # share of test images using each atom
        order = usage_F.argsort(descending=True)[:n]
        fig, axs = plt.subplots(side, side, figsize=(1.1 * side, 1.25 * side))
        for ax in axs.flat:
            ax.axis("off")
        for ax, j in zip(axs.flat, order.tolist()):
            img = atoms[j].reshape(8, 8).numpy()
            lim = float(abs(img).max()) or 1.0
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{100 * float(usage_F[j]):.0f}%", fontsize=7)
        fig.suptitle(f"{LABELS[r['architecture']]}: {len(order)} most used atoms\n"
                     f"L0 {r['l0']:.1f}, FVE {r['fve']:.3f}, {r['n_used']}/{s['dict_size']} atoms used", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        name = f"atoms_{r['architecture']}.png"
        figures.append({"file": _save(fig, out_dir, name), "caption": (
            f"{LABELS[r['architecture']]} (L0 {r['l0']:.1f}): its {len(order)} most used atoms as 8x8 images "
            "(red positive, blue negative, each scaled to its own max |value|); above each, the share of test "
            "images on which it is active.")})
    return figures


# --- CLI -------------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    cols = [("architecture", "arch"), ("k", "k"), ("l1_penalty", "l1"), ("l0", "L0"), ("fve", "FVE"),
            ("nmse", "NMSE"), ("coherence_used_mean", "coh used mean"), ("coherence_used_max", "coh used max"),
            ("coherence_nn_used_mean", "coh nn"), ("coactive_coherence", "coh co-active"), ("frac_used", "frac used")]
    cells = [[h for _, h in cols]] + [
        [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c] if r[c] is not None else "-") for c, _ in cols]
        for r in results["table"]
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.digits_study", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for results.json, figures and dictionaries")
    p.add_argument("--force", action="store_true", help="re-run even if OUT_DIR/results.json exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    args = p.parse_args(argv)
    if not args.out_dir.parent.is_dir():
        print(f"error: parent folder of {args.out_dir} does not exist; create it first", file=sys.stderr)
        return 2
    try:
        results = run_digits_study(args.out_dir, force=args.force, seed=args.seed, quick=args.quick)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(json.dumps(results["claim"], indent=1))
    print(f"wrote {args.out_dir / RESULTS} and {len(results['figures'])} figures in {results['elapsed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
