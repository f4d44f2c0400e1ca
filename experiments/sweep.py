"""Run a whole study preset: train every (architecture, k) on one shared activation buffer, run
the SAEBench evals, the analyses, and write ``results.json`` and the HTML report.

    python -m experiments.sweep --preset offline --run-dir runs/offline [--set steps=500] [--force]

Layout of RUN_DIR::

    study.json                 the preset as run
    saes/trainer_i/            dictionary_learning's layout (ae.pt, config.json, metrics.json)
    saebench/eval_results/     SAEBench's result files and summary.json
    analyses/sample.pt         the analysis contexts and their activations
    analyses/trainer_i/        analysis.json + figures per SAE
    digits/                    the MP-SAE digits study (presets with digits=True)
    results.json               every number above, one row per SAE
    report/index.html          the report (``python -m experiments.report RUN_DIR``)

A re-run skips every stage whose output exists (stages write their outputs last and atomically);
``--force`` redoes them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.config import ConfigError
from experiments.presets import PRESETS, StudyPreset, get_preset
from saebench_adapters.atomic import write_json


class StudyError(RuntimeError):
    """The run folder or the preset cannot be used as asked; the message says how to fix it."""


# --- what gets trained ----------------------------------------------------------------------
def planned_saes(preset: StudyPreset) -> list[dict[str, Any]]:
    """(label, architecture, k) per trainer, in the order the train CLI creates trainer_i."""
    from experiments.train import trainer_plan

    return [
        {"trainer": f"trainer_{i}", "label": f"{name}:{arch_preset}" if arch_preset else name, "architecture": name,
         "arch_preset": arch_preset or "default", "k": k}
        for i, (_, name, arch_preset, k) in enumerate(trainer_plan(preset.architectures, preset.ks))
    ]


def train_argv(preset: StudyPreset, save_dir: Path) -> list[str]:
    argv = [
        "--architectures", *preset.architectures,
        "--model", preset.model, "--layer", str(preset.layer), "--text", preset.text,
        "--dict-size", str(preset.dict_size), "--k", *map(str, preset.ks),
        "--steps", str(preset.steps), "--batch-size", str(preset.batch_size),
        "--n-ctxs", str(preset.n_ctxs), "--ctx-len", str(preset.ctx_len),
        "--seed", str(preset.seed), "--device", preset.device,
        "--save-dir", str(save_dir), "--overwrite",
        "--checkpoint-every", str(max(1, preset.steps // 10)),
    ]
    if preset.lr is not None:
        argv += ["--lr", repr(preset.lr)]
    if preset.autocast_dtype != "float32":
        argv += ["--autocast-dtype", preset.autocast_dtype]
    for item in preset.overrides:
        argv += ["--set", item]
    return argv


def check_trained(saes_dir: Path, plan: list[dict[str, Any]]) -> None:
    """The trained folders are the planned ones (architecture and k), so labels are right."""
    from dictionary_learning_ext.registry import read_config

    for row in plan:
        cfg = read_config(saes_dir / row["trainer"])["trainer"]
        arch = get_architecture(row["architecture"])
        if cfg["trainer_class"] != arch.trainer_class.__name__ or cfg.get("k") != row["k"]:
            raise StudyError(
                f"{saes_dir / row['trainer']} holds {cfg['trainer_class']} k={cfg.get('k')}, but the preset plans "
                f"{row['label']} k={row['k']}: the run folder is from another study; pass --force"
            )


# --- stages --------------------------------------------------------------------------------
def stage_train(preset: StudyPreset, run_dir: Path, force: bool) -> Optional[float]:
    from experiments import train

    saes_dir = run_dir / "saes"
    status = train.run_status(saes_dir)
    if status == "finished" and not force:
        return None
    start = time.perf_counter()
    if status == "interrupted" and not force:  # a killed sweep continues from its last checkpoint
        print(f"continuing the interrupted training in {saes_dir} from its last checkpoint")
        train.run(train.parse_args(["--resume", str(saes_dir)]))
    else:
        train.run(train.parse_args(train_argv(preset, saes_dir)))
    return time.perf_counter() - start


def stage_evals(preset: StudyPreset, run_dir: Path, force: bool) -> Optional[float]:
    from saebench_adapters.run_evals import run_evals

    out = run_dir / "saebench"
    if (out / "eval_results" / "summary.json").is_file() and not force:
        return None
    start = time.perf_counter()
    run_evals(run_dir / "saes", evals=list(preset.evals), model=preset.model, preset=preset.eval_preset,
              out=out, device=preset.device)
    return time.perf_counter() - start


def stage_analyses(preset: StudyPreset, run_dir: Path, plan: list[dict[str, Any]], force: bool) -> Optional[float]:
    from experiments.analyses.activations import ActivationSample, sample_from_text
    from experiments.models import load_model

    folder = run_dir / "analyses"
    todo = [row for row in plan if force or not (folder / row["trainer"] / "analysis.json").is_file()]
    if not todo:
        return None
    start = time.perf_counter()
    lm = load_model(preset.model, layer=preset.layer, device=preset.device)
    tl = lm.hooked_transformer()
    sample_path = folder / "sample.pt"
    if sample_path.is_file() and not force:
        sample = ActivationSample.load(sample_path)
    else:
        sample = sample_from_text(lm, tl, preset.text, preset.analysis_contexts, preset.ctx_len, preset.seed)
        sample.save(sample_path)
    for row in tqdm(todo, desc="analyses", unit="sae"):
        title = row["label"] + (f" k={row['k']}" if row["k"] is not None else "")
        analyse_sae(run_dir / "saes" / row["trainer"], folder / row["trainer"], sample, tl, preset, title)
    return time.perf_counter() - start


def analyse_sae(trainer_dir: Path, out: Path, sample, tl, preset: StudyPreset, title: str) -> dict[str, Any]:
    """Every per-SAE analysis; writes figures, then analysis.json last (it marks the SAE as done)."""
    from experiments.analyses import cosine, feature_pages, firing, latent_map
    from saebench_adapters.wrappers import load_sae

    sae = load_sae(trainer_dir, device=preset.device)
    codes = firing.encode_sparse(sae, sample.acts_BD)
    stats = firing.firing_stats(codes, preset.unique_window)
    cos = cosine.cosine_stats(sae.W_dec, stats["alive_F"])
    result: dict[str, Any] = {"firing": firing.scalar_part(stats), "cosine": cos, "figures": [], "feature_pages": []}
    too_few = latent_map.too_few_latents(stats["n_alive"], preset.n_clusters)
    if too_few:  # say so in the report
        result["latent_map"] = {"skipped": too_few}
    else:
        m = latent_map.latent_map(sae.W_dec, stats, preset.n_clusters, preset.seed)
        latent_map.plot_latent_map(m, title, out / "latent_map.png")
        result["latent_map"] = {"clusters": m["clusters"]}
        result["figures"].append({"file": "latent_map.png", "caption": f"Global latent map of {title}"})
    token_str = lambda i: tl.tokenizer.decode([i])  # noqa: E731
    for latent in feature_pages.choose_latents(stats, preset.feature_pages):
        page = feature_pages.feature_page(latent, codes, sample.tokens_NT, sae.W_dec, tl.W_U, token_str,
                                          preset.page_examples)
        hist = f"latent_{latent}_hist.png"
        feature_pages.plot_activation_histogram(page, title, out / hist)
        result["feature_pages"].append({**feature_pages.public(page), "histogram": hist})
    write_json(out / "analysis.json", result)
    return result


def stage_digits(preset: StudyPreset, run_dir: Path, force: bool) -> Optional[float]:
    from experiments.digits_study import run_digits_study

    if (run_dir / "digits" / "results.json").is_file() and not force:
        return None
    start = time.perf_counter()
    run_digits_study(run_dir / "digits", force=force, seed=preset.seed, quick=preset.digits_quick)
    return time.perf_counter() - start


# --- results.json --------------------------------------------------------------------------
def collect_results(preset: StudyPreset, run_dir: Path, plan: list[dict[str, Any]],
                    seconds: dict[str, Optional[float]]) -> dict[str, Any]:
    previous = {}
    if (run_dir / "results.json").is_file():
        previous = json.loads((run_dir / "results.json").read_text()).get("wall_seconds", {})
    wall = {stage: round(s, 1) if s is not None else previous.get(stage) for stage, s in seconds.items()}
    digits = json.loads((run_dir / "digits" / "results.json").read_text()) if preset.digits else None
    common = {"preset": preset.to_dict(), "run_dir": str(run_dir.resolve()), "digits": digits, "wall_seconds": wall}
    if not plan:
        return {**common, "model": None, "hook_name": None, "d_model": None, "saebench": None, "saes": []}
    summary_path = run_dir / "saebench" / "eval_results" / "summary.json"
    summary = json.loads(summary_path.read_text())
    run_name = (run_dir / "saes").resolve().name
    rows = []
    for row in plan:
        trainer_dir = run_dir / "saes" / row["trainer"]
        saebench = summary["saes"].get(f"{run_name}_{row['trainer']}")
        if saebench is None:
            raise StudyError(f"{summary_path} has no results for {row['trainer']}; re-run with --force")
        rows.append({
            **row,
            "dict_size": preset.dict_size,
            "train_metrics": json.loads((trainer_dir / "metrics.json").read_text()),
            "saebench": saebench,
            "analysis": json.loads((run_dir / "analyses" / row["trainer"] / "analysis.json").read_text()),
        })
    train_run = json.loads((run_dir / "saes" / "run.json").read_text())
    return {
        **common,
        "model": train_run.get("model"),
        "hook_name": train_run.get("hook_name"),
        "d_model": train_run.get("d_model"),
        "saebench": {k: summary[k] for k in ("model", "preset", "standins", "datasets_dropped", "evals", "seconds")},
        "saes": rows,
    }


def prepare_run_dir(preset: StudyPreset, run_dir: Path, force: bool) -> None:
    study = run_dir / "study.json"
    current = json.loads(json.dumps(preset.to_dict()))  # as stored: JSON turns int keys into strings
    if study.is_file() and not force:
        old = json.loads(study.read_text())
        if old != current:
            changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            raise StudyError(
                f"{run_dir} holds a study with different settings ({', '.join(changed)}); pass --force to redo it "
                "or choose another --run-dir"
            )
    write_json(study, preset.to_dict())


def run_study(preset: StudyPreset, run_dir: Path, force: bool = False, report: bool = True) -> dict[str, Any]:
    run_dir = Path(run_dir)
    plan = planned_saes(preset)
    if not run_dir.resolve().parent.is_dir():
        raise StudyError(f"--run-dir parent {run_dir.resolve().parent} does not exist; create it first")
    run_dir.mkdir(exist_ok=True)
    prepare_run_dir(preset, run_dir, force)
    seconds: dict[str, Optional[float]] = {}
    stages = [("train", lambda: stage_train(preset, run_dir, force)),
              ("evals", lambda: stage_evals(preset, run_dir, force)),
              ("analyses", lambda: stage_analyses(preset, run_dir, plan, force))] if plan else []
    if preset.digits:
        stages.append(("digits", lambda: stage_digits(preset, run_dir, force)))
    for name, stage in stages:
        print(f"\n== {name} ==", flush=True)
        if name == "evals":
            check_trained(run_dir / "saes", plan)
        seconds[name] = stage()
        if seconds[name] is None:
            print(f"{name}: already done (use --force to redo)")
    results = collect_results(preset, run_dir, plan, seconds)
    write_json(run_dir / "results.json", results)
    if report:
        from experiments.report import write_report

        start = time.perf_counter()
        write_report(run_dir)
        print(f"report written in {time.perf_counter() - start:.1f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field (JSON value), e.g. --set steps=500 --set ks=[32,64]")
    p.add_argument("--setup", default=None, metavar="PRESET",
                   help="take model, data, sizes, k and hardware from another preset (e.g. --setup paper for gelu-1l)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        preset = get_preset(args.preset)
        if args.setup:
            preset = preset.on_setup(get_preset(args.setup))
        preset = preset.with_overrides(args.overrides)
        start = time.perf_counter()
        results = run_study(preset, args.run_dir, force=args.force, report=not args.no_report)
    except (ConfigError, StudyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results["saes"]:
        from experiments.report import headline_text

        print("\n" + headline_text(results["saes"]))
    print(f"\nstudy {preset.name!r} done in {time.perf_counter() - start:.0f} s")
    print(f"results: {(args.run_dir / 'results.json').resolve()}")
    if not args.no_report:
        print(f"report:  {(args.run_dir / 'report' / 'index.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
