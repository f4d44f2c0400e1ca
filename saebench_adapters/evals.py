"""The five SAEBench evals, each called through its own entry point (``core.main.multiple_evals``,
``absorption.main.run_eval``, ``scr_and_tpp.main.run_eval``, ``sparse_probing.main.run_eval``) with
the settings of an eval profile, paths under the run's output folder, and the model injected.

``run_eval(ctx, eval_type, saes)`` runs one of them with every patch and the global state undone
afterwards; failures become ``EvalError`` carrying SAEBench's message. In a stand-in run SAEBench's dataset
code reads the stand-ins by absolute path; every result file records which data it was computed on
(``sae_cfg_dict.eval_datasets``, see ``dataset_record``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from dictionary_learning_ext.errors import ConfigError, EvalError, StandinError
from dictionary_learning_ext.io import read_json, write_json

from . import standin_data
from .models import EvalModel
from .patches import captured_logs, injected_models, patched, preserved_global_state, seeded
from .profiles import EVALS, EvalProfile
from .results import not_evaluable_file, result_file
from .wrappers import DictionarySAE, NamedSAE

Selected = list[tuple[str, DictionarySAE]]  # SAEBench's ``selected_saes``: (name, SAE) pairs
NotEvaluable = dict[str, dict[str, Any]]  # SAE name -> why the eval could not score it

LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPENWEBTEXT = "Skylion007/openwebtext"  # the core eval's text set


@dataclass
class EvalContext:
    """Everything an eval needs besides the SAEs."""

    results: Path
    """``OUT/eval_results``: SAEBench's result files, one folder per eval."""
    work: Path
    """``OUT/saebench_work``: the evals' working directory (caches, artifacts)."""
    standin_root: Path
    """``OUT/standin_datasets``: the generated stand-in datasets (never under ``work``, where ``datasets`` would
    take a folder named like a hub id for the hub dataset)."""
    device: str
    llm_dtype: str
    profile: EvalProfile
    model: EvalModel
    standins: bool
    """Read the generated stand-in datasets (under ``work``) instead of SAEBench's hub datasets."""
    context_length: int
    force_rerun: bool
    fingerprint: str
    """Identifies the model's weights, so cached probes are never reused for another model."""
    datasets_dropped: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    """Eval -> {dataset: why it was left out} (sparse-probing sets the stand-ins cannot serve)."""

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def injected(self) -> dict[str, Any]:
        return {self.model.name: self.model.hooked} if self.model.hooked is not None else {}


