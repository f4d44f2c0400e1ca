"""The README's main command: train TopK and VSAETopK side by side on the embedded default
model (no download), print dictionary_learning's metrics, then run SAEBench's five evals on
both (quick preset, offline stand-in data) and print their headline numbers side by side.

    python -m experiments.demo [--save-dir runs/demo] [--steps 1500] [--k 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments import train


def side_by_side(summary: dict[str, Any], labels: dict[str, str]) -> str:
    """One row per (eval, metric), one column per SAE."""
    names = list(summary["saes"])
    # SAE names are "<run>_<trainer_i>"; label them by their trainer folder.
    rows: list[list[str]] = [["eval", "metric", *[next((v for k, v in labels.items() if n.endswith(k)), n) for n in names]]]
    notes: list[str] = []
    for eval_type in summary["evals"]:
        results = [summary["saes"][n][eval_type] for n in names]
        if any(r["status"] != "ok" for r in results):
            rows.append([eval_type, "not evaluable", *[r["status"] for r in results]])
            notes.extend(f"{eval_type} ({n}): {r['reason']}" for n, r in zip(names, results) if "reason" in r)
            continue
        for metric in results[0]["metrics"]:
            rows.append([eval_type, metric, *[f"{r['metrics'].get(metric, float('nan')):.3f}" for r in results]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + notes)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--skip-evals", action="store_true", help="stop after training")
    args = p.parse_args(argv)
    args.save_dir.parent.mkdir(parents=True, exist_ok=True)
    code = train.main([
        "--architectures", "top_k", "vsae_topk",
        "--model", "default", "--layer", "0",
        "--k", str(args.k), "--steps", str(args.steps), "--batch-size", "192",
        "--save-dir", str(args.save_dir), "--overwrite",
    ])
    if code != 0 or args.skip_evals:
        return code

    from saebench_adapters.run_evals import run_evals

    print("\nRunning SAEBench (core, absorption, scr, tpp, sparse_probing; quick preset) ...")
    summary = run_evals(args.save_dir, model="default", preset="quick", out=args.save_dir / "saebench")
    labels = {"trainer_0": "TopK", "trainer_1": "VSAETopK"}
    print("\nSAEBench results (embedded model, stand-in datasets):")
    print(side_by_side(summary, labels))
    print("\nseconds per eval:", summary["seconds"])
    print(f"\nresult files: {args.save_dir.resolve() / 'saebench' / 'eval_results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
