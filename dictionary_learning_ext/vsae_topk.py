"""VSAETopK: the variational SAE with TopK gating (dictionary + trainer).

The paper leaves four choices open; each is a named config option:

* ``mean_activation`` -- what the mean passes through: "relu" or "identity".
* ``select_on``       -- top-k chosen on the sampled ``z`` ("sample") or on ``mu`` ("mean"; noise
  is then added to the k selected latents only, so training and evaluation pick the same latents).
* ``select_by``       -- rank by "value" or by "magnitude" (|.|, keeping the sign: signed codes).
* ``kl_scope``        -- KL over "all" latents or only the "selected" ones.

``encode`` (evaluation) is deterministic: top-k of ``mu`` by the same rule, codes = mu there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .auxk import auxk_loss
from .config import check_choice, check_float, check_int, check_k
from .gaussian import kl_to_standard_normal, sample_noise
from .trainer_base import ExtTrainer
from .variational import MEAN_ACTIVATIONS, VariationalConfig, VariationalDictionary

SELECT_ON = ("sample", "mean")
SELECT_BY = ("value", "magnitude")
KL_SCOPES = ("all", "selected")


class VSAETopK(VariationalDictionary):
    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        k: int,
        mean_activation: str = "relu",
        select_by: str = "value",
        **variational: Any,
    ):
        super().__init__(activation_dim, dict_size, mean_activation=mean_activation, **variational)
        if not isinstance(k, int) or not 0 < k <= dict_size:
            raise ValueError(f"k={k} must be an int in [1, dict_size={dict_size}]")
        if select_by not in SELECT_BY:
            raise ValueError(f"select_by={select_by!r} must be one of {list(SELECT_BY)}")
        self.select_by = select_by
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))

    def select(self, scores_BF: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the k latents that win under ``select_by``."""
        key_BF = scores_BF.abs() if self.select_by == "magnitude" else scores_BF
        return key_BF.topk(int(self.k), dim=-1, sorted=False).indices

    def encode(self, x: torch.Tensor, return_topk: bool = False):
        mu_BF = self.mean(x)
        idx_BK = self.select(mu_BF)
        vals_BK = mu_BF.gather(-1, idx_BK)
        f_BF = torch.zeros_like(mu_BF).scatter_(-1, idx_BK, vals_BK)
        return (f_BF, vals_BK, idx_BK, mu_BF) if return_topk else f_BF


@dataclass
class VSAETopKConfig(VariationalConfig):
    k: int = 64
    """Latents kept per token."""
    mean_activation: str = "relu"
    select_on: str = "mean"
    select_by: str = "value"
    kl_scope: str = "selected"
    auxk_alpha: float = 1 / 32
    """Weight of the auxK loss on dead latents (0 turns it off)."""
    auxk_k: int = -1
    """Dead latents used by auxK; -1 means activation_dim // 2 (Gao et al. 2024, B.1)."""
    wandb_name: str = "VSAETopK"

    def validate(self) -> None:
        super().validate()
        check_k(self)
        check_choice(self, "mean_activation", tuple(MEAN_ACTIVATIONS))
        check_choice(self, "select_on", SELECT_ON)
        check_choice(self, "select_by", SELECT_BY)
        check_choice(self, "kl_scope", KL_SCOPES)
        check_float(self, "auxk_alpha", minimum=0.0)
        if self.auxk_k != -1:
            check_int(self, "auxk_k", minimum=1)


# What the authors ran, with the noise really sampled (their code never sampled it).
PAPER_PRESET: dict[str, Any] = dict(
    mean_activation="relu",
    select_on="sample",
    select_by="magnitude",
    kl_scope="all",
    beta=1.0,
    kl_warmup_frac=0.1,
    sigma=1.0,
    learned_var=False,
    auxk_alpha=0.0,
    lr=8e-4,
)


class VSAETopKTrainer(ExtTrainer):
    config_class = VSAETopKConfig
    dict_class = VSAETopK

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta_at = self.cfg.beta_schedule()
        self.beta = self.beta_at(0)
        self.k_aux = self.cfg.auxk_k if self.cfg.auxk_k != -1 else self.cfg.activation_dim // 2
        self.logging_parameters += ["beta"]

    @staticmethod
    def dictionary_kwargs(cfg: VSAETopKConfig) -> dict[str, Any]:
        return dict(
            k=cfg.k, mean_activation=cfg.mean_activation, select_by=cfg.select_by, **cfg.variational_kwargs()
        )

    def sample_topk(self, mu_BF: torch.Tensor, log_var_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time selection: (indices (B, k), sampled values (B, k))."""
        if self.cfg.select_on == "sample":
            z_BF = mu_BF + torch.exp(0.5 * log_var_BF) * sample_noise(mu_BF, self.generator)
            idx_BK = self.ae.select(z_BF)
            return idx_BK, z_BF.gather(-1, idx_BK)
        idx_BK = self.ae.select(mu_BF)
        mu_BK = mu_BF.gather(-1, idx_BK)
        std_BK = torch.exp(0.5 * log_var_BF.gather(-1, idx_BK))
        return idx_BK, mu_BK + std_BK * sample_noise(mu_BK, self.generator)

    def compute_loss(self, x: torch.Tensor, step: int):
        mu_BF, log_var_BF = self.ae.posterior(x)
        idx_BK, vals_BK = self.sample_topk(mu_BF, log_var_BF)
        f_BF = torch.zeros_like(mu_BF).scatter(-1, idx_BK, vals_BK)
        x_hat_BD = self.ae.decode(f_BF)
        with torch.autocast(device_type=x.device.type, enabled=False):
            residual_BD = x.float() - x_hat_BD.float()
            recon = residual_BD.square().sum(dim=-1).mean()
            if self.cfg.kl_scope == "all":
                kl = kl_to_standard_normal(mu_BF, log_var_BF).sum(dim=-1).mean()
            else:
                kl = kl_to_standard_normal(mu_BF.gather(-1, idx_BK), log_var_BF.gather(-1, idx_BK)).sum(-1).mean()
            self.beta = self.beta_at(step)
            loss = recon + self.beta * kl
            aux = torch.zeros((), device=x.device)
            if self.cfg.auxk_alpha > 0:
                aux = auxk_loss(residual_BD, mu_BF, self.activity.dead_mask(), self.ae.decoder.weight, self.k_aux)
                loss = loss + self.cfg.auxk_alpha * aux
        return loss, x_hat_BD, f_BF, {"l2_loss": recon, "kl_loss": kl, "auxk_loss": aux}
