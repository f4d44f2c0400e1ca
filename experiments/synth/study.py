"""The synthetic study: train every SAE of a setup on activations drawn from the synthetic model, score each
with SAELens's ``eval_sae_on_synthetic_data`` against the known features, and write ``results.json``.

Training reuses the project's machinery end to end: a ``RunConfig`` per group of SAEs carrying the studies'
protocol (``setups.SYNTH_PROTOCOL``), ``plan_trainers`` / ``trainer_configs`` (which apply it to every trainer
and refuse what an architecture cannot honour), and the resumable loop ``experiments.training.loop.train``
(every SAE of a seed steps on the same batches; trainSAE layout ``trainer_i/{ae.pt, config.json}``, the
activation normalisation folded back into the saved weights). The activation source is the synthetic model
itself: batch i of seed s is ``SyntheticModel.sample`` under torch's RNG seeded to (s, i), so every group of
a seed sees the same batches whatever else trains beside it.

Matched L0: the k-sparse SAEs are trained at every target k. The L1-penalised ones (``standard``, ``vsae``)
are calibrated on the first seed, as the digits study does: a grid of penalties, then (at most two rounds)
one run per target still missed at the penalty interpolated (log-log) to it; for each target the first-seed
run whose L0 is closest is kept and its penalty is used for every other seed (the same configuration over
seeds). An SAE whose L0 does not respond to the penalty is not refined, and results.json says which targets
were reached (``settings.l1_calibration``, the table's ``on_target``). Every run is scored after it is read
back from disk (``load_dictionary``), so results.json is a re-evaluation of the saved dictionaries
(``reevaluate`` redoes it).

Jobs (a seed's k-sparse SAEs, the first seed's L1 grid and refinements, the later seeds' L1 SAEs) run on
``workers`` spawned processes, one core each; a job's numbers do not depend on where it runs.

Layout of OUT_DIR: ``results.json``, the figures, ``synthetic_model/`` (SAELens's save format; reloadable with
``SyntheticModel.load_from_disk``), ``runs/seed_<s>/<group>/trainer_<i>/{ae.pt, config.json}``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from dictionary_learning_ext.errors import ConfigError, StudyError
from dictionary_learning_ext.io import read_json, write_json
from dictionary_learning_ext.registry import load_dictionary, parse_spec

from experiments.stats import mean_interval
from experiments.training.config import RunConfig
from experiments.training.loop import LoopOptions, train
from experiments.training.plan import plan_trainers, protocol_values, trainer_configs

from . import claims as claims_mod
from .metrics import GROUP_DEFINITIONS, EvalSet, feature_groups, group_summary, per_feature, saelens_metrics, saelens_sae
from .model import MODEL_DIR, build_model, feature_structure, save_model
from .setups import Setup, get_setup

__all__ = ["RESULTS", "SyntheticBatches", "build_trainer_configs", "format_table", "reevaluate", "run_synth_study",
           "score_run", "study_setup"]

RESULTS = "results.json"
RUNS = "runs"
LM_NAME = "synthetic"
"""The trainers' configs require a model name; these activations come from the synthetic model, not an LM."""
SEED_STRIDE = 1_000_003
TABLE_METRICS = ("sae_l0", "f1", "mcc", "uniqueness", "explained_variance", "precision", "recall", "dead_latents",
                 "shrinkage")
