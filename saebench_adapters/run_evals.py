"""Run SAEBench's own evals on every SAE of a training run.

    python -m saebench_adapters.run_evals --sae-dir RUN_DIR \\
        [--evals core absorption scr tpp sparse_probing] [--model default|<registered or hub name>] \\
        [--profile quick|full] [--out OUT]

Every trainer folder under RUN_DIR is loaded through the registry (``saebench_adapters.wrappers``) and
handed to each eval's own entry point (``saebench_adapters.evals``). Results are SAEBench's JSON files
under ``OUT/eval_results/<eval>/`` (each validated with SAEBench's validator); ``OUT/eval_results/
summary.json`` holds the headline metrics (``saebench_adapters.results``). SAEBench's caches and
artifacts go to ``OUT/saebench_work``.

* a registered model (``saebench_adapters.models``; e.g. ``default``, which an application registers):
  loaded through its spec and given to the evals; by default the datasets are project-generated
  stand-ins (``saebench_adapters.standin_data``, written to ``OUT/standin_datasets`` and handed to SAEBench
  explicitly), and the sparse-probing sets that cannot be stood in for are dropped and listed in the
  summary and in every result file (``sae_cfg_dict.eval_datasets`` says which data a file was computed on).
* any other model name (``EleutherAI/pythia-70m-deduped``, ``gelu-1l``): SAEBench loads model and
  datasets from the hub itself, exactly as it does on its own (needs internet; a GPU is advisable).

Each eval runs even if one before it failed; a failure (with the eval's message on one line, also the ones
SAEBench's core eval only logs) is recorded in the summary as status "failed" for the SAEs it left without a
result, the summary is written, and then ``run_evals`` raises ``EvalError`` naming every failed eval (exit
code 1 on the command line; the exception's ``.summary`` is the written summary).
An absorption run that cannot score (too few first letters probed above ``min_GT_probe_f1``) writes
``<sae>_not_evaluable.json`` with the reason. Grad mode, RNG states, the working directory and every
patch are restored after each eval (``saebench_adapters.patches``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from dictionary_learning_ext.errors import EvalError  # noqa: F401  (raised by the evals; importable from here)

from .profiles import DEFAULT_PROFILE, EVALS, PROFILES, EvalProfile

# torch and SAEBench take seconds to import: they are imported inside the functions below, so that
# `--help` and argument errors answer at once.

DEFAULT_MODEL = "default"


def run_evals(
    sae_dir: str | Path,
    evals: Sequence[str] = EVALS,
    model: Any = DEFAULT_MODEL,
    profile: str = DEFAULT_PROFILE,
    out: Optional[str | Path] = None,
    *,
    standins: Optional[bool] = None,
    device: Optional[str] = None,
    llm_dtype: str = "float32",
    force_rerun: bool = True,
) -> dict[str, Any]:
    """Run ``evals`` on every SAE in ``sae_dir`` with the eval profile ``profile``; returns the summary
    (``saebench_adapters.results``: each eval's headline metrics, status, result file and wall time per
    SAE), also written to ``OUT/eval_results/summary.json`` (``out`` defaults to ``sae_dir/saebench``).
    If any eval failed, every other eval still ran and the summary (failures recorded as status "failed") is
    written; then ``EvalError`` is raised naming the failed evals, with the summary as its ``.summary``.
    A run on the hub datasets refuses to start (``StandinError``) if a folder in ``OUT/saebench_work`` would
    shadow one of them.

    ``model``: a registered model name or alias (``saebench_adapters.models``), a ``HookedTransformer``
    object to evaluate on (its ``cfg.model_name`` must be the SAEs' ``lm_name``), or any other name,
    which SAEBench/TransformerLens loads itself.
    ``standins``: use the generated datasets (default: for a registered model, what its spec says; for
    a model object, yes; for a name SAEBench loads, no).
    """
    from .evals import (check_no_shadowing, default_device, generate_standins, make_context, one_line, run_eval,
                        torch_dtype)
    from .models import resolve_model
    from .results import failure_error, new_summary, record_eval, result_file, write_summary
    from .wrappers import load_run_saes, run_layer

    eval_profile = _checked_profile(evals, profile)
    dtype = torch_dtype(llm_dtype)
    sae_dir = Path(sae_dir)
    device = device or default_device()
    target = resolve_model(model, run_layer(sae_dir), device)
    saes = load_run_saes(sae_dir, target.name, device=device, dtype=dtype,
                         d_model=target.hooked.cfg.d_model if target.hooked is not None else None)
    out = Path(out if out is not None else sae_dir / "saebench").resolve()
    ctx = make_context(out, target, eval_profile, standins=target.standins if standins is None else standins,
                       device=device, llm_dtype=llm_dtype, force_rerun=force_rerun)
    check_no_shadowing(ctx, list(evals))  # a hub run never reads a stand-in left in its working directory
    if ctx.standins:
        generate_standins(ctx)

    summary = new_summary(sae_dir, target.name, profile, device, ctx.standins, ctx.datasets_dropped, evals,
                          [s.name for s in saes], standin_dir=ctx.standin_root)
    trainer_dirs = {s.name: s.trainer_dir for s in saes}
    for eval_type in evals:  # one failing eval does not stop the others
        before = {s.name: _stamp(result_file(ctx.results, eval_type, s.name)) for s in saes}
        start, error, not_evaluable = time.perf_counter(), None, {}
        try:
            not_evaluable, _ = run_eval(ctx, eval_type, saes)
        except EvalError as err:
            error = one_line(err)
        written = {n for n, stamp in before.items()
                   if (now := _stamp(result_file(ctx.results, eval_type, n))) is not None
                   and (now != stamp or not force_rerun)}
        record_eval(summary, ctx.results, eval_type, trainer_dirs, not_evaluable, time.perf_counter() - start,
                    error=error, written=written, standins=ctx.standins)
    write_summary(ctx.results, summary)
    if summary["failures"]:
        raise failure_error(ctx.results, summary)
    return summary


def _stamp(path: Path) -> Optional[tuple[int, int]]:
    """(mtime_ns, size) of a result file, or None: tells a file an eval wrote from one it left."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _checked_profile(evals: Sequence[str], profile: str) -> EvalProfile:
    from dictionary_learning_ext.errors import ConfigError

    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise ConfigError(f"unknown evals {unknown}; choose from {list(EVALS)}")
    if profile not in PROFILES:
        # "preset": what the command line's --preset alias and earlier callers call a profile
        raise ConfigError(f"unknown preset {profile!r}; choose an eval profile from {list(PROFILES)}")
    return PROFILES[profile]


# --- command line ------------------------------------------------------------------------------
DESCRIPTION = """\
Run SAEBench's evals (core, absorption, scr, tpp, sparse_probing) on every SAE of a training run.

Every trainer folder (ae.pt + config.json) under --sae-dir is evaluated with SAEBench's own eval code.
Results: SAEBench's JSON files under OUT/eval_results/<eval>/ and the headline metrics of all of them
in OUT/eval_results/summary.json; SAEBench's caches and artifacts go to OUT/saebench_work/.
With a registered model (e.g. 'default') it runs offline on generated stand-in datasets; with any
other model name SAEBench downloads the model and its datasets itself.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saebench_adapters.run_evals", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sae-dir", required=True,
                        help="training run folder (its trainer_*/ hold ae.pt + config.json), or one trainer folder")
    parser.add_argument("--evals", nargs="+", default=list(EVALS), choices=EVALS, metavar="EVAL",
                        help=f"evals to run, in this order; choose from {', '.join(EVALS)} (default: all five)")
    parser.add_argument(
        "--profile", "--preset", dest="profile", default=DEFAULT_PROFILE, choices=tuple(PROFILES),
        help="eval profile: 'quick' = SAEBench's test settings with small probe sets and 64-token contexts "
             "(minutes on a CPU); 'full' = SAEBench's defaults (default: %(default)s; --preset is an alias)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="the model the SAEs were trained on: a registered name or alias such as 'default' (loaded "
             "through its registration, offline, stand-in datasets), or any hub/TransformerLens name "
             "SAEBench loads itself, e.g. EleutherAI/pythia-70m-deduped (default: %(default)s)",
    )
    parser.add_argument("--out", default=None,
                        help="output folder for eval_results/ and saebench_work/ (default: SAE_DIR/saebench)")
    parser.add_argument("--device", default=None,
                        help="torch device for the model and the SAEs, e.g. cpu, cuda, cuda:1 "
                             "(default: cuda if available, else cpu)")
    parser.add_argument("--llm-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the evals run the model in (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--standins", dest="standins", action="store_true", default=None,
                       help="use the generated stand-in datasets (default for registered models)")
    group.add_argument("--no-standins", dest="standins", action="store_false",
                       help="use SAEBench's hub datasets (default for hub models)")
    parser.add_argument("--keep-existing", action="store_true", help="skip SAEs whose result files exist")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dictionary_learning_ext.errors import VsaeError, format_error

    from .results import summary_lines

    try:
        summary = run_evals(
            args.sae_dir, args.evals, model=args.model, profile=args.profile, out=args.out,
            standins=args.standins, device=args.device, llm_dtype=args.llm_dtype, force_rerun=not args.keep_existing,
        )
    except VsaeError as err:
        if getattr(err, "summary", None) is not None:  # evals failed: the others' outcomes first
            print("\n".join(summary_lines(err.summary)))
        print(format_error(err), file=sys.stderr)
        return err.exit_code
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
