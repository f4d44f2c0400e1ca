"""Run a whole study: train every SAE on one shared activation buffer, run the SAEBench evals and the
analyses, and write RUN_DIR/results.json and the HTML report RUN_DIR/report/index.html.

    python -m experiments.sweep --study offline --run-dir runs/offline [--set steps=500] [--force]

A re-run skips every stage whose output exists; --force redoes them all. Studies are defined in
experiments/studies/definitions.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from experiments.cli import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", "--preset", dest="study", required=True,
                   help="the study to run: paper, offline, ablation, mp, digits, smoke")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the study's runs, results and report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the study or of its run (JSON value), e.g. --set steps=500 "
                        "--set 'ks=[32,64]'")
    p.add_argument("--setup", default=None, metavar="STUDY",
                   help="take model, data, sizes, k and hardware from another study (e.g. --setup paper for gelu-1l)")
    p.add_argument("--shard", default=None, metavar="INDEX/COUNT",
                   help="train only this share of the study's runs (runs INDEX, INDEX+COUNT, ...); the shard that "
                        "finishes last evaluates and writes the report. Default: a Slurm array's "
                        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or torchrun's RANK/WORLD_SIZE, else every run")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    p.add_argument("--no-report", action="store_true", help="skip writing the HTML report")
    return p


def shard_of(spec: str | None, environ: dict[str, str]):
    """The shard this process trains: ``--shard INDEX/COUNT``, else a Slurm array task, else a torchrun rank."""
    from dictionary_learning_ext.errors import UsageError
    from experiments.studies.sweep import Shard

    if spec is not None:
        index, sep, count = spec.partition("/")
        if not (sep and index.isdigit() and count.isdigit()):
            raise UsageError(f"--shard {spec!r}: expected INDEX/COUNT, e.g. --shard 0/4")
        return Shard(int(index), int(count))
    for index, count in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if index in environ and count in environ:
            return Shard(int(environ[index]), int(environ[count]))
    return Shard()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import os

        from experiments.studies.definitions import get_study
        from experiments.studies.report import headline_text
        from experiments.studies.sweep import run_study

        study = get_study(args.study)
        if args.setup:
            study = study.on_setup(get_study(args.setup))
        study = study.with_overrides(args.overrides)
        start = time.perf_counter()
        results = run_study(study, args.run_dir, force=args.force, report=not args.no_report,
                            shard=shard_of(args.shard, dict(os.environ)))
        if results is None:  # a shard that left evaluation and the report to the last one
            return 0
        if results.saes:
            print("\n" + headline_text(results))
        if results.synth:
            from experiments.synth.study import format_table

            print("\nground truth (synthetic data, setup " + repr(study.synth) + "):\n" + format_table(results.synth))
            for claim in results.synth["claims"].values():
                print("\n".join(claim.get("reading", [])))
        print(f"\nstudy {study.name!r} done in {time.perf_counter() - start:.0f} s")
        print(f"results: {(args.run_dir / 'results.json').resolve()}")
        print(f"logs:    {(args.run_dir / 'logs').resolve()} (the libraries' own output, one file per stage)")
        if not args.no_report:
            print(f"report:  {(args.run_dir / 'report' / 'index.html').resolve()}")
        failed = sorted({e for r in results.saes for e, o in r.saebench.items() if o.status == "failed"})
        if failed:  # recorded as failures (the table says why); the run did not fully succeed
            print(f"evals that failed: {', '.join(failed)}; a re-run retries them", file=sys.stderr)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
