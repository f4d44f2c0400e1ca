"""SAEBench's result files and the runner's summary of them.

SAEBench writes one JSON file per (eval, SAE): ``<results>/<eval>/<sae>_custom_sae_eval_results.json``.
Each is validated against SAEBench's own output type and reduced to its headline metrics. The summary
(``<results>/summary.json``) is::

    {"sae_dir", "model", "profile", "device", "standins", "datasets_dropped", "evals",
     "seconds": {eval: wall seconds},
     "saes": {sae name: {eval: {"status": "ok", "trainer_dir", "file", "metrics"}
                               | {"status": "not_evaluable", "trainer_dir", "file", "reason"}}}}

``trainer_dir`` is the trainer folder relative to ``sae_dir`` (e.g. "trainer_0"; "." when
``sae_dir`` is a trainer folder itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

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
    evals: Sequence[str], sae_names: Sequence[str],
) -> dict[str, Any]:
    """A summary with no eval recorded yet (``datasets_dropped`` is filled in as evals run)."""
    return {
        "sae_dir": str(sae_dir.resolve()), "model": model, "profile": profile, "device": device,
        "standins": standins, "datasets_dropped": datasets_dropped, "evals": list(evals), "seconds": {},
        "saes": {name: {} for name in sae_names},
    }


def record_eval(
    summary: dict[str, Any], results_dir: Path, eval_type: str, trainer_dirs: Mapping[str, str],
    not_evaluable: Mapping[str, Mapping[str, Any]], seconds: float,
) -> None:
    """Add one eval's outcome for every SAE (``trainer_dirs``: SAE name -> trainer folder relative to the
    run): its headline metrics, or the reason it could not score (``not_evaluable``: SAE name -> info)."""
    summary["seconds"][eval_type] = round(seconds, 2)
    for name, trainer_dir in trainer_dirs.items():
        if name in not_evaluable:
            summary["saes"][name][eval_type] = {
                "status": "not_evaluable", "trainer_dir": trainer_dir, "reason": not_evaluable[name]["reason"],
                "file": str(not_evaluable_file(results_dir, eval_type, name)),
            }
            continue
        path = result_file(results_dir, eval_type, name)
        if not path.is_file():
            raise EvalError(f"{eval_type}: SAEBench returned without writing {path}")
        summary["saes"][name][eval_type] = {
            "status": "ok", "trainer_dir": trainer_dir, "file": str(path),
            "metrics": headline(eval_type, validated(eval_type, path)),
        }


def write_summary(results_dir: Path, summary: Mapping[str, Any]) -> Path:
    return write_json(results_dir / SUMMARY_FILE, summary)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as the command line prints it: the run's settings, then one line per (SAE, eval)."""
    lines = [json.dumps({k: summary[k] for k in ("model", "profile", "standins", "datasets_dropped", "seconds")}, indent=2)]
    for name, per_eval in summary["saes"].items():
        for eval_type, r in per_eval.items():
            shown = r.get("metrics") or r.get("reason")
            lines.append(f"{name} {eval_type}: {r['status']} {shown}")
    return lines
