"""The TopK table: VSAETopK (recommended default) against dictionary_learning's TopKTrainer and SAELens's
TopK training SAE, on each workload, batch and k, in one race per cell; and the issue's targets."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from dictionary_learning_ext.vsae_topk import AUTO_SPARSE_MIN_BATCH

from . import contenders as C
from .race import Result, race
from .workloads import Workload

DL = "TopKTrainer (dictionary_learning)"
SL = "SAELens TopK"
OURS = "VSAETopK"
OURS_NO_SAMPLING = "VSAETopK, sampling off"
TARGET_LARGE_BATCH = 4096
TARGETS = {"large": 2.0, "small": 1.5, "never_slower": 1.0, "sampling_overhead": 0.05}


def kernel_of(batch: int) -> str:
    """What kernel="auto" runs at this batch size (vsae_topk.VSAETopKTrainer.uses_sparse_step)."""
    return "sparse" if batch >= AUTO_SPARSE_MIN_BATCH else "dense"


def cell_contenders(w: Workload, dict_size: int, batch: int, k: int, args) -> list[C.Contender]:
    d = w.d
    out = [C.dl_topk(d, dict_size, k)]
    if C.saelens_available() is None:
        out.append(C.saelens_topk(d, dict_size, k, batch))
    out.append(C.vsae_topk(OURS, d, dict_size, k))
    out.append(C.vsae_topk(OURS_NO_SAMPLING, d, dict_size, k, sampling=False))
    auto = kernel_of(batch)
    if args.both_kernels or auto == "dense":  # the other kernel too, where it is cheap to time (small batches)
        other = "dense" if auto == "sparse" else "sparse"
        out.append(C.vsae_topk(f"VSAETopK kernel={other}", d, dict_size, k, kernel=other))
    if args.paper:
        out.append(C.vsae_topk("VSAETopK paper", d, dict_size, k, variant="paper"))
        out.append(C.vsae_topk("VSAETopK paper, sampling off", d, dict_size, k, variant="paper", sampling=False))
    return out


def run(workloads: list[Workload], args, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for w in workloads:
        dict_size = args.expansion * w.d
        for batch in args.batch_sizes:
            warmup = math.ceil(args.warmup_tokens / batch)
            steps = max(1, args.tokens_per_round // batch)
            for k in args.k:
                results = race(cell_contenders(w, dict_size, batch, k, args), lambda i: w.batch(i, batch), batch,
                               warmup_steps=warmup, rounds=args.rounds, steps_per_round=steps,
                               log=lambda s: None, clock=args.clock)
                rows.append(cell_row(w, dict_size, batch, k, warmup, results))
                log(f"  {w.name} batch {batch} k {k}: "
                    + ", ".join(f"{r.label} {r.tokens_per_s:.0f}/s" for r in results.values())
                    + f" (load {os.getloadavg()[0]:.1f})")
    return rows


def cell_row(w: Workload, dict_size: int, batch: int, k: int, warmup: int, results: dict[str, Result]) -> dict[str, Any]:
    tps = {label: r.tokens_per_s for label, r in results.items()}
    row: dict[str, Any] = dict(workload=w.name, d=w.d, dict_size=dict_size, batch=batch, k=k, kernel=kernel_of(batch),
                               warmup_tokens=warmup * batch, tokens_per_s=tps,
                               wall_tokens_per_s={label: r.wall_tokens_per_s for label, r in results.items()},
                               spread={label: r.spread for label, r in results.items()},
                               dead_after_warmup={label: r.dead_after_warmup for label, r in results.items()},
                               timed_steps_with_dead={label: r.timed_steps_with_dead for label, r in results.items()},
                               auxk_share={label: r.auxk_share for label, r in results.items()})
    row["vs_dl"] = tps[OURS] / tps[DL]
    row["vs_saelens"] = tps[OURS] / tps[SL] if SL in tps else None
    row["sampling_overhead"] = 1.0 - tps[OURS] / tps[OURS_NO_SAMPLING]
    return row


def _pct(x) -> str:
    return "  n/a" if x is None else f"{100 * x:+4.0f}%"


def report(rows: list[dict[str, Any]], workloads: list[Workload], print_=print) -> None:
    for w in workloads:
        mine = [r for r in rows if r["workload"] == w.name]
        if not mine:
            continue
        print_(f"\n{w.description}; dict {mine[0]['dict_size']}")
        print_(f"{'batch':>6} {'k':>4} {'kernel':>6} | {'TopKTrainer':>11} {'SAELens':>9} {'VSAETopK':>9} | "
               f"{'vs TopKTr.':>10} {'vs SAELens':>10} | {'sampling':>8} | {'auxK share ours/TopKTr/SAEL':>27} | "
               f"{'dead after warm-up':>18}")
        for r in mine:
            t = r["tokens_per_s"]
            shares = "/".join(_pct(r["auxk_share"].get(x)).strip() for x in (OURS, DL, SL))
            dead = "/".join(str(r["dead_after_warmup"].get(x, "-")) for x in (OURS, DL, SL))
            vs_sl = f"{r['vs_saelens']:10.2f}" if r["vs_saelens"] is not None else f"{'n/a':>10}"
            print_(f"{r['batch']:>6} {r['k']:>4} {r['kernel']:>6} | {t[DL]:>11.0f} {t.get(SL, float('nan')):>9.0f} "
                   f"{t[OURS]:>9.0f} | {r['vs_dl']:>10.2f} {vs_sl} | {_pct(r['sampling_overhead']):>8} | "
                   f"{shares:>27} | {dead:>18}")
        others = sorted({label for r in mine for label in r["tokens_per_s"]} - {DL, SL, OURS} - {
            label for label in (f"{x} [auxK off]" for x in (OURS, DL, SL))})
        if others:
            print_("  also timed (tokens/s, ratio to VSAETopK default):")
            for r in mine:
                t = r["tokens_per_s"]
                cells = [f"{o}: {t[o]:.0f} ({t[o] / t[OURS]:.2f})" for o in others if o in t]
                print_(f"    batch {r['batch']:>5}, k {r['k']:>4}: " + "; ".join(cells))
    print_("tokens/s: median of the rounds (by the race's clock; wall-clock tokens/s and the spread of the rounds, "
           "(max-min)/median, are in results.json). auxK share: 1 - "
           "time with auxK off / time with it, measured on a copy taken after the warm-up when latents were "
           "dead then, else 0 (auxK only counts the dead latents).")


def check_targets(rows: list[dict[str, Any]], print_=print) -> list[dict[str, Any]]:
    """The issue's targets, cell by cell: met, or missed by how much."""
    verdicts = []
    for r in rows:
        cell = f"{r['workload']} batch {r['batch']} k {r['k']}"
        need = TARGETS["large"] if r["batch"] >= TARGET_LARGE_BATCH else TARGETS["small"]
        for peer, ratio in (("TopKTrainer", r["vs_dl"]), ("SAELens TopK", r["vs_saelens"])):
            if ratio is None:
                continue
            verdicts.append(dict(cell=cell, target=f">= {need:.1f}x {peer}", value=ratio, met=ratio >= need,
                                 missed_by=None if ratio >= need else f"{ratio:.2f}x ({100 * (1 - ratio / need):.0f}% short)"))
            verdicts.append(dict(cell=cell, target=f"never slower than {peer}", value=ratio, met=ratio >= 1.0,
                                 missed_by=None if ratio >= 1.0 else f"{ratio:.2f}x"))
        s = r["sampling_overhead"]
        verdicts.append(dict(cell=cell, target="sampling overhead <= 5%", value=s, met=s <= TARGETS["sampling_overhead"],
                             missed_by=None if s <= 0.05 else f"{100 * s:.1f}%"))
    met = sum(v["met"] for v in verdicts)
    print_(f"\ntargets: {met} of {len(verdicts)} met")
    for v in verdicts:
        if not v["met"]:
            print_(f"  MISSED {v['cell']}: {v['target']}: {v['missed_by']}")
    return verdicts
