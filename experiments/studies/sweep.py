"""Run a whole study: train every SAE of its run on one shared activation buffer, run the SAEBench
evals and the analyses, and write ``results.json`` and the HTML report.

Layout of RUN_DIR::

    study.json                       the study as run
    saes/seed_<s>/trainer_i/         one training run per seed, dictionary_learning's layout
                                     (ae.pt, config.json, metrics.json)
    saebench/eval_results/           SAEBench's result files and summary.json
    analyses/sample.pt               the analysis contexts and their activations (one sample for all SAEs)
    analyses/seed_<s>/trainer_i/     analysis.json per SAE (+ latent map and feature pages for the first seed)
    digits/                    the MP-SAE digits study (studies with digits=True)
    synth/                     the synthetic ground-truth study (studies with synth=SETUP)
    results.json               every number above, one row per SAE (``experiments.studies.results``)
    report/index.html          the report (``python -m experiments.report RUN_DIR``)

A re-run skips every stage whose output exists (stages write their outputs last and atomically);
``force`` redoes them all.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dictionary_learning_ext.errors import StudyError, VsaeError
from dictionary_learning_ext.io import read_json, write_json
from dictionary_learning_ext.registry import DEFAULT_VARIANT, read_trainer_config

from experiments.console import Progress, stage_output
from experiments.studies.definitions import Study
from experiments.studies.results import Analysis, EvalOutcome, SaeResult, StudyResults
from experiments.training.plan import PlannedTrainer, parse_overrides, plan_trainers

SAES = "saes"


def saes_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SAES


@dataclass(frozen=True)
class Unit:
    """One training run of a study: some of its planned SAEs at one seed, on one activation buffer."""

    seed: int
    indices: tuple[int, ...]
    """Planned trainer indices (``plan_trainers``) the run trains, in order."""
    folder: str
    """The run's folder relative to RUN_DIR/saes."""


def units(study: Study) -> list[Unit]:
    """The study's runs: one per seed (``study.units == "seed"``), or one per SAE and seed ("sae")."""
    plan = plan_trainers(study.run)
    if study.units == "seed":
        return [Unit(seed, tuple(t.index for t in plan), f"seed_{seed}") for seed in study.seeds]
    return [Unit(seed, (t.index,), f"seed_{seed}/sae_{t.index}") for seed in study.seeds for t in plan]


