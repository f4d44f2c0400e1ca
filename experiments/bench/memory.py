"""Peak memory of each trainer: growth of the resident set size while it is built and runs 4 steps, each in a
fresh process (``python -m experiments.bench_train --_memory-probe ...``), so allocator caches and earlier
trainers do not blur it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

from . import contenders as C

PROBES: dict[str, Callable[[int, int, int, int], C.Contender]] = {
    "TopKTrainer (dictionary_learning)": lambda d, F, k, b: C.dl_topk(d, F, k),
    "SAELens TopK": lambda d, F, k, b: C.saelens_topk(d, F, k, b),
    "VSAETopK": lambda d, F, k, b: C.vsae_topk("VSAETopK", d, F, k),
    "MP-SAE gram (fast path)": lambda d, F, k, b: C.mp_sae("MP-SAE gram", d, F, k, kernel="gram"),
    "MP-SAE unrolled (today)": lambda d, F, k, b: C.mp_sae("MP-SAE unrolled", d, F, k, kernel="unrolled"),
    "SAELens MatchingPursuit": lambda d, F, k, b: C.saelens_mp(d, F, k, b),
}


def _rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSSampler(threading.Thread):
    """Samples the resident set size every ``interval`` s (torch ops release the GIL, so this runs
    during them). ru_maxrss cannot be used: the imports already set a higher high-water mark."""

    def __init__(self, interval: float = 0.0005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss_mb(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_mb())


def probe(label: str, d: int, dict_size: int, batch: int, k: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth while building the trainer and running 4 steps."""
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d, generator=gen) for _ in range(4)]
    before = _rss_mb()
    sampler = RSSSampler()
    sampler.start()
    contender = PROBES[label](d, dict_size, k, batch)
    for x in data:
        contender.step(x)
    return {"baseline_mb": before, "peak_mb": sampler.stop()}


def run(args, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    d, F = args.memory_d, args.expansion * args.memory_d
    labels = [l for l in PROBES if C.saelens_available() is None or not l.startswith("SAELens")]
    for k in args.memory_k:
        for label in labels:
            if label.startswith("MP") or label == "SAELens MatchingPursuit":
                if k != args.memory_k[0]:
                    continue
            spec = json.dumps([label, d, F, args.memory_batch, k])
            cmd = [sys.executable, "-m", "experiments.bench_train", "--threads", str(args.threads), "--_memory-probe", spec]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append({"trainer": label, "d": d, "dict_size": F, "batch": args.memory_batch, "k": k, **result,
                         "delta_mb": result["peak_mb"] - result["baseline_mb"]})
        log(f"  memory k {k} done (load {os.getloadavg()[0]:.1f})")
    return rows


def report(rows: list[dict[str, Any]], print_=print) -> None:
    if not rows:
        return
    r0 = rows[0]
    print_(f"\npeak memory (d {r0['d']}, dict {r0['dict_size']}, batch {r0['batch']}): growth of the resident set "
           "size, sampled every 0.5 ms, in a fresh process that builds the trainer and runs 4 steps")
    for r in rows:
        print_(f"  k {r['k']:>4}  {r['trainer']:<36} +{r['delta_mb']:7.0f} MB (baseline {r['baseline_mb']:.0f} MB)")
