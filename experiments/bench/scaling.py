"""How cost grows: tokens/s against dict size (k fixed) and against k (dict fixed), for VSAETopK and both
peers, beside the dense-FLOP roofline: the tokens/s a dense TopK step would reach if its 6 dense products
(encoder and decoder forward, two products each backward: 12 D F FLOPs per token) ran at this machine's
measured dense-matmul rate. A k-sparse step can pass it: it skips most of those products.

The sweep trains from scratch for a step or two on the synthetic d 512 workload: fewer tokens than the dead
window, so no latent is dead and auxK does no work here (the main table measures it after a warm-up)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import contenders as C
from .race import race
from .throughput import DL, OURS, SL
from .workloads import Workload


def matmul_flops(B: int, D: int, F: int, repeats: int = 5, clock: str = "cpu") -> float:
    """FLOP/s of a (B, D) @ (D, F) float32 product on this machine now (median of repeats, by ``clock``)."""
    a, b = torch.randn(B, D), torch.randn(D, F)
    a @ b
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        begin = now()
        a @ b
        times.append(now() - begin)
    return 2 * B * D * F / max(sorted(times)[len(times) // 2], 1e-9)


def run(w: Workload, args, log: Callable[[str], None]) -> dict[str, Any]:
    batch = args.scaling_batch
    points = [("dict", F, args.scaling_k) for F in args.scaling_dicts]
    points += [("k", args.scaling_dict, k) for k in args.scaling_ks]
    rows = []
    for axis, F, k in points:
        racers = [C.dl_topk(w.d, F, k), C.vsae_topk(OURS, w.d, F, k)]
        if C.saelens_available() is None:
            racers.insert(1, C.saelens_topk(w.d, F, k, batch))
        results = race(racers, lambda i: w.batch(i, batch), batch, warmup_steps=1, rounds=args.scaling_rounds,
                       steps_per_round=1, auxk_twins=False, clock=args.clock)
        peak = matmul_flops(batch, w.d, F, clock=args.clock)
        rows.append(dict(axis=axis, dict_size=F, k=k, batch=batch, d=w.d,
                         tokens_per_s={label: r.tokens_per_s for label, r in results.items()},
                         matmul_flops=peak, roofline_tokens_per_s=peak / (12 * w.d * F)))
        log(f"  scaling {axis}: dict {F} k {k}: " + ", ".join(f"{l} {r.tokens_per_s:.0f}/s" for l, r in results.items())
            + f", roofline {peak / (12 * w.d * F):.0f}/s (load {os.getloadavg()[0]:.1f})")
    return {"workload": w.name, "description": w.description, "rows": rows}


def report(result: dict[str, Any], out_dir: Path, print_=print) -> Path | None:
    rows = result["rows"]
    labels = [DL, SL, OURS]
    for axis, title in (("dict", "against dict size"), ("k", "against k")):
        mine = [r for r in rows if r["axis"] == axis]
        if not mine:
            continue
        print_(f"\ntokens/s {title} ({result['workload']}, d {mine[0]['d']}, batch {mine[0]['batch']}"
               + (f", k {mine[0]['k']})" if axis == "dict" else f", dict {mine[0]['dict_size']})"))
        print_(f"{'dict':>6} {'k':>4} | {'TopKTrainer':>11} {'SAELens':>9} {'VSAETopK':>9} | {'dense roofline':>14} "
               f"{'(matmul GFLOP/s)':>16} | {'VSAETopK/roofline':>17}")
        for r in mine:
            t = r["tokens_per_s"]
            print_(f"{r['dict_size']:>6} {r['k']:>4} | {t[DL]:>11.0f} {t.get(SL, float('nan')):>9.0f} {t[OURS]:>9.0f} | "
                   f"{r['roofline_tokens_per_s']:>14.0f} {r['matmul_flops'] / 1e9:>16.1f} | "
                   f"{t[OURS] / r['roofline_tokens_per_s']:>17.2f}")
    return figure(result, labels, out_dir)


def figure(result: dict[str, Any], labels: list[str], out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, axis, xkey, xlabel in ((axes[0], "dict", "dict_size", "dict size F"), (axes[1], "k", "k", "k")):
        mine = [r for r in rows if r["axis"] == axis]
        if not mine:
            continue
        xs = [r[xkey] for r in mine]
        for label in labels:
            if label in mine[0]["tokens_per_s"]:
                ax.plot(xs, [r["tokens_per_s"][label] for r in mine], marker="o", label=label)
        ax.plot(xs, [r["roofline_tokens_per_s"] for r in mine], "k--", label="dense-FLOP roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens / s")
        fixed = f"k {mine[0]['k']}" if axis == "dict" else f"dict {mine[0]['dict_size']}"
        ax.set_title(f"against {xlabel} ({fixed}, batch {mine[0]['batch']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Training throughput, {result['workload']} (d {rows[0]['d']}), {torch.get_num_threads()} thread(s)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_scaling.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
