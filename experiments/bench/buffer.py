"""The ActivationBuffer's refresh throughput on the embedded default model (what feeds training)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def run(args) -> dict[str, Any]:
    from experiments.lm.models import load_model
    from experiments.training.config import RunConfig
    from experiments.training.data import make_buffer

    lm = load_model("default", layer=0)
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


def report(b: dict[str, Any], print_=print) -> None:
    print_(f"\nActivationBuffer refresh on the default model (layer 0, d_model {b['d_model']}): "
           f"{b['tokens_per_s']:.0f} tokens/s ({b['tokens_per_refresh']} tokens per refresh, median of {b['refreshes']})")