GROUP_TABLE = ("parent", "child", "correlated", "independent")
DEFINITIONS = {
    "sae_l0": "mean number of non-zero latents per held-out sample (SAELens L0Calculator)",
    "true_l0": "mean number of active true features per held-out sample",
    "f1 / precision / recall / accuracy": "SAELens: each latent as a detector of the true feature its decoder row is "
                                          "closest to (|cos|); per-latent scores averaged over latents",
    "mcc": "SAELens: mean |cos| of the one-to-one Hungarian matching of decoder rows to true feature vectors",
    "uniqueness": "SAELens: distinct true features among the latents' closest features / number of latents",
    "explained_variance": "SAELens: 1 - E||x - x_hat||^2 / Var(x) on the held-out samples",
    "dead_latents": "latents that never fire on the held-out samples",
    "shrinkage": "mean ||x_hat|| / ||x||",
    "groups.<group>.recall": "per true feature in reach: share of its held-out firings on which the latent the MCC "
                             "matching assigns to it fires (0 if none is assigned), averaged over the group",
    "groups.<group>.cos": "per true feature in reach: |cos| with its matched latent (0 if none), averaged",
    "groups.<group>.matched": "share of the group's features some latent is assigned to by the MCC matching",
    "in reach": "the dict_size most frequent true features (indices 0..dict_size-1, the Zipf ranks)",
    "true_l0_in_reach": "mean number of active true features in reach per held-out sample (SynthSAEBench-16k: ~25 "
                        "over its 4096 most frequent, the width it recommends)",
    **{f"group {name}": text for name, text in GROUP_DEFINITIONS.items()},
}

L1_TOLERANCE = math.log(1.15)
"""A first-seed L1 run within 15% of a target L0 ends that target's calibration."""
L1_ROUNDS = 2
"""At most this many refinement rounds of the L1 penalties (each trains the missing ones on the first seed)."""

RunSpec = tuple[str, Optional[int], Optional[float]]
"""(SAE label ``name[:variant]``, k or None, L1 penalty or None): one dictionary to train."""


# --- the activation source -------------------------------------------------------------------------------
class SyntheticBatches:
    """Training activations (B, D): batch i is ``model.sample(batch_size)`` with torch's RNG seeded to
    ``seed * SEED_STRIDE + i`` (the caller's RNG state untouched), so the stream depends on the seed alone."""

    def __init__(self, model: Any, batch_size: int, seed: int, setup: str):
        self.model = model
        self.batch_size = batch_size
        self.seed = seed
        self.index = 0
        self.config = {"source": "sae_lens.synthetic.SyntheticModel.sample", "setup": setup,
                       "batch_size": batch_size, "data_seed": seed}
        device = model.feature_dict.feature_vectors.device
        self._devices = [device.index or 0] if device.type == "cuda" else []

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> torch.Tensor:
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(self.seed * SEED_STRIDE + self.index)
            x_BD = self.model.sample(self.batch_size)
        self.index += 1
        return x_BD

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.index = int(state["index"])


# --- trainer configs through the run configuration ------------------------------------------------------------
def _run_config(setup: Setup, labels: Sequence[str], ks: Sequence[int], seed: int, device: str,
                overrides: Sequence[str] = ()) -> RunConfig:
    t = setup.training
    return RunConfig(architectures=tuple(labels), ks=tuple(ks), dict_size=t.dict_size, steps=t.steps,
                     batch_size=t.batch_size, seed=seed, device=device, overrides=tuple(overrides), **t.protocol())


def build_trainer_configs(specs: Sequence[RunSpec], setup: Setup, seed: int, device: str) -> tuple[list[dict], list[str], dict]:
    """trainSAE config dicts for ``specs`` (in order), their variants, and the protocol values each SAE's
    variant keeps against the protocol (label -> {key: protocol value})."""
    configs, variants, departures = [], [], {}
    for label, k, l1 in specs:
        arch, variant = parse_spec(label)
        overrides = (f"{arch.name}.l1_penalty={l1!r}",) if l1 is not None else ()
        if "sparsity_warmup_steps" in arch.field_names:
            # dictionary_learning's 2000-step L1 warm-up must end before the protocol's decay starts (its
            # get_lr_schedule asserts it); a tenth of the run, the project's scaling of step defaults.
            overrides += (f"{arch.name}.sparsity_warmup_steps={setup.training.steps // 10}",)
        run = _run_config(setup, [label], [k if k is not None else 1], seed, device, overrides)
        plan = plan_trainers(run)
        if len(plan) != 1 or (plan[0].k is None) != (k is None):
            raise StudyError(f"{label}: planned {len(plan)} trainers for one run spec (k={k}); expected one")
        configs += trainer_configs(run, plan, setup.model.hidden_dim, LM_NAME)
        variants.append(variant)
        kept = protocol_values(run, plan[0])[1]
        if kept:
            departures[label] = kept
    return configs, variants, departures


