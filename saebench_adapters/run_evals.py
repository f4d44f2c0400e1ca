"""Run SAEBench's own evals on every SAE of a training run.

    python -m saebench_adapters.run_evals --sae-dir RUN_DIR \\
        --evals core absorption scr tpp sparse_probing \\
        [--model default|<hub or TransformerLens name>] [--preset quick|full] [--out OUT]

Every trainer folder under RUN_DIR is loaded through the registry (``saebench_adapters.wrappers``) and
handed to each eval's own entry point (``core.main.multiple_evals``, ``absorption.main.run_eval``,
``scr_and_tpp.main.run_eval``, ``sparse_probing.main.run_eval``). Results are SAEBench's JSON files
under ``OUT/eval_results/<eval>/`` (each validated with SAEBench's validator); ``OUT/eval_results/
summary.json`` holds the headline metrics. SAEBench's caches and artifacts go to ``OUT/saebench_work``.

* ``--model default`` (the embedded offline model, ``experiments.models``): the model object is given to
  the evals and the datasets are project-generated stand-ins (``saebench_adapters.standin_data``); the
  sparse-probing sets that cannot be stood in for are dropped and listed in the summary.
* any other model name (``EleutherAI/pythia-70m-deduped``, ``gelu-1l``): SAEBench loads model and
  datasets from the hub itself, exactly as it does on its own (needs internet; a GPU is advisable).

Failures raise ``EvalError`` with the eval's message (also the ones SAEBench's core eval only logs).
An absorption run that cannot score (too few first letters probed above ``min_GT_probe_f1``) writes
``<sae>_not_evaluable.json`` with the reason. Grad mode, RNG states, the working directory and every
patch are restored after each eval.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import standin_data
from .atomic import write_json
from .wrappers import DictionarySAE, load_sae, trainer_dirs

EVALS = ("core", "absorption", "scr", "tpp", "sparse_probing")
PRESETS = ("quick", "full")
DEFAULT_ALIASES = ("default", "vsae-gelu-1l")


class EvalError(RuntimeError):
    """An eval failed; the message carries SAEBench's own error."""


# --- presets -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preset:
    """Knobs per eval; ``None`` leaves SAEBench's default."""

    core: dict
    absorption: dict
    scr_tpp: dict
    sparse_probing: dict
    llm_batch_size: int
    context_length: int = 128
    """Tokens per probe/absorption text and per core context (capped by the model's n_ctx)."""


# "quick" follows SAEBench's own test settings (core 4 prompts x 5 / 20 batches, SCR n_values=[10],
# absorption min_GT_probe_f1=0.3) with small probe sets, so all five evals take minutes on a CPU.
# probe_lr 1e-2: with SAEBench's 1e-3 the SCR/TPP probes stay at chance on tiny models in 20 epochs.
QUICK = Preset(
    core=dict(n_eval_reconstruction_batches=5, n_eval_sparsity_variance_batches=20, eval_batch_size_prompts=4),
    absorption=dict(min_GT_probe_f1=0.3, max_k_value=3, k_sparse_probe_num_epochs=10,
                    precalc_k_sparse_probe_sae_acts=True, llm_batch_size=32),
    scr_tpp=dict(train_set_size=200, test_set_size=100, n_values=[2, 10], probe_epochs=20, probe_lr=1e-2,
                 sae_batch_size=125),
    sparse_probing=dict(probe_train_set_size=200, probe_test_set_size=100),
    llm_batch_size=32,
    context_length=64,
)
# "full": SAEBench's defaults (core: the numbers of its run_all_evals_dictionary_learning_saes).
FULL = Preset(
    core=dict(n_eval_reconstruction_batches=200, n_eval_sparsity_variance_batches=2000, eval_batch_size_prompts=16),
    absorption={},
    scr_tpp={},
    sparse_probing={},
    llm_batch_size=32,
)
PRESET_TABLE = {"quick": QUICK, "full": FULL}


