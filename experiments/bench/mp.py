"""MP-SAE: the Gram fast path (kernel="gram") against today's unrolled loop (kernel="unrolled") and SAELens's
MatchingPursuit training SAE, in one race per workload (k fixed steps, F = 4 D)."""

from __future__ import annotations

import os
from typing import Any, Callable

from . import contenders as C
from .race import race
from .workloads import Workload

FAST, TODAY, SL = "MP-SAE gram (fast path)", "MP-SAE unrolled (today)", "SAELens MatchingPursuit"
TARGETS = {SL: 5.0, TODAY: 3.0}


def run(workloads: list[Workload], args, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for w in workloads:
        F, k, batch = args.expansion * w.d, args.mp_k, args.mp_batch
        racers = [C.mp_sae(FAST, w.d, F, k, kernel="gram"), C.mp_sae(TODAY, w.d, F, k, kernel="unrolled")]
        if C.saelens_available() is None:
            racers.append(C.saelens_mp(w.d, F, k, batch))
        for select in args.mp_select_also:
            racers.append(C.mp_sae(f"MP-SAE gram, select={select}", w.d, F, k, kernel="gram", select=select))
            racers.append(C.mp_sae(f"MP-SAE unrolled, select={select}", w.d, F, k, kernel="unrolled", select=select))
        results = race(racers, lambda i: w.batch(i, batch), batch, warmup_steps=1, rounds=args.rounds, steps_per_round=1, clock=args.clock)
        tps = {label: r.tokens_per_s for label, r in results.items()}
        rows.append(dict(workload=w.name, d=w.d, dict_size=F, k=k, batch=batch, tokens_per_s=tps,
                         wall_tokens_per_s={label: r.wall_tokens_per_s for label, r in results.items()},
                         spread={label: r.spread for label, r in results.items()},
                         speedup={peer: tps[FAST] / tps[peer] for peer in (TODAY, SL) if peer in tps}))
        log(f"  MP {w.name}: " + ", ".join(f"{label} {v:.0f}/s" for label, v in tps.items())
            + f" (load {os.getloadavg()[0]:.1f})")
    return rows


def report(rows: list[dict[str, Any]], print_=print) -> list[dict[str, Any]]:
    verdicts = []
    for r in rows:
        print_(f"\nMP-SAE, {r['workload']} (d {r['d']}, dict {r['dict_size']}, k {r['k']}, batch {r['batch']}, select=relu):")
        for label, v in r["tokens_per_s"].items():
            ratio = r["tokens_per_s"][FAST] / v
            print_(f"  {label:<36} {v:>9.0f} tokens/s   fast path x{ratio:.2f}")
        for peer, need in TARGETS.items():
            if peer in r["speedup"]:
                got = r["speedup"][peer]
                verdicts.append(dict(cell=f"MP {r['workload']}", target=f">= {need:.0f}x {peer}", value=got,
                                     met=got >= need, missed_by=None if got >= need else f"{got:.2f}x"))
                print_(f"  target >= {need:.0f}x {peer}: {'met' if got >= need else 'MISSED'} ({got:.2f}x)")
    return verdicts
