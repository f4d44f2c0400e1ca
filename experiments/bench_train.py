"""Training throughput on real activations, against every peer: ``python -m experiments.bench_train``.

The benchmark itself lives in ``experiments.bench`` (see ``experiments/bench/cli.py`` for the options and
``experiments/bench/__init__.py`` for its parts); this module is its entry point.
"""

from experiments.bench.cli import main

if __name__ == "__main__":
    main()
