"""Training throughput of every trainer on the same fixed activations, side by side in one run.

    python -m experiments.bench_train [--d 512 --dict-size 2048 --k 64 --batch-sizes 192 4096]

Prints tokens/s per trainer and its ratio to dictionary_learning's TopKTrainer, measured
round-robin (trainer A, B, C, A, B, C, ...) so machine noise hits all of them alike; the
median of the rounds is reported. A benchmark, not a test: read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Sequence

import torch

from dictionary_learning_ext import ARCHITECTURES
from experiments.train import fitted_step_defaults

# (label, architecture, preset, extra config)
TRAINERS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("dictionary_learning TopKTrainer", "top_k", "default", {}),
    ("dictionary_learning StandardTrainer", "standard", "default", {}),
    ("VSAE", "vsae", "default", {}),
    ("VSAETopK (default)", "vsae_topk", "default", {}),
    ("VSAETopK (paper)", "vsae_topk", "paper", {}),
]
REFERENCE = "dictionary_learning TopKTrainer"


def make_trainer(arch_name: str, preset: str, extra: dict, args, steps: int):
    arch = ARCHITECTURES[arch_name]
    cfg = arch.trainer_config(
        preset, steps=steps, activation_dim=args.d, dict_size=args.dict_size, layer=0, lm_name="bench",
        device="cpu", seed=0, **({"k": args.k} if "k" in arch.field_names else {}),
        **fitted_step_defaults(arch, steps), **extra,
    )
    return cfg.pop("trainer")(**cfg)


def time_steps(trainer, data: list[torch.Tensor], start_step: int) -> float:
    begin = time.perf_counter()
    for i, x in enumerate(data):
        trainer.update(start_step + i, x)
    return time.perf_counter() - begin


def bench(args) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        steps = max(2, args.tokens_per_round // batch)
        data = [torch.randn(batch, args.d) for _ in range(steps)]
        total_steps = 1 + steps * (args.rounds + 1) + 1
        trainers = {label: make_trainer(a, p, e, args, total_steps) for label, a, p, e in TRAINERS}
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
            rows.append({"batch": batch, "trainer": label, "tokens_per_s": tps, "ratio_to_topk": tps / ref})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dict-size", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[192, 4096])
    p.add_argument("--tokens-per-round", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={args.d}, dict={args.dict_size}, k={args.k}")
    rows = bench(args)
    print(f"{'batch':>6}  {'trainer':<36} {'tokens/s':>10}  {'vs TopKTrainer':>14}")
    for r in rows:
        print(f"{r['batch']:>6}  {r['trainer']:<36} {r['tokens_per_s']:>10.0f}  {r['ratio_to_topk']:>14.2f}")


if __name__ == "__main__":
    main()
