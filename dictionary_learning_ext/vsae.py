"""VSAE: the variational SAE of the seed paper (dictionary + trainer).

    mu    = W_enc (x - b_dec) + b_enc
    z     = mu + sigma * eps,  eps ~ N(0, I)          (training only)
    f     = act(z)            (ReLU by default; identity as an option)
    x_hat = W_dec f + b_dec
    L     = ||x - x_hat||^2 + beta(step) * KL[N(mu, sigma^2) || N(0, I)] + lambda * ||f||_1

At evaluation ``encode`` returns act(mu): deterministic, no noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import check_float
from .gaussian import kl_to_standard_normal, reparameterize
from .registry import register_trainer
from .trainer_base import ExtTrainer
from .variational import MEAN_ACTIVATIONS, MeanActivation, VariationalConfig, VariationalDictionary


class VSAE(VariationalDictionary):
    def __init__(self, activation_dim: int, dict_size: int, code_activation: str = "relu", **variational: Any):
        super().__init__(activation_dim, dict_size, mean_activation="identity", **variational)
        if code_activation not in MEAN_ACTIVATIONS:
            raise ValueError(f"code_activation={code_activation!r} must be one of {list(MEAN_ACTIVATIONS)}")
        self.code_activation = code_activation

    def codes(self, z_BF: torch.Tensor) -> torch.Tensor:
        return MEAN_ACTIVATIONS[self.code_activation](z_BF)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(self.mean(x))


@dataclass
class VSAEConfig(VariationalConfig):
    code_activation: MeanActivation = "relu"
    """Applied to the sampled latents to give the codes: "relu" or "identity"."""
    l1_penalty: float = 0.04
    """lambda of the L1 term on the codes (0 turns it off: the paper found the KL alone is not sparse)."""
    wandb_name: str = "VSAE"
    """Run name on Weights & Biases."""

    def validate(self) -> None:
        super().validate()
        check_float(self, "l1_penalty", minimum=0.0)


class VSAETrainer(ExtTrainer):
    config_class = VSAEConfig
    dict_class = VSAE

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta_at = self.cfg.beta_schedule()
        self.logging_parameters += ["beta"]
        self.beta = self.beta_at(0)

    @staticmethod
    def dictionary_kwargs(cfg: VSAEConfig) -> dict[str, Any]:
        return dict(code_activation=cfg.code_activation, **cfg.variational_kwargs())

    def compute_loss(self, x: torch.Tensor, step: int):
        mu_BF, log_var_BF = self.ae.posterior(x)
        z_BF = reparameterize(mu_BF, log_var_BF, self.generator)
        f_BF = self.ae.codes(z_BF)
        x_hat_BD = self.ae.decode(f_BF)
        with torch.autocast(device_type=x.device.type, enabled=False):
            recon = (x.float() - x_hat_BD.float()).square().sum(dim=-1).mean()
            kl = kl_to_standard_normal(mu_BF, log_var_BF).sum(dim=-1).mean()
            l1 = f_BF.float().abs().sum(dim=-1).mean()
            self.beta = self.beta_at(step)
            loss = recon + self.beta * kl + self.cfg.l1_penalty * l1
        return loss, x_hat_BD, f_BF, {"l2_loss": recon, "kl_loss": kl, "l1_loss": l1}


register_trainer("vsae", VSAETrainer)