def _k_specs(setup: Setup) -> list[RunSpec]:
    return [(label, k, None) for label in setup.training.k_based() for k in setup.training.l0_targets]


def _grid_specs(setup: Setup) -> list[RunSpec]:
    t = setup.training
    return [(label, None, float(l1)) for label in t.l1_based() for l1 in t.l1_grid[parse_spec(label)[0].name]]


# --- scoring ---------------------------------------------------------------------------------------------
def score_run(folder: Path, model: Any, eval_set: EvalSet, groups: Mapping[str, Any], device: str = "cpu") -> dict[str, Any]:
    """A saved dictionary read back and scored: SAELens's metrics and the per-feature group summary."""
    dictionary, config = load_dictionary(folder, device=device)
    sae = saelens_sae(dictionary, config["trainer"], device=device)
    return {**saelens_metrics(sae, model, eval_set), "groups": group_summary(per_feature(sae, model, eval_set), groups)}


class _Context:
    """What scoring needs, built once per process: the synthetic model (read back from its saved copy, so the
    main process, every worker and ``reevaluate`` score against the same model), the held-out set and the
    feature groups."""

    def __init__(self, out_dir: Path, setup: Setup, device: str):
        from sae_lens.synthetic import SyntheticModel

        t = setup.training
        self.out_dir, self.device = out_dir, device
        self.model = SyntheticModel.load_from_disk(out_dir / MODEL_DIR, device=device)
        self.structure = feature_structure(self.model)
        self.groups = feature_groups(self.structure, in_reach=t.dict_size)
        self.eval_set = EvalSet(self.model, t.eval_samples, t.eval_batch_size, t.eval_seed,
                                cache=t.eval_samples <= 200_000)


_CONTEXTS: dict[tuple[str, str], _Context] = {}


def _context(out_dir: Path, setup: Setup, device: str) -> _Context:
    key = (str(out_dir), device)
    if key not in _CONTEXTS:
        _CONTEXTS.clear()  # one study per process at a time
        _CONTEXTS[key] = _Context(out_dir, setup, device)
    return _CONTEXTS[key]


def _train_and_score(out_dir: Path, setup: Setup, seed: int, group: str, specs: Sequence[RunSpec],
                     device: str) -> tuple[list[dict], dict[str, float]]:
    """Train ``specs`` together on seed ``seed``'s batches into runs/seed_<seed>/<group>, then score each saved
    run. Returns the rows and the seconds spent training and scoring (a job: runs in a worker or in-process)."""
    cpu_started = time.process_time()
    ctx = _context(out_dir, setup, device)
    configs, variants, _ = build_trainer_configs(specs, setup, seed, device)
    save_dir = out_dir / RUNS / f"seed_{seed}" / group
    t = setup.training
    data = SyntheticBatches(ctx.model, t.batch_size, seed, setup.name)
    started = time.perf_counter()
    result = train(data, configs, save_dir, LoopOptions(
        steps=t.steps, normalize_activations=bool(t.protocol()["normalize_activations"]),
        norm_factor_batches=t.norm_factor_batches, device=device), variants=variants)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rows = []
    for i, (label, k, l1) in enumerate(specs):
        folder = save_dir / f"trainer_{i}"
        arch, variant = parse_spec(label)
        rows.append({"sae": label, "architecture": arch.name, "variant": variant, "seed": seed, "k": k,
                     "l1_penalty": l1, "target_l0": k, "role": "matched" if k is not None else "calibration",
                     "dictionary": folder.relative_to(out_dir).as_posix(), "group": group,
                     "group_train_seconds": round(result.train_seconds, 2), "norm_factor": result.norm_factor,
                     **score_run(folder, ctx.model, ctx.eval_set, ctx.groups, device)})
    return rows, {"train": train_seconds, "eval": time.perf_counter() - started,
                  "cpu": time.process_time() - cpu_started}


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: the SAEs' matmuls are small


