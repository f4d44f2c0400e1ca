"""``python -m experiments.bench_train``: training throughput against every peer, on real activations.

    python -m experiments.bench_train                       # everything, ~15 min on 2 busy cores
    python -m experiments.bench_train --parts throughput mp # pieces
    python -m experiments.bench_train --parts throughput --workloads embedded --k 32 --batch-sizes 4096

Parts: ``throughput`` (VSAETopK against dictionary_learning's TopKTrainer and SAELens's TopK: every workload,
batch and k, one race per cell, with the targets checked), ``mp`` (MP-SAE's Gram fast path against today's
unrolled loop and SAELens's MatchingPursuit), ``scaling`` (tokens/s against dict size and k beside the
dense-FLOP roofline: table and figure), ``memory`` (peak memory per trainer, fresh processes) and ``buffer``
(the ActivationBuffer's refresh speed). Results also go to ``--out-dir`` (results.json, bench_scaling.png).

The machine is shared: the 1-minute load average is printed at the start, after each cell and part, and at
the end; read the ratios (every contender of a cell ran in the same rounds), not the absolutes. One torch
thread by default (``--threads``): on two cores that other processes also use, two threads spin at
OpenMP barriers and a step can take 10-100x longer, which no amount of rounds averages out. Steps are timed by
the process's CPU time by default (``--clock cpu``; with one thread, the time the step computed, not the time
other processes held the core); tokens/s below are tokens per second of that clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

PARTS = ("throughput", "mp", "scaling", "memory", "buffer")
WORKLOADS = ("embedded", "synthetic512")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "runs" / "bench"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (see above)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time steps by this process's CPU time (stable on a shared machine with one thread) or "
                        "by the wall clock; both are recorded")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="results.json and the scaling figure")
    p.add_argument("--embedded-tokens", type=int, default=200_000, help="activations collected once and cached")
    p.add_argument("--synthetic-tokens", type=int, default=100_000)
    p.add_argument("--expansion", type=int, default=4, help="dict size = expansion x d")
    g = p.add_argument_group("throughput")
    g.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 256])
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[192, 4096])
    g.add_argument("--warmup-tokens", type=int, default=24_576,
                   help="trained before timing (more than the 20,000-token dead window)")
    g.add_argument("--tokens-per-round", type=int, default=4096)
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--both-kernels", action="store_true",
                   help="also time the kernel 'auto' does not pick at large batches (the dense one: slow)")
    g.add_argument("--paper", action="store_true", help="also the paper variant and its sampling-off twin")
    g = p.add_argument_group("mp")
    g.add_argument("--mp-k", type=int, default=32)
    g.add_argument("--mp-batch", type=int, default=4096)
    g.add_argument("--mp-select-also", nargs="*", choices=["abs"], default=[], help="also time select=abs (ours)")
    g = p.add_argument_group("scaling")
    g.add_argument("--scaling-workload", choices=WORKLOADS, default="synthetic512")
    g.add_argument("--scaling-batch", type=int, default=1024)
    g.add_argument("--scaling-k", type=int, default=32, help="k of the dict-size sweep")
    g.add_argument("--scaling-dicts", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    g.add_argument("--scaling-dict", type=int, default=2048, help="dict size of the k sweep")
    g.add_argument("--scaling-ks", type=int, nargs="*", default=[16, 32, 64, 128, 256])
    g.add_argument("--scaling-rounds", type=int, default=3)
    g = p.add_argument_group("memory")
    g.add_argument("--memory-d", type=int, default=512)
    g.add_argument("--memory-batch", type=int, default=4096)
    g.add_argument("--memory-k", type=int, nargs="*", default=[32, 256])
    g = p.add_argument_group("buffer")
    g.add_argument("--buffer-ctxs", type=int, default=200, help="contexts (x128 tokens) per buffer refresh")
    g.add_argument("--buffer-refreshes", type=int, default=3)
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return p


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "load_1min": os.getloadavg()[0]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        from . import memory

        label, d, F, batch, k = json.loads(args.memory_probe)
        print(json.dumps(memory.probe(label, d, F, batch, k)))
        return {}
    import warnings

    warnings.filterwarnings("ignore", message=".*[Ss]parse CSR.*")
    start = time.perf_counter()
    info = machine()
    from . import contenders as C

    why = C.saelens_available()
    peers = "dictionary_learning 0.1.0, " + (f"SAELens {C.saelens_version()}" if why is None else f"no SAELens ({why})")
    print(f"torch {info['torch']}, {info['threads']} thread(s), {info['cpus']} cpus, {args.clock} clock; peers: {peers}; "
          f"load at start {info['load_1min']:.2f}", flush=True)
    results: dict[str, Any] = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()}}
    verdicts: list[dict[str, Any]] = []
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  (progress: stderr)

    def part_done(name: str) -> None:
        print(f"[{name} done: {time.perf_counter() - start:.0f} s elapsed, load {os.getloadavg()[0]:.2f}]", flush=True)

    needs = set(args.workloads) if {"throughput", "mp"} & set(args.parts) else set()
    if "scaling" in args.parts:
        needs.add(args.scaling_workload)
    workloads = load_workloads(needs, args, log)
    if workloads:
        print("workloads:\n" + "\n".join(f"  {w.name}: {w.description}" for w in workloads.values()))
    chosen = [workloads[n] for n in args.workloads if n in workloads]

    if "throughput" in args.parts:
        from . import throughput

        print(f"\n== VSAETopK (recommended default) against TopKTrainer and SAELens TopK: warm-up "
              f"{args.warmup_tokens} tokens, then {args.rounds} round-robin rounds of {args.tokens_per_round} tokens",
              flush=True)
        rows = throughput.run(chosen, args, log)
        throughput.report(rows, chosen)
        verdicts += throughput.check_targets(rows, print_=lambda s: None)
        results["throughput"] = rows
        part_done("throughput")
    if "mp" in args.parts:
        from . import mp

        print(f"\n== MP-SAE: Gram fast path against today's unrolled loop and SAELens MatchingPursuit", flush=True)
        rows = mp.run(chosen, args, log)
        verdicts += mp.report(rows)
        results["mp"] = rows
        part_done("mp")
    if "scaling" in args.parts:
        from . import scaling

        print(f"\n== How cost grows", flush=True)
        res = scaling.run(workloads[args.scaling_workload], args, log)
        path = scaling.report(res, args.out_dir)
        if path is not None:
            print(f"figure: {path}")
        results["scaling"] = res
        part_done("scaling")
    if "memory" in args.parts and args.memory_k:
        from . import memory

        rows = memory.run(args, log)
        memory.report(rows)
        results["memory"] = rows
        part_done("memory")
    if "buffer" in args.parts and args.buffer_refreshes > 0:
        from . import buffer

        b = buffer.run(args)
        buffer.report(b)
        results["buffer"] = b
        part_done("buffer")
    if verdicts:
        print_verdicts(verdicts)
        results["targets"] = verdicts
    results["elapsed_s"] = time.perf_counter() - start
    results["load_at_end"] = os.getloadavg()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {args.out_dir / 'results.json'}; {results['elapsed_s']:.0f} s; "
          f"load at end {results['load_at_end']:.2f}")
    return results


def load_workloads(names: set[str], args, log) -> dict[str, Any]:
    from .workloads import embedded_workload, synthetic_workload

    out = {}
    for name in WORKLOADS:
        if name not in names:
            continue
        if name == "embedded":
            out[name] = embedded_workload(args.embedded_tokens, log=log)
        else:
            out[name] = synthetic_workload(512, args.synthetic_tokens)
    return out


def print_verdicts(verdicts: list[dict[str, Any]]) -> None:
    met = [v for v in verdicts if v["met"]]
    print(f"\n== targets: {len(met)} of {len(verdicts)} met")
    for v in verdicts:
        if not v["met"]:
            print(f"  MISSED  {v['cell']}: {v['target']}: {v['missed_by']}")
