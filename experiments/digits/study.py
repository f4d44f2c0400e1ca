"""The digits study itself: settings, the data split, training every architecture on the same
batches, tuning the ReLU + L1 SAE to each target L0, and ``results.json``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.errors import StudyError
from dictionary_learning_ext.io import read_json, save_torch, write_json
from dictionary_learning_ext.registry import DEFAULT_VARIANT

from .figures import make_figures
from .metrics import inference_k_curves, measure

__all__ = ["DIGITS_ARCHITECTURES", "FULL", "QUICK", "RESULTS", "StudyError", "StudySettings", "claim_check",
           "load_digits_split", "run_digits_study", "save_dictionary", "train_together", "trainer_config"]

DIGITS_ARCHITECTURES = ("standard", "top_k", "vsae_topk", "mp_sae")
LM_NAME = "sklearn-digits"  # the trainers' configs require a model name; these are pixels, not LM activations
RESULTS = "results.json"
# Stand-in for trainSAE's step-count defaults that assume 10k+ steps: scaled to the run.
SCHEDULE_FRACTIONS = {"warmup_steps": 0.05, "sparsity_warmup_steps": 0.1, "threshold_start_step": 0.1,
                      "decay_start": 0.8}
TABLE_KEYS = ("architecture", "k", "l1_penalty", "l0", "fve", "nmse", "coherence_mean", "coherence_max",
              "coherence_used_mean", "coherence_used_max", "coherence_nn_used_mean", "coactive_coherence", "frac_used")
DEFINITIONS = {
    "fve": "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the test images",
    "nmse": "sum ||x - x_hat||^2 / sum ||x||^2 over the test images",
    "l0": "mean number of non-zero codes per test image",
    "coherence_mean / coherence_max": "mean / max |cos| between distinct atoms of the dictionary",
    "coherence_used_mean / coherence_used_max": "the same over atoms active on at least one test image",
    "coherence_nn_used_mean": "mean over used atoms of the largest |cos| with another used atom",
    "coactive_coherence": "mean |cos| over pairs of atoms active on the same test image",
    "frac_used": "fraction of atoms active on at least one test image",
}

RunSpec = tuple[str, Optional[int], Optional[float]]
"""(architecture, k or None, L1 penalty or None): one dictionary to train."""


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
    from sklearn.datasets import load_digits  # slow import, only needed here

    pixels_ND = torch.tensor(load_digits().data, dtype=torch.float32)  # (1797, 64), values 0..16
    order = torch.randperm(pixels_ND.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * pixels_ND.shape[0]))
    test_ND, train_ND = pixels_ND[order[:n_test]], pixels_ND[order[n_test:]]
    scale = float(train_ND.square().sum(-1).mean().div(train_ND.shape[1]).sqrt())
    meta = {"name": "sklearn.datasets.load_digits", "n_train": train_ND.shape[0], "n_test": test_ND.shape[0],
            "dim": pixels_ND.shape[1], "image_shape": [8, 8], "pixel_scale": scale,
            "preprocessing": "pixels (0..16) divided by pixel_scale so E||x||^2 = 64 on the train split; not centred"}
    return train_ND / scale, test_ND / scale, meta


# --- training --------------------------------------------------------------------------------
def trainer_config(name: str, s: StudySettings, seed: int, k: Optional[int] = None, l1: Optional[float] = None) -> dict:
    """A registry trainer config; which knobs apply is read from the architecture's config fields."""
    arch = get_architecture(name)
    values: dict[str, Any] = dict(steps=s.steps, activation_dim=64, dict_size=s.dict_size, layer=0, lm_name=LM_NAME,
                                  lr=s.lr, seed=seed, device="cpu")
    for key, frac in SCHEDULE_FRACTIONS.items():
        if key in arch.field_names:
            values[key] = max(1, int(frac * s.steps))
    if k is not None:
        values["k"] = k
    if l1 is not None:
        values["l1_penalty"] = l1
    return arch.trainer_config(DEFAULT_VARIANT, **values)