class _InProcess:
    """The executor interface of ``ProcessPoolExecutor``, run synchronously (one worker, or a GPU)."""

    def submit(self, fn, *args):
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 -- handed to the caller through the future
            future.set_exception(err)
        return future

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


# --- matching the L1-penalised SAEs to the targets ---------------------------------------------------------------
def _l1_for_target(points: list[tuple[float, float]], target: float) -> float:
    # The digits study's interpolation (log L1 against log L0, between the bracketing runs).
    from experiments.digits.study import _l1_for_target as interpolate

    return float(f"{interpolate(points, target):.4g}")


def _log_miss(l0: float, target: float) -> float:
    return abs(math.log(max(l0, 1e-3) / target))


def _flat(own: Sequence[dict]) -> bool:
    """Whether an L1-penalised SAE's L0 does not respond to its penalty over the runs so far (every run within
    10% of the others, or all below 0.05 active latents): interpolating further is meaningless."""
    l0s = [max(r["sae_l0"], 0.0) for r in own]
    return len(own) >= 2 and (max(l0s) < 0.05 or max(l0s) <= 1.1 * min(l0s))


def _refinement(rows: Sequence[dict], setup: Setup) -> list[RunSpec]:
    """The next penalties to try on the first seed: per L1-penalised SAE and target not yet within
    ``L1_TOLERANCE``, the penalty interpolated (log-log) to it from every run so far, kept within a factor 100 of
    the grid; none for an SAE whose L0 does not respond to the penalty."""
    out: list[RunSpec] = []
    for label in setup.training.l1_based():
        own = [r for r in rows if r["sae"] == label]
        if _flat(own):
            continue
        grid = setup.training.l1_grid[parse_spec(label)[0].name]
        points = [(r["l1_penalty"], r["sae_l0"]) for r in own]
        tried = {l1 for l1, _ in points}
        for target in setup.training.l0_targets:
            if min(_log_miss(r["sae_l0"], target) for r in own) <= L1_TOLERANCE:
                continue
            l1 = min(max(_l1_for_target(points, target), min(grid) / 100), max(grid) * 100)
            if l1 not in tried:
                tried.add(l1)
                out.append((label, None, l1))
    return out


def _choose_penalties(rows: list[dict], setup: Setup) -> tuple[list[dict], dict[str, dict[int, float]], dict]:
    """Per L1-penalised SAE and target, the first-seed run closest to the target: its row becomes the matched
    row (listed once more when it serves two targets) and its penalty is used for every other seed. Also the
    calibration record: every penalty tried and its L0, and whether each target was reached (within 25%)."""
    penalties: dict[str, dict[int, float]] = {}
    record: dict[str, Any] = {}
    extra = []
    for label in setup.training.l1_based():
        own = [r for r in rows if r["sae"] == label]
        penalties[label] = {}
        reached = {}
        for target in setup.training.l0_targets:
            best = min(own, key=lambda r: (_log_miss(r["sae_l0"], target), r["l1_penalty"]))
            penalties[label][target] = best["l1_penalty"]
            reached[str(target)] = _log_miss(best["sae_l0"], target) <= math.log(1.25)
            if best["role"] == "calibration":
                best["role"], best["target_l0"] = "matched", target
            else:
                extra.append({**best, "target_l0": target})
        record[label] = {"tried": sorted([r["l1_penalty"], r["sae_l0"]] for r in own),
                         "penalty_by_target": {str(t): v for t, v in penalties[label].items()},
                         "reached_within_25pct": reached,
                         "responds_to_penalty": not _flat(own)}
    return rows + extra, penalties, record


def _l1_specs(penalties: Mapping[str, Mapping[int, float]]) -> list[RunSpec]:
    return [(label, None, l1) for label, by_target in penalties.items() for l1 in dict.fromkeys(by_target.values())]


