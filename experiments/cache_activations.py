"""Cache a model's activations to disk once, for any number of training runs (``--activations DIR``).

    python -m experiments.cache_activations --model default --layer 0 --text local --tokens 2000000 --out cache/
    python -m experiments.train --activations cache/ --model default --layer 0 --architectures top_k ...

Writes fixed-size shards (shard_000000.npy, ...) and manifest.json (model, layer, hook site, tokenizer,
dtype, width, token count, shard size, each shard's sha256), every file atomically. If the command is
killed, running it again verifies the shards written and continues after the last good one; on a finished
cache it verifies and rewrites any damaged shard (and those after it), or extends it to a larger --tokens.

--model, --layer, --text, --ctx-len, --refresh-batch-size, --seed and --device mean what they mean for
experiments.train (they are the same options); see experiments.training.cache for the format.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from typing import Sequence

from experiments.cli import add_dataclass_options, given_values, run_main
from experiments.training.cache import SOURCE_FIELDS, CacheOptions
from experiments.training.config import RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.cache_activations", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(parser, RunConfig, skip=[f.name for f in fields(RunConfig) if f.name not in SOURCE_FIELDS])
    add_dataclass_options(parser, CacheOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)

    def body() -> int:
        from experiments.training.cache import write_cache

        source = RunConfig.from_dict(given_values(namespace, RunConfig))  # the same checks as a training run's
        options = CacheOptions(**given_values(namespace, CacheOptions))
        started = time.time()

        def progress(index: int) -> None:
            print(f"shard {index} written ({time.time() - started:.1f} s)", file=sys.stderr)

        manifest = write_cache(source, options, on_shard=progress)
        print(f"{manifest['tokens']} activations of {manifest['model']} at {manifest['hook_name']} (d_model "
              f"{manifest['d_model']}, {manifest['dtype']}) in {len(manifest['shards'])} shards in {options.out} "
              f"({time.time() - started:.1f} s)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
