"""One interface over the trainers the benchmark races: ``step(x)`` is one full training step as the trainer's
own training loop runs it (forward, loss, backward, gradient clipping, Adam, the trainer's bookkeeping).

* ours and dictionary_learning's TopKTrainer: the registry's trainers, ``update(step, x)`` (what ``trainSAE``
  calls); TopKTrainer with the same dead-latent window as ours (``dead_window_tokens``; its own default,
  10M tokens, would keep its auxK off).
* SAELens: its training SAE inside its own ``SAETrainer``, stepped with ``SAETrainer.step`` (what its
  ``fit`` loop calls): ``training_forward_pass`` (TopK: MSE + its TopK auxiliary loss on dead latents;
  MatchingPursuit: MSE), backward, clip at 1.0, Adam, LR scheduler, the dead-neuron counters.

Configured alike: same k, dict size, learning rate (8e-4, VSAETopK's), Adam betas, batch, gradient clip,
auxK weight 1/2 on the latents silent for 20,000 tokens (SAELens counts forward passes: ceil(20,000 / batch)).
No activation normalisation anywhere (SAELens ``normalize_activations="none"``), and SAELens's TopK with
``rescale_acts_by_decoder_norm=False`` and unit-norm initial atoms (``decoder_init_norm=1.0``): ours and
dictionary_learning's keep atoms at unit norm, where that rescaling is the identity (it would only add a
(B, F) multiply to SAELens's step). SAELens's ``use_sparse_activations=True`` fails in backward on CPU
with this torch (``aten::view`` has no SparseCPU kernel), so its dense TopK step is the one measured.
MatchingPursuit as our MP-SAE trains: k fixed steps (``max_iterations=k``, ``residual_threshold=0``,
``stop_on_duplicate_support=False``, the same setting as our SAELens export).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Optional

import torch

LR = 8e-4
AUXK_ALPHA = 0.5
DEAD_WINDOW_TOKENS = 20_000
TOTAL_STEPS = 100_000  # the LR schedules' horizon: far beyond a benchmark, so no decay phase is reached


class Contender:
    """A trainer being timed. ``step`` trains on one batch; ``dead_latents`` counts the latents its auxK
    targets now; ``without_auxk`` is a copy of it (same state) with auxK switched off, or None."""

    label: str
    kind: str = "ours"  # "ours" or a peer's name

    def step(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def dead_latents(self) -> int:
        return 0

    def without_auxk(self) -> Optional["Contender"]:
        return None


class RegistryContender(Contender):
    """A trainer from this project's registry (ours, or dictionary_learning's TopKTrainer)."""

    def __init__(self, label: str, trainer: Any, kind: str):
        self.label, self.trainer, self.kind = label, trainer, kind
        self.steps_done = 0

    def step(self, x: torch.Tensor) -> None:
        self.trainer.update(self.steps_done, x)
        self.steps_done += 1

    def dead_latents(self) -> int:
        t = self.trainer
        if hasattr(t, "activity"):
            return int(t.activity.dead_mask().sum())
        if hasattr(t, "num_tokens_since_fired"):  # dictionary_learning's TopKTrainer
            return int((t.num_tokens_since_fired >= t.dead_feature_threshold).sum())
        return 0

    def without_auxk(self) -> Optional["Contender"]:
        twin = copy.deepcopy(self)
        t = twin.trainer
        if hasattr(t, "cfg") and hasattr(t.cfg, "auxk_alpha"):
            t.cfg.auxk_alpha = 0.0
        elif hasattr(t, "auxk_alpha"):
            t.auxk_alpha = 0.0
        else:
            return None
        twin.label = self.label + " [auxK off]"
        return twin


def registry_trainer(arch: str, variant: str, d: int, dict_size: int, k: int, **extra: Any):
    from dictionary_learning_ext import ARCHITECTURES
    from experiments.training.plan import fitted_step_defaults

    a = ARCHITECTURES[arch]
    values = dict(steps=TOTAL_STEPS, activation_dim=d, dict_size=dict_size, layer=0, lm_name="bench", device="cpu",
                  seed=0, k=k, lr=LR, **fitted_step_defaults(a, TOTAL_STEPS))
    if "auxk_alpha" in a.field_names:
        values.update(auxk_alpha=AUXK_ALPHA, dead_window_tokens=DEAD_WINDOW_TOKENS)
    if "warmup_steps" in a.field_names:
        values["warmup_steps"] = 0
    values.update(extra)
    cfg = a.trainer_config(variant, **values)
    return cfg.pop("trainer")(**cfg)


def vsae_topk(label: str, d: int, dict_size: int, k: int, variant: str = "default", **extra: Any) -> Contender:
    return RegistryContender(label, registry_trainer("vsae_topk", variant, d, dict_size, k, **extra), "ours")


def dl_topk(d: int, dict_size: int, k: int) -> Contender:
    return RegistryContender("TopKTrainer (dictionary_learning)", registry_trainer("top_k", "default", d, dict_size, k),
                             "dictionary_learning")


def mp_sae(label: str, d: int, dict_size: int, k: int, **extra: Any) -> Contender:
    return RegistryContender(label, registry_trainer("mp_sae", "default", d, dict_size, k, **extra), "ours")


# --- SAELens ---------------------------------------------------------------------------------------
def saelens_available() -> Optional[str]:
    """None if SAELens imports, else why not."""
    try:
        import sae_lens  # noqa: F401
        from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401
    except Exception as err:  # not a dependency of the project: the benchmark says so and goes on
        return f"{type(err).__name__}: {err}"
    return None


def saelens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


class SAELensContender(Contender):
    kind = "SAELens"

    def __init__(self, label: str, sae: Any, batch_size: int):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = SAETrainerConfig(
            total_training_samples=TOTAL_STEPS * batch_size, train_batch_size_samples=batch_size, lr=LR, lr_end=LR,
            adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False,
            dead_feature_window=math.ceil(DEAD_WINDOW_TOKENS / batch_size),
        )
        self.label = label
        self.batch_size = batch_size
        self.trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def step(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"{self.label} was configured for batches of {self.batch_size}, got {x.shape[0]}")
        t = self.trainer
        t.step(x)  # what SAETrainer.fit runs per batch, minus logging and checkpoints
        t.n_training_steps += 1

    def dead_latents(self) -> int:
        return int(self.trainer.dead_neurons.sum())

    def without_auxk(self) -> Optional["Contender"]:
        if not hasattr(self.trainer.sae, "calculate_topk_aux_loss"):
            return None
        twin = copy.deepcopy(self)
        twin.trainer.cfg.dead_feature_window = 2**62  # no latent is ever dead: its aux loss returns 0 at once
        twin.label = self.label + " [auxK off]"
        return twin


def saelens_topk(d: int, dict_size: int, k: int, batch_size: int) -> Contender:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=dict_size, k=k, dtype="float32", device="cpu",
                                normalize_activations="none", aux_loss_coefficient=AUXK_ALPHA,
                                rescale_acts_by_decoder_norm=False, decoder_init_norm=1.0)
    return SAELensContender("SAELens TopK", TopKTrainingSAE(cfg), batch_size)


def saelens_mp(d: int, dict_size: int, k: int, batch_size: int) -> Contender:
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = MatchingPursuitTrainingSAEConfig(d_in=d, d_sae=dict_size, dtype="float32", device="cpu",
                                               normalize_activations="none", residual_threshold=0.0,
                                               max_iterations=k, stop_on_duplicate_support=False)
    return SAELensContender("SAELens MatchingPursuit", MatchingPursuitTrainingSAE(cfg), batch_size)


Factory = Callable[[], Contender]