def unit_config(study: Study, unit: Unit, folder: Path):
    """The RunConfig of a unit: the study's run, at the unit's seed, restricted to its SAEs."""
    run = study.run.replace(save_dir=str(folder), seed=unit.seed, checkpoint_every=max(1, study.run.steps // 10))
    if len(unit.indices) == len(plan_trainers(study.run)):
        return run
    (t,) = (plan_trainers(study.run)[i] for i in unit.indices)
    # Overrides for every architecture apply to this one only where it has the field.
    overrides = tuple(item for item, (arch, key, _) in zip(run.overrides, parse_overrides(run.overrides))
                      if arch == t.architecture or (arch is None and key in t.arch.field_names))
    return run.replace(architectures=(t.label,), ks=(t.k,) if t.k is not None else run.ks, overrides=overrides)


@dataclass(frozen=True)
class Shard:
    """This process's share of a study's runs: units index, index + count, ... (``--shard index/count``, a
    Slurm array, or torchrun's ranks)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise StudyError(f"shard {self.index}/{self.count}: the index must lie in 0..{self.count - 1} "
                             "(e.g. --shard 0/2 and --shard 1/2)")

    def owns(self, i: int) -> bool:
        return i % self.count == self.index


@dataclass(frozen=True)
class TrainedSae:
    seed: int
    trainer: PlannedTrainer
    """As the study plans it (registry name, variant, k; ``trainer.index`` its place in the plan)."""
    path: str
    """Its trainer folder relative to RUN_DIR/saes (and RUN_DIR/analyses)."""


# --- what was trained ------------------------------------------------------------------------
def check_trained(study: Study, run_dir: Path) -> list[TrainedSae]:
    """Every planned SAE of every seed, where its run put it; each folder's config.json must record the
    planned architecture, variant and k, so labels are right."""
    plan = plan_trainers(study.run)
    out = []
    for unit in units(study):
        for position, index in enumerate(unit.indices):
            want, path = plan[index], f"{unit.folder}/trainer_{position}"
            cfg = read_trainer_config(saes_dir(run_dir) / path)["trainer"]
            if "architecture" not in cfg:
                raise StudyError(f"{saes_dir(run_dir) / path} does not record its architecture (an older run); "
                                 "pass --force")
            have = PlannedTrainer(index, cfg["architecture"], cfg.get("variant", DEFAULT_VARIANT), cfg.get("k"))
            if (want.label, want.k) != (have.label, have.k):
                raise StudyError(
                    f"{saes_dir(run_dir) / path} holds {have.label} k={have.k}, but the study plans {want.label} "
                    f"k={want.k}: the run folder is from another study; pass --force"
                )
            out.append(TrainedSae(unit.seed, want, path))
    return sorted(out, key=lambda t: (study.seeds.index(t.seed), t.trainer.index))


def unfinished(study: Study, run_dir: Path) -> list[Unit]:
    from experiments.training.run_folder import run_status

    return [u for u in units(study) if run_status(saes_dir(run_dir) / u.folder) != "finished"]


# --- stages --------------------------------------------------------------------------------
def stage_train(study: Study, run_dir: Path, force: bool, shard: Shard = Shard()) -> Optional[float]:
    """This shard's training runs (all of them unsharded); finished runs are kept, an interrupted one
    continues from its last checkpoint."""
    from experiments.training.run import resume_run, train_run
    from experiments.training.run_folder import run_status

    mine = [u for i, u in enumerate(units(study)) if shard.owns(i)]
    todo = [u for u in mine if force or run_status(saes_dir(run_dir) / u.folder) != "finished"]
    if not todo:
        return None
    steps = study.run.steps
    detail = f"{len(todo)} runs" + (f" of shard {shard.index}/{shard.count}" if shard.count > 1 else "")
    progress = Progress("train", steps * len(todo), "steps", detail=detail)
    for i, unit in enumerate(todo):
        folder = saes_dir(run_dir) / unit.folder
        on_step = lambda step, done=i * steps, name=unit.folder: progress.update(done + step, detail=name)  # noqa: E731
        if run_status(folder) == "interrupted" and not force:  # a killed sweep continues from its last checkpoint
            progress.update(detail=f"{unit.folder}: continuing from its last checkpoint")
            resume_run(folder, on_step=on_step)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            train_run(unit_config(study, unit, folder), overwrite=True, on_step=on_step)
    return progress.finish(f"{len(todo)} run(s)")


def stage_evals(study: Study, run_dir: Path, force: bool) -> Optional[float]:
    """SAEBench on every SAE of every seed. A failed eval does not stop the others: it is recorded as
    "failed" with its error (and shown so in the report), and a re-run retries the evals."""
    from dictionary_learning_ext.errors import EvalError
    from saebench_adapters.run_evals import run_evals

    out = run_dir / "saebench"
    summary = out / "eval_results" / "summary.json"
    if summary.is_file() and not force and read_json(summary, "SAEBench summary").get("status") != "failed":
        return None
    n_saes = len(plan_trainers(study.run)) * len(study.seeds)
    progress = Progress("evals", len(study.evals) * n_saes, "SAE evals", detail=", ".join(study.evals))
    with result_files_watched(out / "eval_results", progress):
        try:
            run_evals(saes_dir(run_dir), evals=list(study.evals), model=study.run.model, profile=study.eval_profile,
                      out=out, device=study.run.device)
        except EvalError as err:
            if getattr(err, "summary", None) is None:  # nothing recorded: not an eval's own failure
                raise
            return progress.finish(f"FAILED: {err}")
    return progress.finish()


@contextlib.contextmanager
def result_files_watched(folder: Path, progress: Progress, every: float = 2.0):
    """Count SAEBench's per-SAE result files as they appear (the evals report no progress of their own)."""
    folder = folder.resolve()  # the evals change the working directory: a relative run dir would count nothing
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every):
            done = sum(1 for f in folder.glob("*/*.json") if f.name != "summary.json")
            progress.update(done)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def stage_analyses(study: Study, run_dir: Path, trained: list[TrainedSae], force: bool) -> Optional[float]:
    from experiments.analyses.activations import ActivationSample, sample_from_text
    from experiments.lm.models import load_model

    folder = run_dir / "analyses"
    todo = [t for t in trained if force or not (folder / t.path / "analysis.json").is_file()]
    if not todo:
        return None
    progress = Progress("analyses", len(todo), "SAEs")
    run = study.run
    lm = load_model(run.model, layer=run.layer, device=run.device)
    tl = lm.hooked_transformer()
    sample_path = folder / "sample.pt"
    if sample_path.is_file() and not force:
        sample = ActivationSample.load(sample_path)
    else:
        sample = sample_from_text(lm, tl, run.text, study.analysis_contexts, run.ctx_len, study.seeds[0])
        sample.save(sample_path)
    for i, t in enumerate(todo):
        title = t.trainer.label + (f" k={t.trainer.k}" if t.trainer.k is not None else "") + f" seed {t.seed}"
        analyse_sae(saes_dir(run_dir) / t.path, folder / t.path, sample, tl, study, title,
                    figures=t.seed == study.seeds[0])
        progress.update(i + 1)
    return progress.finish()


def analyse_sae(trainer_dir: Path, out: Path, sample, tl, study: Study, title: str, figures: bool = True) -> dict[str, Any]:
    """Every per-SAE analysis; writes figures (the latent map and feature pages, with ``figures``), then
    analysis.json last (it marks the SAE as done)."""
    from experiments.analyses import cosine, feature_pages, firing, latent_map
    from saebench_adapters.wrappers import load_sae

    sae = load_sae(trainer_dir, device=study.run.device)
    codes = firing.encode_sparse(sae, sample.acts_BD)
    stats = firing.firing_stats(codes, study.unique_window)
    cos = cosine.cosine_stats(sae.W_dec, stats["alive_F"])
    result: dict[str, Any] = {"firing": firing.scalar_part(stats), "cosine": cos, "figures": [], "feature_pages": []}
    too_few = latent_map.too_few_latents(stats["n_alive"], study.n_clusters)
    if not figures:
        result["latent_map"] = {"skipped": "drawn for the first seed only"}
        write_json(out / "analysis.json", result)
        return result
    if too_few:  # say so in the report
        result["latent_map"] = {"skipped": too_few}
    else:
        m = latent_map.latent_map(sae.W_dec, stats, study.n_clusters, study.run.seed)
        latent_map.plot_latent_map(m, title, out / "latent_map.png")
        result["latent_map"] = {"clusters": m["clusters"]}
        result["figures"].append({"file": "latent_map.png", "caption": f"Global latent map of {title}"})
    token_str = lambda i: feature_pages.readable_token(tl.tokenizer, i)  # noqa: E731
    for latent in feature_pages.choose_latents(stats, study.feature_pages):
        page = feature_pages.feature_page(latent, codes, sample.tokens_NT, sae.W_dec, tl.W_U, token_str,
                                          study.page_examples)
        hist = f"latent_{latent}_hist.png"
        feature_pages.plot_activation_histogram(page, title, out / hist)
        result["feature_pages"].append({**feature_pages.public(page), "histogram": hist})
    write_json(out / "analysis.json", result)
    return result


def stage_digits(study: Study, run_dir: Path, force: bool) -> Optional[float]:
    from experiments.digits.study import run_digits_study

    if (run_dir / "digits" / "results.json").is_file() and not force:
        return None
    progress = Progress("digits", 1, "study")
    run_digits_study(run_dir / "digits", force=force, seed=study.seeds[0], quick=study.digits_quick)
    return progress.finish()


def stage_synth(study: Study, run_dir: Path, force: bool) -> Optional[float]:
    from experiments.synth.study import run_synth_study

    if (run_dir / "synth" / "results.json").is_file() and not force:
        return None
    progress = Progress("synth", 1, "study", detail=f"setup {study.synth}, seeds {', '.join(map(str, study.seeds))}")
    run_synth_study(run_dir / "synth", setup=study.synth, seeds=study.seeds, quick=study.synth_quick, force=force)
    return progress.finish()


# --- results.json --------------------------------------------------------------------------
def collect_results(study: Study, run_dir: Path, trained: list[TrainedSae],
                    seconds: dict[str, Optional[float]]) -> StudyResults:
    from saebench_adapters.wrappers import sae_name

    previous = {}
    if (run_dir / "results.json").is_file():
        previous = read_json(run_dir / "results.json", "study results").get("wall_seconds", {})
    wall = {stage: round(s, 1) if s is not None else previous.get(stage) for stage, s in seconds.items()}
    digits = read_json(run_dir / "digits" / "results.json", "digits results") if study.digits else None
    synth = read_json(run_dir / "synth" / "results.json", "synth results") if study.synth else None
    results = StudyResults(study=study, run_dir=str(run_dir.resolve()), saes=[], wall_seconds=wall, digits=digits,
                           synth=synth)
    if not trained:
        return results
    summary_path = run_dir / "saebench" / "eval_results" / "summary.json"
    summary = read_json(summary_path, "SAEBench summary")
    folder = saes_dir(run_dir)
    for sae in trained:
        t = sae.trainer
        outcomes = summary["saes"].get(sae_name(folder, folder / sae.path))
        if outcomes is None:
            raise StudyError(f"{summary_path} has no results for {sae.path}; re-run with --force")
        results.saes.append(SaeResult(
            trainer=t.trainer, seed=sae.seed, path=sae.path, label=t.label, architecture=t.architecture,
            variant=t.variant, k=t.k,
            dict_size=study.run.dict_size, protocol=recorded_protocol(run_dir, sae),
            train_metrics=read_json(folder / sae.path / "metrics.json", "training metrics"),
            saebench={e: EvalOutcome.from_dict(o) for e, o in outcomes.items() if isinstance(o, dict) and "status" in o},
            analysis=Analysis(**read_json(run_dir / "analyses" / sae.path / "analysis.json", "analysis")),
        ))
    train_run = read_json(saes_dir(run_dir) / units(study)[0].folder / "run.json", "run record")
    results.model, results.hook_name, results.d_model = train_run["model"], train_run["hook_name"], train_run["d_model"]
    results.saebench = {k: summary.get(k) for k in ("model", "profile", "standins", "datasets_dropped", "evals", "seconds")}
    return results


# What the report's protocol table shows, as each trainer's config.json records it.
PROTOCOL_RECORD = ("lr", "warmup_steps", "decay_start", "auxk_alpha", "dead_window_tokens")


def recorded_protocol(run_dir: Path, sae: TrainedSae) -> dict[str, Any]:
    """The protocol an SAE was trained under, read back from its config.json and its run's record."""
    trainer_cfg = read_trainer_config(saes_dir(run_dir) / sae.path)["trainer"]
    run_folder, trainer = sae.path.rsplit("/", 1)
    run = read_json(saes_dir(run_dir) / run_folder / "run.json", "run record")
    planned = next(t for t in run["trainers"] if t["trainer"] == trainer)
    return {**{key: trainer_cfg.get(key) for key in PROTOCOL_RECORD},
            "normalize_activations": run["config"]["normalize_activations"],
            "autocast_dtype": run["config"]["autocast_dtype"], "steps": trainer_cfg["steps"],
            "batch_size": run["config"]["batch_size"], "departures": planned.get("departures", {})}


def finished_stages(run_dir: Path) -> list[str]:
    """The stages whose output a run folder holds (a study.json alone means nothing ran to the end)."""
    found = {
        "train": any(saes_dir(run_dir).rglob("run.json")),
        "evals": (run_dir / "saebench" / "eval_results" / "summary.json").is_file(),
        "analyses": any((run_dir / "analyses").glob("seed_*/trainer_*/analysis.json")),
        "digits": (run_dir / "digits" / "results.json").is_file(),
        "synth": (run_dir / "synth" / "results.json").is_file(),
    }
    return [stage for stage, done in found.items() if done]


def prepare_run_dir(study: Study, run_dir: Path, force: bool) -> None:
    path = run_dir / "study.json"
    current = json.loads(json.dumps(study.to_dict()))  # as stored: JSON turns int keys into strings
    if path.is_file() and not force and finished_stages(run_dir):
        old = read_json(path, "study definition")
        if old != current:
            changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            if "run" in changed:
                old_run, new_run = old.get("run", {}), current["run"]
                changed = sorted({k for k in changed if k != "run"}
                                 | {k for k in set(old_run) | set(new_run) if old_run.get(k) != new_run.get(k)})
            raise StudyError(
                f"{run_dir} holds a study with different settings ({', '.join(changed)}); pass --force to redo it "
                "or choose another --run-dir"
            )
    write_json(path, current)


def run_study(study: Study, run_dir: Path, force: bool = False, report: bool = True,
              shard: Shard = Shard()) -> Optional[StudyResults]:
    """Run every stage of ``study`` into ``run_dir``. With a shard, only its training runs; the shard that
    finds every run finished (the last one) then runs the evaluation, the analyses and the report, once.
    Returns None for a shard that leaves those to another."""
    run_dir = Path(run_dir)
    if not run_dir.resolve().parent.is_dir():
        raise StudyError(f"--run-dir parent {run_dir.resolve().parent} does not exist; create it first")
    run_dir.mkdir(exist_ok=True)
    prepare_run_dir(study, run_dir, force)
    seconds: dict[str, Optional[float]] = {}

    def stage(name: str, fn) -> None:
        log = run_dir / "logs" / f"{name}.log"
        with stage_output(log):
            try:
                seconds[name] = fn()
            except VsaeError as err:
                err.add_note(f"the {name} stage's full output is in {log}")
                raise
        if seconds[name] is None:
            print(f"{name:<9} already done (use --force to redo)", flush=True)

    trained: list[TrainedSae] = []
    with after_training(study, run_dir, shard, force) as lead:
        if study.run.architectures:
            stage("train", lambda: stage_train(study, run_dir, force, shard))
        if not lead():
            return None
        if study.run.architectures:
            trained = check_trained(study, run_dir)
            stage("evals", lambda: stage_evals(study, run_dir, force))
            stage("analyses", lambda: stage_analyses(study, run_dir, trained, force))
        if study.digits:
            stage("digits", lambda: stage_digits(study, run_dir, force))
        if study.synth:
            stage("synth", lambda: stage_synth(study, run_dir, force))
        results = collect_results(study, run_dir, trained, seconds)
        results.save(run_dir)
        if report:
            from experiments.studies.report import write_report

            progress = Progress("report", 1, "page")
            with stage_output(run_dir / "logs" / "report.log"):
                write_report(run_dir)
            progress.finish()
    return results


@contextlib.contextmanager
def after_training(study: Study, run_dir: Path, shard: Shard, force: bool):
    """Yields ``lead()``: whether this process goes on after its training runs. Unsharded, always; a shard goes
    on only when every run of the study is finished and no other shard has taken the lead (an exclusive
    lock, released when this process ends, even by a kill)."""
    import fcntl
    import os

    fd = None

    def lead() -> bool:
        nonlocal fd
        if shard.count == 1:
            return True
        left = unfinished(study, run_dir) if study.run.architectures else []
        if left:
            print(f"shard {shard.index}/{shard.count}: its runs are done; {len(left)} run(s) of other shards are "
                  "not finished yet, and the shard that finishes last evaluates and writes the report", flush=True)
            return False
        fd = os.open(run_dir / ".lead.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"shard {shard.index}/{shard.count}: another shard is evaluating and writing the report", flush=True)
            return False
        return True

    try:
        yield lead
    finally:
        if fd is not None:
            os.close(fd)
