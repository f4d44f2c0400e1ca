"""The README's main command: train TopK and VSAETopK side by side on the embedded default
model (no download) and print dictionary_learning's metrics for both.

    python -m experiments.demo [--save-dir runs/demo] [--steps 1500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from experiments import train


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    args.save_dir.parent.mkdir(parents=True, exist_ok=True)
    return train.main([
        "--architectures", "top_k", "vsae_topk",
        "--model", "default", "--layer", "0",
        "--k", "32", "--steps", str(args.steps), "--batch-size", "192",
        "--save-dir", str(args.save_dir), "--overwrite",
    ])


if __name__ == "__main__":
    sys.exit(main())