def _assign_targets(rows: list[dict], penalties: Mapping[str, Mapping[int, float]]) -> list[dict]:
    """Rows of the calibrated L1 runs of a later seed, one per target its penalty serves."""
    out = []
    for r in rows:
        if r["l1_penalty"] is None:
            out.append(r)
            continue
        for target, l1 in penalties[r["sae"]].items():
            if l1 == r["l1_penalty"]:
                out.append({**r, "role": "matched", "target_l0": target})
    return out


def _stop(pool: Any) -> None:
    """Cancel what has not started and end the pool's own worker processes (after a job failed)."""
    if isinstance(pool, ProcessPoolExecutor):
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()


def _train_all(out_dir: Path, setup: Setup, seeds: tuple[int, ...], device: str,
               workers: int) -> tuple[list[dict], dict, dict[str, dict[int, float]], dict[str, Any]]:
    """Every job of the study, on ``workers`` processes (1: in this process). The first seed trains the
    k-sparse SAEs and the L1 grid, then refines the L1 penalties (at most ``L1_ROUNDS`` rounds); the other
    seeds train their k-sparse SAEs meanwhile, and their L1 SAEs once the penalties are chosen. Every job of
    a seed reads the same batches, so the split into jobs changes no number."""
    first, others = seeds[0], seeds[1:]
    k_specs, grid = _k_specs(setup), _grid_specs(setup)
    timing: dict[str, float] = defaultdict(float)
    rows: list[dict] = []
    calibration: list[dict] = []
    penalties: dict[str, dict[int, float]] = {}
    record: dict[str, Any] = {}
    jobs: list[dict[str, Any]] = []
    rounds = 0
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            if workers > 1 else _InProcess())
    with pool:
        def submit(seed: int, group: str, specs: list[RunSpec]):
            return pool.submit(_train_and_score, out_dir, setup, seed, group, specs, device), (seed, group)

        pending = dict([submit(first, "main", k_specs + grid)] + [submit(s, "main", k_specs) for s in others])
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                seed, group = pending.pop(future)
                try:
                    job_rows, job_timing = future.result()
                except BaseException as err:
                    _stop(pool)  # fail fast: no waiting for the other jobs
                    if isinstance(err, BrokenProcessPool):
                        raise StudyError(
                            f"a training worker process died ({err}); if run_synth_study is called from a script, "
                            "guard the call with `if __name__ == '__main__':` (workers are spawned and re-import it), "
                            "or pass workers=1") from err
                    raise
                for key, value in job_timing.items():
                    timing[key] += value
                jobs.append({"seed": seed, "group": group, "saes": len(job_rows),
                             **{k: round(v, 1) for k, v in job_timing.items()}})
                if group == "l1" or seed != first:
                    rows += _assign_targets(job_rows, penalties) if group == "l1" else job_rows
                    continue
                rows += [r for r in job_rows if r["k"] is not None]
                calibration += [r for r in job_rows if r["k"] is None]
                refine = _refinement(calibration, setup) if calibration and rounds < L1_ROUNDS else []
                if refine:
                    rounds += 1
                    pending.update([submit(first, f"l1_refine_{rounds}", refine)])
                    continue
                if calibration:
                    chosen, penalties, record = _choose_penalties(calibration, setup)
                    rows += chosen
                    pending.update(submit(s, "l1", _l1_specs(penalties)) for s in others)
    timing = {f"{k}_summed_over_jobs": round(v, 1) for k, v in timing.items()}
    return rows, record, penalties, {**timing, "jobs": jobs}


