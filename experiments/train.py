"""Train SAEs of any registered architecture with dictionary_learning's buffer and trainers.

    python -m experiments.train --architectures top_k vsae_topk --model default --layer 0 \\
        --dict-size 1024 --k 32 --steps 2000 --save-dir runs/demo [--checkpoint-every 500]
    python -m experiments.train --resume runs/demo      # continue an interrupted run
    torchrun --nproc_per_node 2 -m experiments.train ...  # data-parallel: the same SAEs on 2 processes
    python -m experiments.train --activations cache/ ...  # on cached activations (experiments.cache_activations)

Writes dictionary_learning's layout save_dir/trainer_i/{ae.pt, config.json} plus metrics.json per
trainer and run.json/metrics.json at the top. Everything is validated before the model is loaded.
Training happens in the staging folder .<save_dir name>.partial beside save_dir, renamed into place
only when every trainer finished; if the run fails or is killed, that folder is kept when it holds a
checkpoint (--checkpoint-every), and --resume save_dir continues from it.

The options are the fields of experiments.training.config.RunConfig.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.cli import add_dataclass_options, given_values, run_main
from experiments.training.config import RunConfig


@dataclass
class Invocation:
    """What one command line asks for."""

    given: dict[str, Any]
    """The RunConfig fields given on the command line (the rest take their defaults, or, with --resume,
    the run's stored values)."""
    resume: Optional[Path]
    overwrite: bool
    argv: list[str]

    @property
    def config(self) -> RunConfig:
        """The configuration of a fresh run (validated)."""
        return RunConfig.from_dict(self.given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, RunConfig)
    parser.add_argument("--resume", type=Path, default=None, metavar="SAVE_DIR",
                        help="continue the interrupted run of SAVE_DIR from its last checkpoint, with its own options")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing save dir")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Invocation:
    argv = list(sys.argv[1:] if argv is None else argv)
    namespace = build_parser().parse_args(argv)
    return Invocation(given_values(namespace, RunConfig), namespace.resume, namespace.overwrite, argv)


def run(invocation: Invocation) -> list[dict[str, Any]]:
    """Train (or resume) what the invocation asks for; returns the metrics rows."""
    from experiments.training.run import resume_run, train_run

    # Under torchrun the ranks train one run together (data parallelism); alone, data_parallel changes nothing.
    if invocation.resume is not None:
        return resume_run(invocation.resume, invocation.given, invocation.overwrite, data_parallel=True)
    return train_run(invocation.config, invocation.overwrite, invocation.argv, data_parallel=True)


def main(argv: Sequence[str] | None = None) -> int:
    invocation = parse_args(argv)

    def body() -> int:
        from experiments.training.evaluate import metrics_table

        rows = run(invocation)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 evaluates and reports
            print(metrics_table(rows))
            print(f"\nsaved to {Path(invocation.resume or invocation.given['save_dir']).resolve()}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