def make_context(
    out: Path, model: EvalModel, profile: EvalProfile, *, standins: bool, device: str, llm_dtype: str,
    force_rerun: bool,
) -> EvalContext:
    n_ctx = model.hooked.cfg.n_ctx if model.hooked is not None else 128
    return EvalContext(
        results=out / "eval_results", work=out / "saebench_work", standin_root=out / standin_data.STANDIN_DIR,
        device=device, llm_dtype=llm_dtype,
        profile=profile, model=model, standins=standins, context_length=min(profile.context_length, n_ctx),
        force_rerun=force_rerun,
        fingerprint=model_fingerprint(model.hooked) if model.hooked is not None else model.name.replace("/", "_"),
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(llm_dtype: str) -> torch.dtype:
    try:
        return LLM_DTYPES[llm_dtype]
    except KeyError:
        raise ConfigError(f"unknown llm dtype {llm_dtype!r}; choose from {list(LLM_DTYPES)}") from None


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(repr(getattr(model, "cfg", "")).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- stand-in datasets -----------------------------------------------------------------------
def standin_sizes(profile: EvalProfile) -> tuple[int, int, int]:
    """Largest probe train/test sizes and core tokens the profile needs (SAEBench defaults when unset)."""
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    scr = ScrAndTppEvalConfig(**{k: v for k, v in profile.scr_tpp.items() if k in ("train_set_size", "test_set_size")})
    sp = SparseProbingEvalConfig(
        **{k: v for k, v in profile.sparse_probing.items() if k in ("probe_train_set_size", "probe_test_set_size")}
    )
    train = max(scr.train_set_size, sp.probe_train_set_size)
    test = max(scr.test_set_size, sp.probe_test_set_size)
    c = profile.core
    # 128 tokens per prompt, 1.5x headroom for documents shorter than a context
    tokens = int((c["n_eval_reconstruction_batches"] + c["n_eval_sparsity_variance_batches"]) * c["eval_batch_size_prompts"] * 128 * 1.5)
    return train, test, tokens


def generate_standins(ctx: EvalContext) -> None:
    standin_data.generate(ctx.standin_root, *standin_sizes(ctx.profile))


# --- which datasets an eval reads --------------------------------------------------------------
def _scr_tpp_config(ctx: EvalContext, scr: bool) -> Any:
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig

    return ScrAndTppEvalConfig(
        model_name=ctx.model_name, perform_scr=scr, llm_batch_size=ctx.profile.llm_batch_size,
        llm_dtype=ctx.llm_dtype, context_length=ctx.context_length, **ctx.profile.scr_tpp,
    )


def _sparse_probing_config(ctx: EvalContext) -> tuple[Any, dict[str, str]]:
    """SAEBench's sparse-probing config for this run, and the datasets left out of it (stand-in runs) with why."""
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    config = SparseProbingEvalConfig(
        model_name=ctx.model_name, llm_batch_size=ctx.profile.llm_batch_size, llm_dtype=ctx.llm_dtype,
        context_length=ctx.context_length, **ctx.profile.sparse_probing,
    )
    dropped: dict[str, str] = {}
    if ctx.standins:
        config.dataset_names, dropped = standin_data.standable(config.dataset_names)
    return config, dropped


def datasets_read(ctx: EvalContext, eval_type: str) -> tuple[list[str], dict[str, str]]:
    """The hub datasets ``eval_type`` reads in this run (SAEBench's names, suffixes stripped), and the ones
    its default list has that this run leaves out ({name: why})."""
    if eval_type == "core":
        return [OPENWEBTEXT], {}
    if eval_type in ("scr", "tpp"):
        names = _scr_tpp_config(ctx, eval_type == "scr").dataset_names
        return list(dict.fromkeys(standin_data.hub_name(n) for n in names)), {}
    if eval_type == "sparse_probing":
        config, dropped = _sparse_probing_config(ctx)
        return list(dict.fromkeys(standin_data.hub_name(n) for n in config.dataset_names)), dropped
    return [], {}  # absorption: prompts built from the tokenizer's vocabulary, no dataset


def check_no_shadowing(ctx: EvalContext, evals: list[str]) -> None:
    """A hub run refuses to start when a folder in the evals' working directory would be loaded instead of a
    hub dataset it needs (``datasets`` resolves a relative folder named like the hub id first)."""
    if ctx.standins:
        return
    needed = [name for e in evals for name in datasets_read(ctx, e)[0]]
    found = standin_data.shadowing_folders(ctx.work, needed)
    if found:
        listed = ", ".join(str(p) for p in found)
        raise StandinError(
            f"not running on the hub datasets: {listed} would be loaded instead of the hub dataset(s) "
            f"{[str(p.relative_to(ctx.work)) for p in found]} (datasets reads a folder named like the hub id in the "
            f"evals' working directory {ctx.work} first; these are likely stand-ins an earlier offline run wrote "
            f"there). Delete {', '.join(sorted({str(ctx.work / p.relative_to(ctx.work).parts[0]) for p in found}))} "
            "or evaluate into another --out"
        )


def dataset_record(ctx: EvalContext, eval_type: str) -> dict[str, Any]:
    """What SAEBench's result files of ``eval_type`` record about their data (in ``sae_cfg_dict.eval_datasets``),
    so a file copied out of its folder still says whether it is a result on real data."""
    names, dropped = datasets_read(ctx, eval_type)
    if not ctx.standins:
        return {"standins": False, "source": "the hub datasets named in eval_config", "datasets": names,
                "datasets_dropped": dropped}
    return {
        "standins": True,
        "source": "STAND-INS: project-generated templated texts with the hub datasets' names and columns, NOT the "
                  "hub datasets named in eval_config; these numbers are not comparable with SAEBench results on real "
                  "data",
        "datasets": names,
        "stand_in_for": {name: str(ctx.standin_root / name) for name in names},
        "generator": standin_data.GENERATOR,
        "datasets_dropped": dropped,
    }


# --- the five evals --------------------------------------------------------------------------
def eval_core(ctx: EvalContext, saes: Selected) -> NotEvaluable:
    import sae_bench.evals.core.main as core

    out_dir = ctx.results / "core"
    # an absolute local folder outside the working directory: datasets never looks it up on the hub
    dataset = str(ctx.standin_root.resolve() / OPENWEBTEXT) if ctx.standins else OPENWEBTEXT
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
            **ctx.profile.core,
        )
    if len(results) < len(saes):
        # SAEBench's core eval logs an exception and returns fewer results instead of raising.
        missing = [n for n, _ in saes if not result_file(ctx.results, "core", n).is_file()]
        if missing or errors:
            raise EvalError(
                f"core: SAEBench's core eval caught an error and returned {len(results)} of {len(saes)} results "
                f"(missing: {missing}): " + (" | ".join(errors) or "no message logged")
            )
    return {}


def _absorption_reason(work: Path, name: str, config: Any) -> dict[str, Any]:
    path = work / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    detail: dict[str, Any] = {"min_GT_probe_f1": config.min_GT_probe_f1, "min_feats_for_eval": config.min_feats_for_eval}
    if path.is_file():
        rows = read_json(path, "absorption k-sparse probing result")
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


def sorted_alpha_tokens(*args: Any, **kwargs: Any) -> list[str]:
    """SAEBench's word list for absorption, sorted: SAEBench lists the vocabulary in the tokenizer's hash-map
    order, which changes between processes, before its seeded train/test split, so the same seed gave other
    words (and other numbers) in every run."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    return sorted(get_alpha_tokens(*args, **kwargs))


def eval_absorption(ctx: EvalContext, saes: Selected) -> NotEvaluable:
    """Writes ``<sae>_not_evaluable.json`` (and returns its content) for each SAE absorption cannot score."""
    import sae_bench.evals.absorption.common as absorption_common
    import sae_bench.evals.absorption.feature_absorption as absorption_features
    import sae_bench.evals.absorption.main as absorption

    out_dir = ctx.results / "absorption"
    out_dir.mkdir(parents=True, exist_ok=True)
    # SAEBench caches the first-letter probes inside its installed package by default, keyed by model
    # name only; ours go under OUT, keyed by a fingerprint of the model's weights too.
    art = ctx.work / "artifacts" / "absorption"
    probes_dir = art / "probes" / ctx.fingerprint
    k_sparse = functools.partial(
        absorption.run_k_sparse_probing_experiment,
        experiment_dir=art / "k_sparse_probing", probes_dir=probes_dir,
    )
    feature_absorption = functools.partial(
        absorption.run_feature_absortion_experiment,
        experiment_dir=art / "feature_absorption", sparse_probing_experiment_dir=art / "k_sparse_probing",
        probes_dir=probes_dir,
    )
    kwargs = dict(ctx.profile.absorption)
    kwargs.setdefault("llm_batch_size", ctx.profile.llm_batch_size)
    config = absorption.AbsorptionEvalConfig(model_name=ctx.model_name, llm_dtype=ctx.llm_dtype, **kwargs)
    not_evaluable: NotEvaluable = {}
    with patched(absorption, "run_k_sparse_probing_experiment", k_sparse), \
            patched(absorption, "run_feature_absortion_experiment", feature_absorption), \
            patched(absorption_common, "get_alpha_tokens", sorted_alpha_tokens), \
            patched(absorption_features, "get_alpha_tokens", sorted_alpha_tokens):
        for name, sae in saes:  # one call each: SAEBench stops at the first SAE it cannot evaluate
            marker = not_evaluable_file(ctx.results, "absorption", name)
            # Its word split, ICL prompts and probe initialisation come from the global generators, which
            # SAEBench's run_eval never seeds: seeded from its config, so a re-run gives the same numbers.
            with seeded(config.random_seed):
                absorption.run_eval(config, [(name, sae)], ctx.device, str(out_dir), ctx.force_rerun)
            if result_file(ctx.results, "absorption", name).is_file():
                marker.unlink(missing_ok=True)
                continue
            info = {
                "eval_type_id": "absorption_first_letter",
                "status": "not_evaluable",
                "sae": name,
                "model_name": ctx.model_name,
                "eval_config": dataclasses.asdict(config),
                **_absorption_reason(ctx.work, name, config),
            }
            write_json(marker, info)
            not_evaluable[name] = info
    return not_evaluable


def eval_scr_tpp(ctx: EvalContext, saes: Selected, scr: bool) -> NotEvaluable:
    import sae_bench.evals.scr_and_tpp.main as scr_and_tpp

    config = _scr_tpp_config(ctx, scr)
    _check_n_values(config, saes)
    scr_and_tpp.run_eval(
        config, saes, ctx.device, str(ctx.results), ctx.force_rerun,
        clean_up_activations=True, save_activations=True, artifacts_path=str(ctx.work / "artifacts"),
    )
    return {}


def _check_n_values(config: Any, saes: Selected) -> None:
    d_sae = min(sae.cfg.d_sae for _, sae in saes)
    too_big = [n for n in config.n_values if n > d_sae]
    if too_big:
        raise EvalError(f"n_values {too_big} exceed the dictionary size {d_sae}; choose smaller n_values")


def eval_sparse_probing(ctx: EvalContext, saes: Selected) -> NotEvaluable:
    import sae_bench.evals.sparse_probing.main as sparse_probing

    config, dropped = _sparse_probing_config(ctx)
    if ctx.standins:
        ctx.datasets_dropped["sparse_probing"] = dropped
    sparse_probing.run_eval(
        config, saes, ctx.device, str(ctx.results / "sparse_probing"), ctx.force_rerun,
        clean_up_activations=True, save_activations=True, artifacts_path=str(ctx.work / "artifacts"),
    )
    return {}


ADAPTERS: Mapping[str, Callable[[EvalContext, Selected], NotEvaluable]] = {
    "core": eval_core,
    "absorption": eval_absorption,
    "scr": functools.partial(eval_scr_tpp, scr=True),
    "tpp": functools.partial(eval_scr_tpp, scr=False),
    "sparse_probing": eval_sparse_probing,
}
assert tuple(ADAPTERS) == EVALS, "profiles.EVALS lists the evals this module adapts, in order"


def run_eval(ctx: EvalContext, eval_type: str, saes: list[NamedSAE]) -> tuple[NotEvaluable, float]:
    """Run one eval on ``saes`` in ``ctx.work`` with the model injected, the global state restored
    afterwards. Returns the SAEs it could not score (with why) and the wall time in seconds."""
    start = time.perf_counter()
    with preserved_global_state(cwd=ctx.work), injected_models(ctx.injected), \
            standin_datasets_loaded(ctx), eval_datasets_recorded(saes, dataset_record(ctx, eval_type)):
        try:
            not_evaluable = ADAPTERS[eval_type](ctx, [(s.name, s.sae) for s in saes])
        except EvalError:
            raise
        except Exception as e:  # noqa: BLE001 - SAEBench raises anything; re-raised with the eval named
            raise EvalError(f"{eval_type} failed: {type(e).__name__}: {one_line(e)}") from e
    return not_evaluable, time.perf_counter() - start


def one_line(err: BaseException) -> str:
    """An error's message on one line (the summary records one line per failure)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 500 else text[:497] + "..."


@contextlib.contextmanager
def standin_datasets_loaded(ctx: EvalContext) -> Iterator[None]:
    """In a stand-in run, SAEBench's dataset code loads the stand-ins by absolute path (``standin_loader``)."""
    if not ctx.standins:
        yield
        return
    import sae_bench.evals.scr_and_tpp.dataset_creation as dataset_creation
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    loader = standin_data.standin_loader(ctx.standin_root)
    with patched(dataset_utils, "load_dataset", loader), patched(dataset_creation, "load_dataset", loader):
        yield


@contextlib.contextmanager
def eval_datasets_recorded(saes: list[NamedSAE], record: dict[str, Any]) -> Iterator[None]:
    """Each SAE's config carries ``record`` while the eval runs, so SAEBench writes it into every result file's
    ``sae_cfg_dict`` (``eval_datasets``)."""
    for s in saes:
        s.sae.cfg.eval_datasets = record
    try:
        yield
    finally:
        for s in saes:
            s.sae.cfg.eval_datasets = None
