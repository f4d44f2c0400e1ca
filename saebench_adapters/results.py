"""SAEBench's result files and the runner's summary of them.

SAEBench writes one JSON file per (eval, SAE): ``<results>/<eval>/<sae>_custom_sae_eval_results.json``.
Each is validated against SAEBench's own output type and reduced to its headline metrics. The summary
(``<results>/summary.json``) is::

    {"sae_dir", "model", "profile", "device", "standins", "standin_dir", "datasets_dropped", "evals",
     "status": "complete" | "failed", "failures": {eval: one-line error},
     "seconds": {eval: wall seconds},
     "saes": {sae name: {eval: {"status": "ok", "trainer_dir", "file", "metrics"}
                               | {"status": "not_evaluable", "trainer_dir", "file", "reason"}
                               | {"status": "failed", "trainer_dir", "reason"}}}}

``trainer_dir`` is the trainer folder relative to ``sae_dir`` (e.g. "trainer_0"; "." when
``sae_dir`` is a trainer folder itself). Every eval asked for has an outcome for every SAE: a failed eval
is recorded as failed (its error on one line), never left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dictionary_learning_ext.errors import ConfigError, EvalError
from dictionary_learning_ext.io import read_json, write_json

SUMMARY_FILE = "summary.json"


def output_types() -> dict[str, type]:
    """SAEBench's output dataclass of each eval (what its validator checks a file against)."""
    from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.evals.scr_and_tpp.eval_output import ScrEvalOutput, TppEvalOutput
    from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput

    return {
        "core": CoreEvalOutput,
        "absorption": AbsorptionEvalOutput,
        "scr": ScrEvalOutput,
        "tpp": TppEvalOutput,
        "sparse_probing": SparseProbingEvalOutput,
    }


def result_file(results_dir: Path, eval_type: str, sae_name: str) -> Path:
    """Where SAEBench writes the result of ``eval_type`` for ``sae_name``."""
    return results_dir / eval_type / f"{sae_name}_custom_sae_eval_results.json"


def not_evaluable_file(results_dir: Path, eval_type: str, sae_name: str) -> Path:
    """Where the runner records why ``eval_type`` could not score ``sae_name``."""
    return results_dir / eval_type / f"{sae_name}_not_evaluable.json"


