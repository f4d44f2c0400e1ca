"""Training throughput of TopK-style trainers on the same fixed activations, side by side in one run.

    python -m experiments.bench_train [--d 512 --dict-size 2048 --k 32 64 128 256 --batch-sizes 192 4096]

For every (batch, k): tokens/s of dictionary_learning's TopKTrainer, our VSAETopK with the dense
kernel (the reference), with the k-sparse kernel, and its deterministic twin (k-sparse, sampling
off: z = mu; the gap to it is what sampling costs), measured round-robin (A, B, C, D, A, B, ...)
so machine noise hits all of them alike; the median of the rounds is reported with its ratio to
TopKTrainer. Then the peak memory of each trainer, each in a fresh subprocess, and the
ActivationBuffer's refresh throughput on the embedded default model. The 1-minute load average
is printed at the start and end (the machine is shared; read the ratios, not the absolutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import torch

from dictionary_learning_ext import ARCHITECTURES
from experiments.training.plan import fitted_step_defaults

# (label, architecture, variant, extra config)
TRAINERS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("TopKTrainer (dictionary_learning)", "top_k", "default", {}),
    ("VSAETopK dense", "vsae_topk", "default", {"kernel": "dense"}),
    ("VSAETopK k-sparse", "vsae_topk", "default", {"kernel": "sparse"}),
    ("VSAETopK k-sparse, sampling off", "vsae_topk", "default", {"kernel": "sparse", "sampling": False}),
]
# --paper adds the paper variant (top-k on the sampled z, KL over all latents: dense noise and a
# dense encoder backward even in the k-sparse kernel) and its twin.
PAPER_TRAINERS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("VSAETopK paper k-sparse", "vsae_topk", "paper", {"kernel": "sparse"}),
    ("VSAETopK paper k-sparse, sampling off", "vsae_topk", "paper", {"kernel": "sparse", "sampling": False}),
]
REFERENCE = TRAINERS[0][0]


def trainer_specs(args) -> list[tuple[str, str, str, dict[str, Any]]]:
    return TRAINERS + (PAPER_TRAINERS if args.paper else [])


def make_trainer(arch_name: str, variant: str, extra: dict, args, k: int, steps: int):
    arch = ARCHITECTURES[arch_name]
    cfg = arch.trainer_config(
        variant, steps=steps, activation_dim=args.d, dict_size=args.dict_size, layer=0, lm_name="bench",
        device="cpu", seed=0, k=k, **fitted_step_defaults(arch, steps), **extra,
    )
    return cfg.pop("trainer")(**cfg)


def time_steps(trainer, data: list[torch.Tensor], start_step: int) -> float:
    begin = time.perf_counter()
    for i, x in enumerate(data):
        trainer.update(start_step + i, x)
    return time.perf_counter() - begin


def steps_per_round(args, batch: int) -> int:
    return max(2, args.tokens_per_round // batch)


def bench_throughput(args) -> list[dict[str, Any]]:
    rows = []
    specs = trainer_specs(args)
    for batch in args.batch_sizes:
        steps = steps_per_round(args, batch)
        gen = torch.Generator().manual_seed(0)
        data = [torch.randn(batch, args.d, generator=gen) for _ in range(steps)]
        for k in args.k:
            total_steps = 1 + steps * (args.rounds + 1) + 1
            trainers = {label: make_trainer(a, p, e, args, k, total_steps) for label, a, p, e in specs}
            for trainer in trainers.values():  # step 0 (geometric median) and a warm-up round off the clock
                trainer.update(0, data[0])
                time_steps(trainer, data, 1)
            seconds: dict[str, list[float]] = {label: [] for label in trainers}
            for r in range(args.rounds):
                for label, trainer in trainers.items():
                    seconds[label].append(time_steps(trainer, data, 1 + steps * (r + 1)))
            tokens = steps * batch
            ref = tokens / statistics.median(seconds[REFERENCE])
            for label in trainers:
                tps = tokens / statistics.median(seconds[label])
                rows.append({"batch": batch, "k": k, "trainer": label, "tokens_per_s": tps, "ratio_to_topk": tps / ref})
            del trainers
            print(f"  measured batch {batch}, k {k} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return rows


# --- peak memory, one fresh process per trainer -----------------------------------------
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


def memory_probe(args, label: str, batch: int, k: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth while building the trainer and running steps."""
    spec = {s[0]: s for s in trainer_specs(args)}[label]
    steps = 4
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, args.d, generator=gen) for _ in range(steps)]
    before = _rss_mb()
    sampler = RSSSampler()
    sampler.start()
    trainer = make_trainer(spec[1], spec[2], spec[3], args, k, steps + 1)
    for step, x in enumerate(data):
        trainer.update(step, x)
    return {"baseline_mb": before, "peak_mb": sampler.stop()}


