"""The metrics a run reports per trainer: dictionary_learning's ``evaluate`` (FVE, L0, loss recovered) with
a signed-correct alive count, every trainer on the same held-back batches of the run's buffer (drawn
once after training, then replayed), so trainers are compared on one sample and a trainer's numbers do
not depend on how many others share its run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dictionary_learning.buffer import ActivationBuffer

from dictionary_learning_ext.latent_activity import fired_mask
from dictionary_learning_ext.registry import load_dictionary

from experiments.training.config import RunConfig
from experiments.training.data import BufferStream


class EvalSample(ActivationBuffer):
    """Held-back activation batches and text batches, served in the order ``evaluate`` reads them. An
    ``ActivationBuffer`` (without its machinery) because ``evaluate`` computes loss recovered only for one."""

    def __init__(self, buffer: ActivationBuffer, batches: list[torch.Tensor], texts: list[list[str]],
                 alive_batches: list[torch.Tensor]):
        self.model, self.submodule = buffer.model, buffer.submodule
        self.batches, self.texts, self.alive_batches = batches, texts, alive_batches
        self._next_batch = self._next_text = 0

    @classmethod
    def draw(cls, data: BufferStream, config: RunConfig) -> "EvalSample":
        """Draw, from the data RNG, what ``evaluate`` and the alive count read (in their order)."""
        batches, texts = [], []
        with data.rng() as buffer:
            for _ in range(config.eval_batches):
                batches.append(next(buffer))
                texts.append(buffer.text_batch(batch_size=min(32, config.refresh_batch_size)))
            alive = [next(buffer) for _ in range(config.eval_batches)]
        return cls(data.buffer, batches, texts, alive)

    def rewind(self) -> "EvalSample":
        self._next_batch = self._next_text = 0
        return self

    def __iter__(self) -> "EvalSample":
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batches[self._next_batch]
        self._next_batch += 1
        return batch

    def text_batch(self, batch_size: int | None = None) -> list[str]:
        texts = self.texts[self._next_text]
        self._next_text += 1
        return texts


@torch.no_grad()
def evaluate_trainer(trainer_dir: Path, sample: EvalSample, config: RunConfig) -> dict[str, Any]:
    from dictionary_learning.evaluation import evaluate

    ae, saved = load_dictionary(trainer_dir, device=config.device)
    metrics = evaluate(ae, sample.rewind(), max_len=config.ctx_len, batch_size=min(32, config.refresh_batch_size),
                       device=config.device, n_batches=config.eval_batches)
    # evaluate() calls a latent alive when sum(f) != 0, which signed codes can cancel; count f != 0.
    fired = torch.zeros(ae.dict_size, dtype=torch.bool, device=config.device)
    for x in sample.alive_batches:
        fired |= fired_mask(ae.encode(x.to(config.device)))
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