# --- the table ---------------------------------------------------------------------------------------------
def make_table(rows: Sequence[dict], setup: Setup) -> list[dict[str, Any]]:
    """Means and 95% t-intervals over seeds per (SAE, target L0), from the matched rows."""
    table = []
    for label in setup.training.architectures:
        for target in setup.training.l0_targets:
            own = [r for r in rows if r["role"] == "matched" and r["sae"] == label and r["target_l0"] == target]
            if not own:
                continue
            l0 = sum(r["sae_l0"] for r in own) / len(own)
            entry: dict[str, Any] = {"sae": label, "target_l0": target, "n_seeds": len(own),
                                     "l1_penalty": own[0]["l1_penalty"],
                                     "on_target": abs(math.log(max(l0, 1e-3) / target)) <= math.log(1.25)}
            for metric in TABLE_METRICS:
                entry[metric] = claims_mod.interval_dict(mean_interval([r[metric] for r in own]))
            for group in GROUP_TABLE:
                values = [r["groups"][group]["recall"] for r in own]
                entry[f"recall_{group}"] = claims_mod.interval_dict(
                    mean_interval([math.nan if v is None else v for v in values]))
            table.append(entry)
    return table


TEXT_COLUMNS = (("sae", "SAE"), ("target_l0", "target"), ("sae_l0", "L0"), ("f1", "F1"), ("mcc", "MCC"),
                ("uniqueness", "uniq."), ("explained_variance", "var. expl."), ("dead_latents", "dead"),
                ("on_target", "L0 on target"))


def format_table(results: dict, tablefmt: str = "simple") -> str:
    """The table as text (a tabulate format: "simple" for a terminal, "github" for markdown): mean ± 95%
    half-width over seeds."""
    from tabulate import tabulate

    def cell(value):
        if isinstance(value, bool):  # an SAE whose L0 missed the target by more than 25% is not a matched point
            return "yes" if value else "NO (L0 missed by >25%)"
        if not isinstance(value, dict):
            return value
        if value["mean"] is None:
            return "–"
        return f"{value['mean']:.3f}" + (f" ± {value['half_width']:.3f}" if value.get("half_width") is not None else "")

    cells = [[cell(e[key]) for key, _ in TEXT_COLUMNS] for e in results["table"]]
    return tabulate(cells, headers=[title for _, title in TEXT_COLUMNS], tablefmt=tablefmt, disable_numparse=True)


# --- the study ---------------------------------------------------------------------------------------------
def study_setup(setup: str | Setup = "synth", quick: bool = False, overrides: Sequence[str] = ()) -> Setup:
    """The setup a run uses: a registered name (or a Setup), its quick version, ``--set`` overrides applied."""
    chosen = get_setup(setup) if isinstance(setup, str) else setup
    if quick:
        chosen = chosen.quick()
    return chosen.with_overrides(list(overrides)) if overrides else chosen


def _check_seeds(seeds: Sequence[int], setup: Setup) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds:
        raise ConfigError("seeds is empty; give at least one seed, e.g. --seeds 0 1 2")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {list(seeds)} must be distinct ints >= 0")
    if setup.training.eval_seed in seeds:
        raise ConfigError(f"seed {setup.training.eval_seed} is the held-out set's seed (training.eval_seed); the "
                          "training and held-out streams must differ: choose other seeds")
    return seeds


def _settings(setup: Setup, seeds: tuple[int, ...], quick: bool, model_source: str, device: str) -> dict[str, Any]:
    return {"setup": setup.to_dict(), "seeds": list(seeds), "quick": quick, "model_source": model_source,
            "device": device}


REUSE_KEYS = ("setup", "seeds", "quick", "model_source")


def _reuse(results_path: Path, settings: Mapping[str, Any]) -> dict:
    existing = read_json(results_path, "synthetic study results")
    saved = existing.get("settings", {})
    settings = json.loads(json.dumps(dict(settings)))  # as results.json holds them (tuples become lists)
    differ = [k for k in REUSE_KEYS if saved.get(k) != settings[k]]
    if not differ:
        return existing
    raise StudyError(f"{results_path} holds a synthetic study with other settings ({', '.join(differ)}); pass "
                     "force=True (--force) to replace it, or choose another OUT_DIR")