def train_together(configs: list[dict], x_train_ND: torch.Tensor, s: StudySettings,
                   seed: int) -> list[tuple[Any, float]]:
    """Train every config on the same sequence of batches; returns (trainer, seconds spent in its updates)."""
    trainers = []
    for cfg in configs:
        cfg = dict(cfg)
        trainers.append(cfg.pop("trainer")(**cfg))
    seconds = [0.0] * len(trainers)
    gen = torch.Generator().manual_seed(seed)
    for step in range(s.steps):
        x_BD = x_train_ND[torch.randint(0, x_train_ND.shape[0], (s.batch_size,), generator=gen)]
        for i, trainer in enumerate(trainers):
            start = time.perf_counter()
            trainer.update(step, x_BD)
            seconds[i] += time.perf_counter() - start
    return list(zip(trainers, seconds))


def save_dictionary(trainer: Any, folder: Path, architecture: str) -> None:
    """The trainSAE layout (ae.pt + config.json), so load_dictionary reads it back; the config also
    records the registry name and variant, so readers need not infer them from trainer_class."""
    save_torch({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, folder / "ae.pt")
    trainer_cfg = json.loads(json.dumps(trainer.config, default=str))  # JSON-safe: other values as strings
    write_json(folder / "config.json",
               {"trainer": {**trainer_cfg, "architecture": architecture, "variant": DEFAULT_VARIANT}})


def _run_name(name: str, k: Optional[int], l1: Optional[float]) -> str:
    return f"{name}_k{k}" if k is not None else f"{name}_l1_{l1:.4g}"


def _train_and_record(specs: list[RunSpec], x_train_ND: torch.Tensor, x_test_ND: torch.Tensor, s: StudySettings,
                      seed: int, out_dir: Path) -> tuple[list[dict], dict[str, torch.nn.Module]]:
    """Train ``specs`` together, save each dictionary, and measure it: (rows, run name -> dictionary)."""
    configs = [trainer_config(name, s, seed, k=k, l1=l1) for name, k, l1 in specs]
    rows, models = [], {}
    for (name, k, l1), (trainer, seconds) in zip(specs, train_together(configs, x_train_ND, s, seed)):
        run = _run_name(name, k, l1)
        save_dictionary(trainer, out_dir / "dictionaries" / run, name)
        ae = trainer.ae.eval()
        models[run] = ae
        rows.append({"run": run, "architecture": name, "trainer_class": type(trainer).__name__, "k": k,
                     "l1_penalty": l1, **measure(ae, x_test_ND), "train_seconds": round(seconds, 2),
                     "dictionary": f"dictionaries/{run}"})
    return rows, models


# --- matching the L1-penalised SAE to each target L0 ------------------------------------------
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


def _l1_refinements(rows: list[dict], l1_based: list[str], k_values: tuple[int, ...]) -> list[RunSpec]:
    """One more run per L1-penalised architecture and target k: the penalty that interpolates to L0 = k."""
    refine = []
    for name in l1_based:
        points = [(r["l1_penalty"], r["l0"]) for r in rows if r["architecture"] == name]
        tried = {round(l1, 6) for l1, _ in points}
        for k in k_values:
            l1 = float(f"{_l1_for_target(points, k):.4g}")
            if round(l1, 6) not in tried:
                tried.add(round(l1, 6))
                refine.append((name, None, l1))
    return refine


def _assign_target_k(rows: list[dict], l1_based: list[str], k_values: tuple[int, ...]) -> None:
    """Set each row's ``target_k``: its k, or for L1-penalised runs the target k its L0 is closest to."""
    for r in rows:
        r["target_k"] = r["k"]
    for name in l1_based:
        own = [r for r in rows if r["architecture"] == name]
        for k in k_values:
            closest = min(own, key=lambda r: abs(math.log(max(r["l0"], 1e-3) / k)))
            if closest["target_k"] is None or abs(closest["l0"] - k) < abs(closest["l0"] - closest["target_k"]):
                closest["target_k"] = k


def _train_all(x_train_ND: torch.Tensor, x_test_ND: torch.Tensor, s: StudySettings, seed: int,
               out_dir: Path) -> tuple[list[dict], dict[str, torch.nn.Module]]:
    """k-sparse architectures at every k, the L1-penalised ones over the grid plus refinements."""
    k_based = [name for name in DIGITS_ARCHITECTURES if "k" in get_architecture(name).field_names]
    l1_based = [name for name in DIGITS_ARCHITECTURES if name not in k_based]
    specs = [(name, k, None) for name in k_based for k in s.k_values]
    specs += [(name, None, l1) for name in l1_based for l1 in s.l1_grid]
    rows, models = _train_and_record(specs, x_train_ND, x_test_ND, s, seed, out_dir)
    refine = _l1_refinements(rows, l1_based, s.k_values)
    if refine:
        more_rows, more_models = _train_and_record(refine, x_train_ND, x_test_ND, s, seed, out_dir)
        rows += more_rows
        models.update(more_models)
    _assign_target_k(rows, l1_based, s.k_values)
    return rows, models


# --- the study -------------------------------------------------------------------------------
def _reuse(results_path: Path, seed: int, quick: bool) -> dict:
    """The finished study in ``results_path`` if it was run with this seed and size; else refuse."""
    existing = read_json(results_path, "digits study results")
    settings = existing.get("settings", {})
    if (settings.get("seed"), settings.get("quick")) == (seed, quick):
        return existing
    raise StudyError(
        f"{results_path} holds a study with seed={settings.get('seed')}, quick={settings.get('quick')}, not "
        f"seed={seed}, quick={quick}; pass force=True (--force) to replace it or choose another OUT_DIR"
    )


def _describe(s: StudySettings, seed: int, quick: bool, data_meta: dict[str, Any]) -> dict[str, Any]:
    """The self-describing head of results.json."""
    return {
        "title": "Controlled digits study: MP-SAE vs shallow SAEs at matched L0",
        "description": (
            f"sklearn 8x8 digits ({data_meta['n_train']} train / {data_meta['n_test']} test images) standing in for "
            f"MNIST; {s.dict_size} atoms; ReLU+L1, TopK, VSAETopK and MP-SAE trained on the same {s.steps} batches of "
            f"{s.batch_size} (lr {s.lr}); table rows: the runs at L0 ~ {s.matched_k} (the L1 penalty of the "
            "standard SAE tuned to it; its actual L0 is reported); metrics on the held-out images."
        ),
        "settings": {**asdict(s), "seed": seed, "quick": quick, "architectures": list(DIGITS_ARCHITECTURES)},
        "dataset": data_meta,
        "definitions": dict(DEFINITIONS),  # a copy: callers may edit their results
    }


def run_digits_study(out_dir: Path, force: bool = False, seed: int = 0, quick: bool = False) -> dict:
    """Run (or, if ``out_dir/results.json`` holds the same study and not ``force``, reuse) the study."""
    out_dir = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StudyError(f"seed must be an int >= 0, got {seed!r}")
    results_path = out_dir / RESULTS
    if results_path.is_file() and not force:
        return _reuse(results_path, seed, quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = QUICK if quick else FULL
    torch.manual_seed(seed)
    x_train_ND, x_test_ND, data_meta = load_digits_split(seed, s.test_fraction)
    rows, models = _train_all(x_train_ND, x_test_ND, s, seed, out_dir)
    matched = sorted((r for r in rows if r["target_k"] == s.matched_k),
                     key=lambda r: DIGITS_ARCHITECTURES.index(r["architecture"]))
    inference = inference_k_curves(models, matched, x_test_ND, s.inference_ks)
    results: dict[str, Any] = {
        **_describe(s, seed, quick, data_meta),
        "table": [{key: r[key] for key in TABLE_KEYS} for r in matched],
        "rows": rows,
        "inference_k": inference,
        "claim": claim_check(matched, inference),
    }
    results["figures"] = make_figures(results, models, matched, x_test_ND, out_dir)
    results["elapsed_seconds"] = round(time.perf_counter() - start, 1)
    write_json(results_path, results)
    return results


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