# --- global state ------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_global_state(cwd: Optional[Path] = None) -> Iterator[None]:
    """Restore grad mode, RNG states and the working directory afterwards (SCR/TPP leave grad off,
    absorption turns it on, every eval reseeds)."""
    grad = torch.is_grad_enabled()
    torch_rng = torch.get_rng_state()
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    old_cwd = os.getcwd()
    try:
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
            os.chdir(cwd)
        yield
    finally:
        os.chdir(old_cwd)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(torch_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration (class attributes restored from ``__dict__``)."""
    sentinel = object()
    old = obj.__dict__.get(name, sentinel) if isinstance(obj, type) else getattr(obj, name, sentinel)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is sentinel:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def injected_models(models: dict[str, Any]) -> Iterator[None]:
    """``HookedTransformer.from_pretrained_no_processing(name, ...)`` returns ``models[name]`` (moved to
    the requested device/dtype) for the names given; other names go to TransformerLens as usual."""
    from transformer_lens import HookedTransformer

    if not models:
        yield
        return
    original = HookedTransformer.from_pretrained_no_processing

    def from_pretrained_no_processing(model_name: str, *args: Any, **kwargs: Any):
        if model_name in models:
            model = models[model_name]
            device, dtype = kwargs.get("device"), kwargs.get("dtype")
            if device is not None:
                model = model.to(device)
            if dtype is not None and dtype != model.cfg.dtype:
                raise EvalError(
                    f"the eval asked for {model_name} in {dtype} but the injected model is {model.cfg.dtype}; "
                    "pass --llm-dtype matching the model"
                )
            return model
        return original(model_name, *args, **kwargs)

    with patched(HookedTransformer, "from_pretrained_no_processing", staticmethod(from_pretrained_no_processing)):
        yield


@contextlib.contextmanager
def captured_logs(logger_name: str) -> Iterator[list[str]]:
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Handler(level=logging.ERROR)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# --- results -----------------------------------------------------------------------------
def _output_types() -> dict[str, type]:
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


def headline(eval_type: str, result: dict) -> dict[str, Any]:
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
    raise ValueError(eval_type)


def _validated(eval_type: str, path: Path) -> dict:
    from sae_bench.sae_bench_utils.testing_utils import validate_eval_output_format_file

    try:
        validate_eval_output_format_file(str(path), _output_types()[eval_type])
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{eval_type}: {path} does not match SAEBench's output format: {e}") from e
    with open(path) as fh:
        return json.load(fh)


# --- model -------------------------------------------------------------------------------
def _model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(repr(getattr(model, "cfg", "")).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_model(model: str | Any, layer: int) -> tuple[Optional[Any], str]:
    """(model object to inject or None for SAEBench's own loading, name the evals will ask for)."""
    if not isinstance(model, str):
        return model, model.cfg.model_name
    if model in DEFAULT_ALIASES:
        from experiments.models import load_model  # the embedded default model

        tl = load_model("default", layer=layer).hooked_transformer()
        return tl, tl.cfg.model_name
    return None, model


# --- the runner --------------------------------------------------------------------------
@dataclasses.dataclass
class _Ctx:
    out: Path
    work: Path
    results: Path
    device: str
    llm_dtype: str
    preset: Preset
    model_name: str
    injected: dict
    standins: bool
    context_length: int
    force_rerun: bool
    fingerprint: str
    dropped: dict


def _eval_core(ctx: _Ctx, saes: list[tuple[str, DictionarySAE]]) -> None:
    import sae_bench.evals.core.main as core

    out_dir = ctx.results / "core"
    dataset = "Skylion007/openwebtext"
    if ctx.standins:
        dataset = str(ctx.work / "Skylion007/openwebtext")  # absolute local folder: no hub lookup at all
    with captured_logs(core.__name__) as errors:
        results = core.multiple_evals(
            selected_saes=saes,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=True,
            exclude_special_tokens_from_reconstruction=True,
            dataset=dataset,
            context_size=ctx.context_length,
            output_folder=str(out_dir),
            verbose=False,
            dtype=ctx.llm_dtype,
            device=ctx.device,
            force_rerun=ctx.force_rerun,
            **ctx.preset.core,
        )
    if len(results) < len(saes):
        missing = [n for n, _ in saes if not (out_dir / f"{n}_custom_sae_eval_results.json").is_file()]
        if missing or errors:
            raise EvalError(
                f"core: SAEBench's core eval caught an error and returned {len(results)} of {len(saes)} results "
                f"(missing: {missing}): " + (" | ".join(errors) or "no message logged")
            )


def _absorption_reason(work: Path, name: str, config: Any) -> dict:
    path = work / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    detail: dict[str, Any] = {"min_GT_probe_f1": config.min_GT_probe_f1, "min_feats_for_eval": config.min_feats_for_eval}
    if path.is_file():
        rows = json.loads(path.read_text())
        f1 = {r["letter"]: round(float(r["f1_probe"]), 4) for r in rows}
        good = sorted(k for k, v in f1.items() if v > config.min_GT_probe_f1)
        detail.update(probe_f1_by_letter=f1, letters_above_threshold=good)
        reason = (
            f"only {len(good)} of {len(f1)} first letters are linearly decodable from the model's activations "
            f"(ground-truth first-letter probe F1 > {config.min_GT_probe_f1}); absorption needs at least "
            f"{config.min_feats_for_eval}. The model has not learned (enough) spelling at this layer."
        )
    else:
        reason = "absorption printed 'Cannot evaluate absorption' and produced no result"
    return {"reason": reason, **detail}


def _eval_absorption(ctx: _Ctx, saes: list[tuple[str, DictionarySAE]]) -> dict[str, dict]:
    import sae_bench.evals.absorption.main as absorption

    out_dir = ctx.results / "absorption"
    out_dir.mkdir(parents=True, exist_ok=True)
    # SAEBench caches the first-letter probes inside its installed package by default, keyed by model
    # name only; ours go under OUT, keyed by a fingerprint of the model's weights too.
    art = ctx.work / "artifacts" / "absorption"
    dirs = dict(experiment_dir=None, probes_dir=art / "probes" / ctx.fingerprint)
    k_sparse = functools.partial(
        absorption.run_k_sparse_probing_experiment,
        experiment_dir=art / "k_sparse_probing", probes_dir=dirs["probes_dir"],
    )
    feat_abs = functools.partial(
        absorption.run_feature_absortion_experiment,
        experiment_dir=art / "feature_absorption", sparse_probing_experiment_dir=art / "k_sparse_probing",
        probes_dir=dirs["probes_dir"],
    )
    kwargs = dict(ctx.preset.absorption)
    kwargs.setdefault("llm_batch_size", ctx.preset.llm_batch_size)
    config = absorption.AbsorptionEvalConfig(model_name=ctx.model_name, llm_dtype=ctx.llm_dtype, **kwargs)
    not_evaluable = {}
    with patched(absorption, "run_k_sparse_probing_experiment", k_sparse), \
            patched(absorption, "run_feature_absortion_experiment", feat_abs):
        for name, sae in saes:  # one call each: SAEBench stops at the first SAE it cannot evaluate
            result_path = out_dir / f"{name}_custom_sae_eval_results.json"
            absorption.run_eval(config, [(name, sae)], ctx.device, str(out_dir), ctx.force_rerun)
            if not result_path.is_file():
                info = {
                    "eval_type_id": "absorption_first_letter",
                    "status": "not_evaluable",
                    "sae": name,
                    "model_name": ctx.model_name,
                    "eval_config": dataclasses.asdict(config),
                    **_absorption_reason(ctx.work, name, config),
                }
                write_json(out_dir / f"{name}_not_evaluable.json", info)
                not_evaluable[name] = info
            else:
                (out_dir / f"{name}_not_evaluable.json").unlink(missing_ok=True)
    return not_evaluable


def _eval_scr_tpp(ctx: _Ctx, saes: list[tuple[str, DictionarySAE]], scr: bool) -> None:
    import sae_bench.evals.scr_and_tpp.main as scr_and_tpp

    kwargs = dict(ctx.preset.scr_tpp)
    config = scr_and_tpp.ScrAndTppEvalConfig(
        model_name=ctx.model_name, perform_scr=scr, llm_batch_size=ctx.preset.llm_batch_size,
        llm_dtype=ctx.llm_dtype, context_length=ctx.context_length, **kwargs,
    )
    _clip_n_values(config, saes)
    scr_and_tpp.run_eval(
        config, saes, ctx.device, str(ctx.results), ctx.force_rerun,
        clean_up_activations=True, save_activations=True, artifacts_path=str(ctx.work / "artifacts"),
    )


def _clip_n_values(config: Any, saes: list[tuple[str, DictionarySAE]]) -> None:
    d_sae = min(sae.cfg.d_sae for _, sae in saes)
    too_big = [n for n in config.n_values if n > d_sae]
    if too_big:
        raise EvalError(f"n_values {too_big} exceed the dictionary size {d_sae}; choose smaller n_values")


def _eval_sparse_probing(ctx: _Ctx, saes: list[tuple[str, DictionarySAE]]) -> None:
    import sae_bench.evals.sparse_probing.main as sparse_probing

    kwargs = dict(ctx.preset.sparse_probing)
    config = sparse_probing.SparseProbingEvalConfig(
        model_name=ctx.model_name, llm_batch_size=ctx.preset.llm_batch_size, llm_dtype=ctx.llm_dtype,
        context_length=ctx.context_length, **kwargs,
    )
    if ctx.standins:
        config.dataset_names, dropped = standin_data.standable(config.dataset_names)
        ctx.dropped["sparse_probing"] = dropped
    sparse_probing.run_eval(
        config, saes, ctx.device, str(ctx.results / "sparse_probing"), ctx.force_rerun,
        clean_up_activations=True, save_activations=True, artifacts_path=str(ctx.work / "artifacts"),
    )


def _sizes(preset: Preset) -> tuple[int, int, int]:
    """Largest probe train/test sizes and core tokens the preset needs (SAEBench defaults when unset)."""
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    scr = ScrAndTppEvalConfig(**{k: v for k, v in preset.scr_tpp.items() if k in ("train_set_size", "test_set_size")})
    sp = SparseProbingEvalConfig(
        **{k: v for k, v in preset.sparse_probing.items() if k in ("probe_train_set_size", "probe_test_set_size")}
    )
    train = max(scr.train_set_size, sp.probe_train_set_size)
    test = max(scr.test_set_size, sp.probe_test_set_size)
    c = preset.core
    tokens = int((c["n_eval_reconstruction_batches"] + c["n_eval_sparsity_variance_batches"]) * c["eval_batch_size_prompts"] * 128 * 1.5)
    return train, test, tokens


def run_evals(
    sae_dir: str | Path,
    evals: Sequence[str] = EVALS,
    model: str | Any = "default",
    preset: str = "quick",
    out: Optional[str | Path] = None,
    *,
    standins: Optional[bool] = None,
    device: Optional[str] = None,
    llm_dtype: str = "float32",
    force_rerun: bool = True,
) -> dict[str, Any]:
    """Run ``evals`` on every SAE in ``sae_dir``; returns ``{"saes": {sae: {eval: {...}}}, ...}`` with each
    eval's headline metrics, status, result file and wall time (also written to
    ``OUT/eval_results/summary.json``).

    ``model``: "default" (embedded offline model), a name SAEBench/TransformerLens loads itself, or a
    ``HookedTransformer`` object to evaluate on (its ``cfg.model_name`` must be the SAEs' ``lm_name``).
    ``standins``: use the generated datasets (default: whenever the model is injected, i.e. not loaded
    by SAEBench from the hub).
    """
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise ValueError(f"unknown evals {unknown}; choose from {list(EVALS)}")
    if preset not in PRESET_TABLE:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    sae_dir = Path(sae_dir)
    dirs = trainer_dirs(sae_dir)
    out = Path(out) if out is not None else sae_dir / "saebench"
    out = out.resolve()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[llm_dtype]

    configs = [json.loads((d / "config.json").read_text())["trainer"] for d in dirs]
    layers = {int(c["layer"]) for c in configs}
    if len(layers) != 1:
        raise ValueError(f"SAEs in {sae_dir} are on different layers {sorted(layers)}; evaluate them separately")
    model_obj, model_name = resolve_model(model, layers.pop())
    saes = []
    run_name = sae_dir.resolve().name
    for d, cfg in zip(dirs, configs):
        lm = cfg["lm_name"]
        if lm != model_name and lm.split("/")[-1] != model_name.split("/")[-1]:
            raise ValueError(
                f"{d} was trained on {lm!r} but the evals would run on {model_name!r}; pass --model {lm}"
            )
        sae = load_sae(d, model_name=model_name, device=device, dtype=dtype)
        rel = d.resolve().relative_to(sae_dir.resolve()).as_posix()
        name = f"{run_name}_{rel}".replace("/", "_").rstrip("_.") if rel != "." else run_name
        saes.append((name, sae))
    if model_obj is not None:
        d_model = model_obj.cfg.d_model
        bad = [n for n, s in saes if s.cfg.d_in != d_model]
        if bad:
            raise ValueError(f"SAEs {bad} have d_in != the model's d_model {d_model}")

    standins = (model_obj is not None) if standins is None else standins
    p = PRESET_TABLE[preset]
    n_ctx = model_obj.cfg.n_ctx if model_obj is not None else 128
    work = out / "saebench_work"
    ctx = _Ctx(
        out=out, work=work, results=out / "eval_results", device=device, llm_dtype=llm_dtype, preset=p,
        model_name=model_name, injected={model_name: model_obj} if model_obj is not None else {},
        standins=standins, context_length=min(p.context_length, n_ctx), force_rerun=force_rerun,
        fingerprint=_model_fingerprint(model_obj) if model_obj is not None else model_name.replace("/", "_"),
        dropped={},
    )
    if standins:
        train, test, tokens = _sizes(p)
        standin_data.generate(work, train, test, tokens)

    runners: dict[str, Callable[[], Any]] = {
        "core": lambda: _eval_core(ctx, saes),
        "absorption": lambda: _eval_absorption(ctx, saes),
        "scr": lambda: _eval_scr_tpp(ctx, saes, scr=True),
        "tpp": lambda: _eval_scr_tpp(ctx, saes, scr=False),
        "sparse_probing": lambda: _eval_sparse_probing(ctx, saes),
    }
    summary: dict[str, Any] = {
        "sae_dir": str(sae_dir.resolve()), "model": model_name, "preset": preset, "device": device,
        "standins": standins, "datasets_dropped": ctx.dropped, "evals": list(evals), "seconds": {},
        "saes": {name: {} for name, _ in saes},
    }
    for eval_type in evals:
        start = time.perf_counter()
        with preserved_global_state(cwd=work), injected_models(ctx.injected):
            try:
                outcome = runners[eval_type]()
            except EvalError:
                raise
            except Exception as e:  # noqa: BLE001
                raise EvalError(f"{eval_type} failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        summary["seconds"][eval_type] = round(seconds, 2)
        folder = ctx.results / eval_type
        for name, _ in saes:
            if eval_type == "absorption" and outcome and name in outcome:
                summary["saes"][name][eval_type] = {
                    "status": "not_evaluable", "reason": outcome[name]["reason"],
                    "file": str(folder / f"{name}_not_evaluable.json"),
                }
                continue
            path = folder / f"{name}_custom_sae_eval_results.json"
            if not path.is_file():
                raise EvalError(f"{eval_type}: SAEBench returned without writing {path}")
            result = _validated(eval_type, path)
            summary["saes"][name][eval_type] = {"status": "ok", "file": str(path), "metrics": headline(eval_type, result)}
    write_json(ctx.results / "summary.json", summary)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saebench_adapters.run_evals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae-dir", required=True, help="training run folder (trainer_*/ae.pt + config.json)")
    parser.add_argument("--evals", nargs="+", default=list(EVALS), choices=EVALS)
    parser.add_argument("--model", default="default", help="'default' (embedded, offline) or a hub/TransformerLens name")
    parser.add_argument("--preset", default="quick", choices=PRESETS)
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/saebench)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--llm-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--standins", dest="standins", action="store_true", default=None,
                       help="use the generated stand-in datasets (default for the embedded model)")
    group.add_argument("--no-standins", dest="standins", action="store_false",
                       help="use SAEBench's hub datasets (default for hub models)")
    parser.add_argument("--keep-existing", action="store_true", help="skip SAEs whose result files exist")
    args = parser.parse_args(argv)
    try:
        summary = run_evals(
            args.sae_dir, args.evals, model=args.model, preset=args.preset, out=args.out, standins=args.standins,
            device=args.device, llm_dtype=args.llm_dtype, force_rerun=not args.keep_existing,
        )
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"run_evals failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("model", "preset", "standins", "datasets_dropped", "seconds")}, indent=2))
    for name, per_eval in summary["saes"].items():
        for eval_type, r in per_eval.items():
            shown = r.get("metrics") or r.get("reason")
            print(f"{name} {eval_type}: {r['status']} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