def _describe(setup: Setup) -> str:
    t = setup.training
    return (f"{setup.description} SAEs: {', '.join(t.architectures)}; {t.dict_size} latents, {t.steps} steps of "
            f"{t.batch_size} fresh samples; target L0 {', '.join(map(str, t.l0_targets))} (the k of the k-sparse SAEs; "
            f"the L1 penalty of the others tuned to it on the first seed); metrics on {t.eval_samples} held-out "
            "samples; means over seeds with 95% t-intervals.")


def _check_construction(configs: Sequence[dict]) -> None:
    """Build every trainer once on the CPU (and drop it): the trainers' own constructors check what the configs
    cannot (e.g. dictionary_learning's schedule assertions), before anything trains."""
    from experiments.training.loop import build_trainers

    for config in configs:
        try:
            build_trainers([{**config, "device": "cpu"}])
        except AssertionError as err:
            raise ConfigError(f"{config.get('wandb_name', config['trainer'].__name__)}: the trainer refuses its "
                              f"configuration: {err}") from err


def _default_workers(quick: bool, device: str, seeds: tuple[int, ...]) -> int:
    if quick or device != "cpu" or len(seeds) < 2:
        return 1
    return max(1, min(os.cpu_count() or 1, len(seeds), 2))


def _row_order(seeds: tuple[int, ...]):
    rank = {s: i for i, s in enumerate(seeds)}

    def key(r: dict) -> tuple:
        group = r["group"]
        g = 0 if group == "main" else 1000 if group == "l1" else int(group.rsplit("_", 1)[-1])
        return (rank[r["seed"]], g, int(r["dictionary"].rsplit("_", 1)[-1]), r["target_l0"] or -1)

    return key


