"""Ground truth: score every architecture on SynthSAEBench-style synthetic data with known features.

    python -m experiments.synth_study OUT_DIR [--setup NAME] [--seeds 0 1 2] [--quick] [--force]
        [--set model.KEY=VALUE] [--set training.KEY=VALUE] [--model-source auto|hub|local] [--device cpu]

A SynthSAEBench-style synthetic model (SAELens's ``sae_lens.synthetic``: Zipfian firing, a hierarchy of
mutually exclusive children scaled by their parent, low-rank correlations, orthogonalised feature vectors,
folded-normal magnitudes) is the activation source; every SAE of the setup is trained on it under the
studies' protocol and scored by SAELens's ``eval_sae_on_synthetic_data`` against the true features (F1, MCC,
uniqueness, explained variance, ...), at matched L0 and over seeds (means with 95% t-intervals).

Setups: ``synth`` (default; CPU, minutes: 1,024 features in 64 dimensions, SAEs of 256 latents) and
``synthsaebench16k`` (the published SynthSAEBench-16k: 16,384 features in 768 dimensions, width 4096, 200M
samples, lr 3e-4, batch 1024; loaded from the hub when reachable, else built here; for a GPU: --device cuda).
``--quick`` runs a seconds-long version (tests).

Writes ``OUT_DIR/results.json`` (self-describing: ``description``, ``settings``, ``rows`` = every trained SAE
and seed, ``table`` = means over seeds per SAE and target L0, ``claims``, ``figures``), the PNG figures, the
synthetic model (``OUT_DIR/synthetic_model``, SAELens's save format) and the trained dictionaries
(``OUT_DIR/runs/seed_<s>/<group>/trainer_<i>/{ae.pt, config.json}``, loadable with ``load_dictionary``).
The study lives in ``experiments.synth``; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dictionary_learning_ext.errors import MissingFileError
from experiments.cli import run_main

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.synth_study", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for results.json, figures, the synthetic model and dictionaries")
    p.add_argument("--setup", default="synth", help="named setup: synth (default) or synthsaebench16k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="one run per seed (default 0 1 2)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version of the setup, for tests")
    p.add_argument("--force", action="store_true", help="re-run even if OUT_DIR/results.json exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE",
                   help="change a setting (JSON value): model.hidden_dim=128, model.firing.max_prob=0.2, "
                        "training.steps=500, training.l0_targets=[4,8]")
    p.add_argument("--model-source", default="auto", choices=("auto", "hub", "local"),
                   help="auto: the setup's hub copy when reachable, else build it here; hub: only the hub; local: build")
    p.add_argument("--device", default="cpu", help="torch device for the synthetic model and the SAEs (e.g. cuda)")
    args = p.parse_args(argv)

    def body() -> int:
        from experiments.synth.study import RESULTS, format_table, run_synth_study

        if not args.out_dir.parent.is_dir():
            raise MissingFileError(f"parent folder of {args.out_dir} does not exist; create it first")
        results = run_synth_study(args.out_dir, setup=args.setup, seeds=tuple(args.seeds), quick=args.quick,
                                  force=args.force, overrides=args.overrides, model_source=args.model_source,
                                  device=args.device)
        used = results["settings"]["model_source_used"]
        if "hub_error" in used:
            print(f"note: {used['hub_error']} Used: {used['used']}.", file=sys.stderr)
        print(format_table(results))
        for claim in results["claims"].values():
            for line in claim.get("reading", []):
                print(line)
        print(f"wrote {args.out_dir / RESULTS} and {len(results['figures'])} figures in {results['elapsed_seconds']} s")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
