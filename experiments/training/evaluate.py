"""The metrics a run reports per trainer: dictionary_learning's ``evaluate`` (FVE, L0, loss recovered)
on held-back buffer batches, with a signed-correct alive count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dictionary_learning_ext.latent_activity import fired_mask
from dictionary_learning_ext.registry import load_dictionary

from experiments.training.config import RunConfig
from experiments.training.data import BufferStream


@torch.no_grad()
def evaluate_trainer(trainer_dir: Path, data: BufferStream, config: RunConfig) -> dict[str, Any]:
    from dictionary_learning.evaluation import evaluate

    ae, saved = load_dictionary(trainer_dir, device=config.device)
    with data.rng() as buffer:  # the buffer's draws stay on the data RNG, as in training
        metrics = evaluate(ae, buffer, max_len=config.ctx_len, batch_size=min(32, config.refresh_batch_size),
                           device=config.device, n_batches=config.eval_batches)
        # evaluate() calls a latent alive when sum(f) != 0, which signed codes can cancel; count f != 0.
        fired = torch.zeros(ae.dict_size, dtype=torch.bool, device=config.device)
        for _ in range(config.eval_batches):
            fired |= fired_mask(ae.encode(next(buffer).to(config.device)))
    metrics["frac_alive"] = fired.float().mean().item()
    trainer = saved["trainer"]
    return {"architecture": trainer["trainer_class"], "k": trainer.get("k"), "dict_size": trainer["dict_size"],
            **{key: float(value) for key, value in metrics.items()}}


def metrics_table(rows: list[dict[str, Any]]) -> str:
    """The run's final metrics as a text table for the terminal."""
    from tabulate import tabulate

    cols = [("trainer", "trainer"), ("architecture", "architecture"), ("k", "k"),
            ("frac_variance_explained", "FVE"), ("l0", "L0"), ("frac_alive", "frac alive"),
            ("frac_recovered", "loss recovered")]
    body = [[r.get(c, "-") for c, _ in cols] for r in rows]
    return tabulate(body, headers=[h for _, h in cols], floatfmt=".3f")