def headline(eval_type: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The headline metrics of one SAEBench result JSON."""
    m = result["eval_result_metrics"]
    if eval_type == "core":
        return {
            "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
            "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "explained_variance": m["reconstruction_quality"]["explained_variance"],
            "l0": m["sparsity"]["l0"],
            "frac_alive": m["misc_metrics"]["frac_alive"],
        }
    if eval_type == "absorption":
        return {k: m["mean"][k] for k in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")}
    if eval_type == "scr":
        return {k: v for k, v in m["scr_metrics"].items() if k.startswith("scr_metric_threshold_") and v is not None}
    if eval_type == "tpp":
        return {k: v for k, v in m["tpp_metrics"].items() if k.endswith("_total_metric") and v is not None}
    if eval_type == "sparse_probing":
        return {
            "llm_test_accuracy": m["llm"]["llm_test_accuracy"],
            **{k: v for k, v in m["sae"].items() if v is not None},
        }
    raise ConfigError(f"no headline metrics are defined for eval {eval_type!r}")


def validated(eval_type: str, path: Path) -> dict[str, Any]:
    """The result file at ``path``, after SAEBench's validator accepted it as ``eval_type``'s output."""
    from sae_bench.sae_bench_utils.testing_utils import validate_eval_output_format_file

    try:
        validate_eval_output_format_file(str(path), output_types()[eval_type])
    except Exception as e:  # noqa: BLE001 - the validator raises several types
        raise EvalError(f"{eval_type}: {path} does not match SAEBench's output format: {e}") from e
    return read_json(path, f"SAEBench {eval_type} result")


def new_summary(
    sae_dir: Path, model: str, profile: str, device: str, standins: bool, datasets_dropped: Mapping[str, Any],
    evals: Sequence[str], sae_names: Sequence[str], standin_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """A summary with no eval recorded yet (``datasets_dropped`` is filled in as evals run)."""
    return {
        "sae_dir": str(sae_dir.resolve()), "model": model, "profile": profile, "device": device,
        "standins": standins, "standin_dir": str(standin_dir.resolve()) if standins and standin_dir else None,
        "datasets_dropped": datasets_dropped, "evals": list(evals), "status": "complete", "failures": {},
        "seconds": {}, "saes": {name: {} for name in sae_names},
    }


def record_eval(
    summary: dict[str, Any], results_dir: Path, eval_type: str, trainer_dirs: Mapping[str, str],
    not_evaluable: Mapping[str, Mapping[str, Any]], seconds: float, *, error: Optional[str] = None,
    written: Optional[set[str]] = None, standins: Optional[bool] = None,
) -> dict[str, str]:
    """Add one eval's outcome for every SAE (``trainer_dirs``: SAE name -> trainer folder relative to the
    run): its headline metrics, the reason it could not score (``not_evaluable``: SAE name -> info), or its
    failure. ``error``: the eval raised this (one line); SAEs whose result file it wrote before failing
    (``written``) keep their result. ``standins``: what the run used; a result file that records other data
    (e.g. left by an earlier run and kept) is a failure. Returns {SAE name: why} of the failed ones."""
    summary["seconds"][eval_type] = round(seconds, 2)
    failed: dict[str, str] = {}
    for name, trainer_dir in trainer_dirs.items():
        if name in not_evaluable:
            summary["saes"][name][eval_type] = {
                "status": "not_evaluable", "trainer_dir": trainer_dir, "reason": not_evaluable[name]["reason"],
                "file": str(not_evaluable_file(results_dir, eval_type, name)),
            }
            continue
        path = result_file(results_dir, eval_type, name)
        try:
            if error is not None and name not in (written or set()):
                raise EvalError(error)
            if not path.is_file():
                raise EvalError(f"{eval_type}: SAEBench returned without writing {path}")
            result = validated(eval_type, path)
            _check_recorded_data(eval_type, path, result, standins)
            metrics = headline(eval_type, result)
        except EvalError as err:
            failed[name] = " ".join(str(err).split())
            summary["saes"][name][eval_type] = {"status": "failed", "trainer_dir": trainer_dir, "reason": failed[name]}
            continue
        summary["saes"][name][eval_type] = {"status": "ok", "trainer_dir": trainer_dir, "file": str(path),
                                            "metrics": metrics}
    if failed:
        summary["status"] = "failed"
        reasons = sorted(set(failed.values()))
        summary["failures"][eval_type] = reasons[0] if len(reasons) == 1 else \
            f"{len(failed)} of {len(trainer_dirs)} SAEs failed: " + " | ".join(f"{n}: {r}" for n, r in failed.items())
    return failed


def _check_recorded_data(eval_type: str, path: Path, result: Mapping[str, Any], standins: Optional[bool]) -> None:
    if standins is None:
        return
    recorded = (result.get("sae_cfg_dict") or {}).get("eval_datasets")
    if not isinstance(recorded, Mapping) or "standins" not in recorded:
        raise EvalError(f"{eval_type}: {path} does not record which data it was computed on (written by an older "
                        "version, or by SAEBench outside this runner); re-run the eval without --keep-existing")
    if bool(recorded["standins"]) != standins:
        raise EvalError(f"{eval_type}: {path} was computed on {'stand-ins' if recorded['standins'] else 'hub data'} "
                        f"but this run uses {'stand-ins' if standins else 'hub data'}; re-run the eval without "
                        "--keep-existing")


def failure_error(results_dir: Path, summary: Mapping[str, Any]) -> EvalError:
    """The error a run with failed evals ends with (after its summary was written): names every failed eval
    with its error; exit code 1 (the run failed, the input was fine). ``.summary`` holds the summary."""
    failures = summary["failures"]
    err = EvalError(f"{len(failures)} of {len(summary['evals'])} evals failed: "
                    + "; ".join(f"{e}: {why}" for e, why in failures.items()))
    err.exit_code = 1
    err.summary = summary  # type: ignore[attr-defined]
    err.add_note(f"every other eval ran; the outcomes, failures included, are in {results_dir / SUMMARY_FILE}")
    return err


def write_summary(results_dir: Path, summary: Mapping[str, Any]) -> Path:
    return write_json(results_dir / SUMMARY_FILE, summary)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as the command line prints it: the run's settings, then one line per (SAE, eval)."""
    keys = ("model", "profile", "standins", "datasets_dropped", "seconds", "status", "failures")
    lines = [json.dumps({k: summary.get(k) for k in keys}, indent=2)]
    for name, per_eval in summary["saes"].items():
        for eval_type, r in per_eval.items():
            shown = r.get("metrics") or r.get("reason")
            lines.append(f"{name} {eval_type}: {r['status']} {shown}")
    return lines