def run_synth_study(out_dir: Path, setup: str | Setup = "synth", seeds: tuple[int, ...] = (0, 1, 2), quick: bool = False,
                    force: bool = False, *, overrides: Sequence[str] = (), model_source: str = "auto",
                    device: str = "cpu", workers: Optional[int] = None) -> dict:
    """Run (or, if ``out_dir/results.json`` holds the same study and not ``force``, reuse) the synthetic study.

    ``setup``: a registered setup name (``setups.SETUPS``) or a ``Setup``; ``quick``: its seconds-long version;
    ``overrides``: ``model.KEY=VALUE`` / ``training.KEY=VALUE`` strings; ``model_source``: "auto" (the hub copy
    when the setup names one and it is reachable, else a local build), "hub" or "local"; ``device``: torch
    device for the synthetic model and the SAEs; ``workers``: training processes (default: one per core, at
    most 2, on a CPU; 1 for ``quick`` or a GPU) -- they change no number. Everything is checked before anything
    trains."""
    out_dir = Path(out_dir)
    chosen = study_setup(setup, quick, overrides)
    seeds = _check_seeds(seeds, chosen)
    if model_source not in ("auto", "hub", "local"):
        raise ConfigError(f"model source must be 'auto', 'hub' or 'local', got {model_source!r}")
    if model_source == "hub" and not chosen.model.hub_repo:
        raise ConfigError(f"model source 'hub' needs a hub copy of the model; setup {chosen.name!r} names none "
                          "(use --model-source local)")
    workers = _default_workers(quick, device, seeds) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    settings = _settings(chosen, seeds, quick, model_source, device)
    results_path = out_dir / RESULTS
    if results_path.is_file() and not force:
        return _reuse(results_path, settings)
    departures: dict[str, Any] = {}
    for seed in seeds:  # every trainer config of the run, checked now (refinements only change a penalty)
        configs, _, departures = build_trainer_configs(_k_specs(chosen) + _grid_specs(chosen), chosen, seed, device)
    _check_construction(configs)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / RUNS).exists():
        shutil.rmtree(out_dir / RUNS)  # a forced re-run: no stale trainer folders of the previous one
    if results_path.exists():
        results_path.unlink()
    t0 = time.perf_counter()
    model, source = build_model(chosen.model, model_source, device, cache=out_dir / MODEL_DIR)
    if "path" not in source:  # from the hub: keep a copy beside the runs, for re-evaluation
        save_model(model, out_dir / MODEL_DIR)
    source["config"] = model.cfg.to_dict()
    source["matches_setup"] = source["config"] == json.loads(json.dumps(chosen.model.saelens_config().to_dict()))
    del model
    model_seconds = time.perf_counter() - t0
    ctx = _context(out_dir, chosen, device)
    rows, calibration, _, timing = _train_all(out_dir, chosen, seeds, device, workers)
    rows.sort(key=_row_order(seeds))
    t = chosen.training
    labels = list(t.architectures)
    results: dict[str, Any] = {
        "title": "Ground truth: SAEs scored against the known features of a SynthSAEBench-style synthetic model",
        "description": _describe(chosen),
        "settings": {
            **settings, "workers": workers, "protocol": t.protocol(), "lm_name": LM_NAME,
            "auxk": "0 for every SAE: standard, vsae and mp_sae have no auxK, and one protocol applies to all",
            "departures": departures,
            "departures_note": "SAE -> the protocol values its variant does not take (it keeps its own)",
            "model_source_used": source,
            "l1_calibration": calibration,
            "eval": {"samples": t.eval_samples, "batch_size": ctx.eval_set.batch_size, "seed": t.eval_seed,
                     "scorer": "sae_lens.synthetic.eval_sae_on_synthetic_data",
                     "adapter": "saebench_adapters.wrappers.wrap_dictionary (the dictionary's own encode/decode)"}},
        "ground_truth": _ground_truth(rows, ctx, chosen),
        "definitions": dict(DEFINITIONS),
        "rows": rows,
        "table": make_table(rows, chosen),
        "claims": {
            "vsae_topk_vs_topk": claims_mod.vsae_topk_vs_topk(rows, labels, t.l0_targets, t.baseline),
            "mp_sae_structure": claims_mod.mp_sae_structure(rows, labels, t.l0_targets, t.baseline),
        },
        "published": dict(chosen.published),
    }
    from .figures import make_figures

    results["figures"] = make_figures(results, out_dir)
    results["timing_seconds"] = {"model": round(model_seconds, 1), **timing,
                                 "note": "train / eval: wall seconds inside each job; cpu: the job process's CPU "
                                         "seconds (what it costs on an idle core)"}
    results["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    write_json(results_path, results)
    _CONTEXTS.clear()  # the model and held-out set are not kept after the run
    return results


def _ground_truth(rows: Sequence[dict], ctx: _Context, setup: Setup) -> dict[str, Any]:
    structure, groups, reach = ctx.structure, ctx.groups, setup.training.dict_size
    depth = structure["depth"]
    active = sum(float((feats_BF[:, :reach] > 0).sum()) for feats_BF, _ in ctx.eval_set.batches())
    return {
        "num_features": int(depth.shape[0]), "hidden_dim": setup.model.hidden_dim,
        "true_l0": rows[0]["true_l0"] if rows else None,
        "true_l0_in_reach": active / ctx.eval_set.n_samples,
        "features_in_trees": int((depth >= 0).sum()), "in_reach": setup.training.dict_size,
        "group_sizes_in_reach": {name: int(mask.sum()) for name, mask in groups.items()},
        "mean_communality": float(structure["communality"].mean()),
    }


def reevaluate(out_dir: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Score every run of a finished study again from its saved dictionaries (the synthetic model read back
    from ``out_dir/synthetic_model``, the held-out samples redrawn from their seed): its rows, re-scored."""
    out_dir = Path(out_dir)
    results = read_json(out_dir / RESULTS, "synthetic study results")
    setup = Setup.from_dict(results["settings"]["setup"])
    _CONTEXTS.clear()
    ctx = _context(out_dir, setup, device)
    scored: dict[str, dict] = {}
    out = []
    for row in results["rows"]:
        if row["dictionary"] not in scored:
            scored[row["dictionary"]] = score_run(out_dir / row["dictionary"], ctx.model, ctx.eval_set, ctx.groups,
                                                  device)
        out.append({**row, **scored[row["dictionary"]]})
    return out
