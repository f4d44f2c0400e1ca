"""Controlled digits study: MP-SAE against shallow SAEs at matched L0 (Costa et al. 2025, on MNIST).

    python -m experiments.digits_study OUT_DIR [--force] [--seed 0] [--quick]

sklearn's bundled 8x8 handwritten digits (1797 images, no download) stand in for MNIST. Four
registered architectures are trained on the same batches, with the same dictionary size, learning
rate and schedule: the standard ReLU + L1 SAE ("standard", its L1 penalty tuned so that its L0
lands near each target k), TopK ("top_k"), VSAETopK ("vsae_topk") and MP-SAE ("mp_sae") at k in
``k_values``. On the held-out images it reports reconstruction (FVE, normalised MSE) against L0,
MP-SAE's reconstruction against the number of pursuit steps used at inference, and the coherence
of each learned dictionary (|cos| between distinct atoms: all atoms, atoms that are used, and atoms
used together on one image), and draws the most used atoms of each as 8x8 images.

Writes ``OUT_DIR/results.json`` (self-describing: ``table`` = the matched-L0 rows, ``rows`` = every
run, ``figures`` = file + caption), the PNG figures and the trained dictionaries
(``OUT_DIR/dictionaries/<run>/{ae.pt, config.json}``, loadable with ``load_dictionary``).
The study lives in ``experiments.digits``; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from dictionary_learning_ext.errors import MissingFileError
from experiments.cli import run_main

TABLE_COLUMNS = {"architecture": "arch", "k": "k", "l1_penalty": "l1", "l0": "L0", "fve": "FVE", "nmse": "NMSE",
                 "coherence_used_mean": "coh used mean", "coherence_used_max": "coh used max",
                 "coherence_nn_used_mean": "coh nn", "coactive_coherence": "coh co-active", "frac_used": "frac used"}


def format_table(results: dict) -> str:
    """The matched-L0 table as text; "-" where a number does not apply (no k, no L1 penalty)."""
    from tabulate import tabulate

    cells = [[r[key] for key in TABLE_COLUMNS] for r in results["table"]]
    return tabulate(cells, headers=list(TABLE_COLUMNS.values()), floatfmt=".3f", missingval="-")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.digits_study", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for results.json, figures and dictionaries")
    p.add_argument("--force", action="store_true", help="re-run even if OUT_DIR/results.json exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    args = p.parse_args(argv)

    def body() -> int:
        from experiments.digits.study import RESULTS, run_digits_study

        if not args.out_dir.parent.is_dir():
            raise MissingFileError(f"parent folder of {args.out_dir} does not exist; create it first")
        results = run_digits_study(args.out_dir, force=args.force, seed=args.seed, quick=args.quick)
        print(format_table(results))
        print(json.dumps(results["claim"], indent=1))
        print(f"wrote {args.out_dir / RESULTS} and {len(results['figures'])} figures in {results['elapsed_seconds']} s")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
