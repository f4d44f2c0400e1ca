"""This package's architectures in the registry."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .mp_sae import MPSAETrainer
from .registry import Architecture, register
from .trainer_base import ExtTrainer
from .vsae import VSAETrainer
from .vsae_topk import PAPER_PRESET, VSAETopKTrainer

# One remedy each, to stack on the authors' setting ("paper+auxk", ...) for the ablation study.
REMEDY_PRESETS: dict[str, dict[str, Any]] = {
    "no_sampling": {"sampling": False},  # what the authors' code did (z = mu): for comparison, not a remedy
    "auxk": {"auxk_alpha": 1 / 2, "dead_window_tokens": 20_000},
    "kl_selected": {"kl_scope": "selected"},
    "free_bits": {"free_bits": 0.5},
    "learned_var": {"learned_var": True},
    "select_mean": {"select_on": "mean"},
    "kl_per_dim": {"kl_normalize": True},
    "resample": {"resample_steps": 250, "dead_window_tokens": 20_000},
}


def register_ext(
    name: str,
    trainer: type[ExtTrainer],
    description: str,
    presets: Mapping[str, Mapping[str, Any]] = {},
    **arch_fields: Any,
):
    def load(ae_path: str, trainer_cfg: Mapping[str, Any], device: Optional[str]):
        cfg = trainer.config_from_saved(trainer_cfg)
        return trainer.dict_class.from_pretrained(ae_path, device=device, **trainer.dictionary_kwargs(cfg))

    return register(
        Architecture(
            name=name,
            trainer_class=trainer,
            dict_class=trainer.dict_class,
            config_class=trainer.config_class,
            load=load,
            presets=presets,
            description=description,
            **arch_fields,
        )
    )


register_ext("vsae", VSAETrainer, "variational SAE (Gaussian reparameterisation + KL, L1 on codes)")
register_ext(
    "vsae_topk",
    VSAETopKTrainer,
    "variational SAE with TopK gating",
    presets={"paper": PAPER_PRESET, **REMEDY_PRESETS},
)
register_ext(
    "mp_sae",
    MPSAETrainer,
    "matching-pursuit SAE (k unrolled pursuit steps on a unit-norm dictionary; tied encoder)",
    saebench_tied_encoder=True,
)