def bench_memory(args) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batch_sizes:
        for k in args.memory_k:
            for label, *_ in trainer_specs(args):
                cmd = [sys.executable, "-m", "experiments.bench_train", "--d", str(args.d), "--dict-size",
                       str(args.dict_size), "--_memory-probe", json.dumps([label, batch, k])]
                if args.paper:
                    cmd.append("--paper")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                probe = json.loads(out.strip().splitlines()[-1])
                rows.append({"batch": batch, "k": k, "trainer": label, **probe,
                             "delta_mb": probe["peak_mb"] - probe["baseline_mb"]})
    return rows


# --- the activation buffer ----------------------------------------------------------------
def bench_buffer(args) -> dict[str, Any]:
    from experiments.lm.models import load_model
    from experiments.training.data import make_buffer

    lm = load_model("default", layer=0)
    from experiments.training.config import RunConfig

    stream = make_buffer(RunConfig(n_ctxs=args.buffer_ctxs, ctx_len=128, refresh_batch_size=64, batch_size=192), lm)
    seconds = []
    with stream.rng() as buffer:
        for _ in range(args.buffer_refreshes):
            buffer.read = torch.ones(len(buffer.activations), dtype=torch.bool)  # all consumed: refill fully
            begin = time.perf_counter()
            buffer.refresh()
            seconds.append(time.perf_counter() - begin)
        tokens = len(buffer.activations)
    return {"tokens_per_refresh": tokens, "tokens_per_s": tokens / statistics.median(seconds),
            "d_model": lm.d_model, "refreshes": len(seconds)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dict-size", type=int, default=2048)
    p.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[192, 4096])
    p.add_argument("--tokens-per-round", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--paper", action="store_true", help="also the paper variant (k-sparse) and its twin")
    p.add_argument("--memory-k", type=int, nargs="*", default=[64, 256], help="k values for the memory probes")
    p.add_argument("--buffer-ctxs", type=int, default=200, help="contexts (x128 tokens) per buffer refresh")
    p.add_argument("--buffer-refreshes", type=int, default=3, help="0 skips the buffer benchmark")
    p.add_argument("--parts", nargs="+", choices=["throughput", "memory", "buffer"],
                   default=["throughput", "memory", "buffer"])
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe is not None:
        label, batch, k = json.loads(args.memory_probe)
        print(json.dumps(memory_probe(args, label, batch, k)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"d={args.d}, dict={args.dict_size}; load at start {os.getloadavg()[0]:.2f}")
    if "throughput" in args.parts:
        report_throughput(args)
    if args.memory_k and "memory" in args.parts:
        print("\npeak memory: growth of the resident set size (sampled every 0.5 ms) in a fresh process while it "
              "builds the trainer and runs 4 steps: weights, Adam state, step temporaries, allocator caches")
        for r in bench_memory(args):
            print(f"  batch {r['batch']:>5}, k {r['k']:>4}  {r['trainer']:<40} +{r['delta_mb']:7.0f} MB "
                  f"(baseline {r['baseline_mb']:.0f} MB)")
    if args.buffer_refreshes > 0 and "buffer" in args.parts:
        b = bench_buffer(args)
        print(f"\nActivationBuffer refresh on the default model (layer 0, d_model {b['d_model']}): "
              f"{b['tokens_per_s']:.0f} tokens/s ({b['tokens_per_refresh']} tokens per refresh, median of "
              f"{b['refreshes']})")
    print(f"load at end: {os.getloadavg()[0]:.2f}")


def report_throughput(args) -> None:
    rows = bench_throughput(args)
    print(f"\n{'batch':>6} {'k':>4}  {'trainer':<40} {'tokens/s':>10}  {'vs TopKTrainer':>14}")
    for r in rows:
        print(f"{r['batch']:>6} {r['k']:>4}  {r['trainer']:<40} {r['tokens_per_s']:>10.0f}  {r['ratio_to_topk']:>14.2f}")
    by = {(r["batch"], r["k"], r["trainer"]): r["tokens_per_s"] for r in rows}
    print("\nsampling overhead (1 - sampled / sampling-off tokens/s):")
    for batch in args.batch_sizes:
        for k in args.k:
            pairs = [("default", "VSAETopK k-sparse", "VSAETopK k-sparse, sampling off")]
            if args.paper:
                pairs.append(("paper", "VSAETopK paper k-sparse", "VSAETopK paper k-sparse, sampling off"))
            cells = [f"{name} {100 * (1 - by[(batch, k, a)] / by[(batch, k, b)]):+.1f}%" for name, a, b in pairs]
            print(f"  batch {batch:>5}, k {k:>4}: " + ", ".join(cells))
    print(f"load after throughput: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
