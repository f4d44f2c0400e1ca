"""VSAETopK: the variational SAE with TopK gating (dictionary + trainer).

The paper leaves four choices open; each is a named config option:

* ``mean_activation`` -- what the mean passes through: "relu" or "identity".
* ``select_on``       -- top-k chosen on the sampled ``z`` ("sample") or on ``mu`` ("mean"; noise
  is then added to the k selected latents only, so training and evaluation pick the same latents).
* ``select_by``       -- rank by "value" or by "magnitude" (|.|, keeping the sign: signed codes).
* ``kl_scope``        -- KL over "all" latents or only the "selected" ones.

``encode`` (evaluation) is deterministic: top-k of ``mu`` by the same rule, codes = mu there.

Remedies against latents the KL kills (issue 7), each off in ``PAPER_PRESET``: ``auxk_alpha``
(auxK on dead latents, residual detached), ``kl_scope="selected"``, ``learned_var``/``log_var_init``,
``select_on="mean"``, ``free_bits``, ``kl_normalize``, ``resample_steps``. ``kernel`` picks the
k-sparse training step (default) or the dense reference; both compute the same loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .auxk import auxk_loss, auxk_select, normalized_aux_mse
from .config import ConfigError, check_choice, check_float, check_int, check_k
from .gaussian import kl_to_standard_normal, sample_noise
from .sparse_topk import TopKCodes, TopKPattern, centered_linear, selected_linear, sparse_decode
from .trainer_base import ExtTrainer
from .variational import MEAN_ACTIVATIONS, VariationalConfig, VariationalDictionary

SELECT_ON = ("sample", "mean")
SELECT_BY = ("value", "magnitude")
KL_SCOPES = ("all", "selected")
KERNELS = ("auto", "sparse", "dense")
# "auto": below this batch the dense step is faster on CPU, from it on the k-sparse one
# (experiments/bench_train.py: dense 2.0-2.2x TopKTrainer at batch 192, sparse 1.1-2.6x dense at 4096).
AUTO_SPARSE_MIN_BATCH = 1024


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
    learned_var: bool = True
    """Recommended: the posterior variance is learned (the KL keeps it from collapsing)."""
    log_var_init: float = -4.6
    """Learned log sigma^2 starts at std 0.1: small beside the codes, so early noise does not swamp them."""
    auxk_alpha: float = 1 / 2
    """Weight of the auxK loss on dead latents (0 turns it off). It only trains latents silent for
    ``dead_window_tokens``; 1/2 revived more latents than Gao et al.'s 1/32 at no FVE cost (ablation)."""
    dead_window_tokens: int = 20_000
    """A latent silent this many tokens is dead for auxK/resampling (dictionary_learning: 10M, which a
    run shorter than 10M tokens never reaches, so its auxK never acts)."""
    auxk_k: int = -1
    """Dead latents used by auxK; -1 means activation_dim // 2 (Gao et al. 2024, B.1)."""
    free_bits: float = 0.0
    """Per-latent KL floor in nats (Kingma et al. 2016): each latent's KL averaged over the batch
    (0 on tokens where it is not selected, under kl_scope="selected") counts as
    max(kl_j, free_bits), so latents under the floor get no KL gradient. 0: off."""
    kl_normalize: bool = True
    """Divide the KL (summed over latents per token) by the number of latents it sums over --
    dict_size for kl_scope="all", k for "selected" -- so beta means the same at every size."""
    resample_steps: int = 0
    """Every this many steps, re-initialise the dead latents (silent for dead_window_tokens) toward
    inputs of the current batch drawn with probability proportional to their squared
    reconstruction error (Anthropic, "Towards Monosemanticity", 2023): decoder atom = the unit
    input direction, encoder row = that direction scaled to 0.2 x the mean alive encoder row norm,
    encoder bias 0, Adam moments of those rows reset. 0: off."""
    kernel: str = "auto"
    """Training step: "auto" (dense below AUTO_SPARSE_MIN_BATCH tokens per batch, else sparse), "sparse" (decoder and all gradients touch only the k selected latents per
    token; with kl_scope="all" the KL's gradient on mu is dense, so the encoder backward is dense
    there) or "dense" (scatter into (B, F) codes, dense decoder; the reference)."""
    sampling: bool = True
    """False: z = mu (no noise), the deterministic twin used to measure the cost of sampling."""
    wandb_name: str = "VSAETopK"

    def validate(self) -> None:
        super().validate()
        check_k(self)
        check_choice(self, "mean_activation", tuple(MEAN_ACTIVATIONS))
        check_choice(self, "select_on", SELECT_ON)
        check_choice(self, "select_by", SELECT_BY)
        check_choice(self, "kl_scope", KL_SCOPES)
        check_choice(self, "kernel", KERNELS)
        if not isinstance(self.sampling, bool):
            raise ConfigError(f"{type(self).__name__}.sampling must be a bool, got {self.sampling!r}")
        check_float(self, "auxk_alpha", minimum=0.0)
        check_float(self, "free_bits", minimum=0.0)
        check_int(self, "resample_steps", minimum=0)
        if not isinstance(self.kl_normalize, bool):
            raise ConfigError(f"{type(self).__name__}.kl_normalize must be a bool, got {self.kl_normalize!r}")
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
    free_bits=0.0,
    kl_normalize=False,
    resample_steps=0,
    dead_window_tokens=10_000_000,
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

    def update(self, step: int, x: torch.Tensor) -> float:
        loss = super().update(step, x)
        every = self.cfg.resample_steps
        if every > 0 and step > 0 and step % every == 0:
            self.resample_dead_latents(x.to(self.device))
        return loss

    @torch.no_grad()
    def resample_dead_latents(self, x_BD: torch.Tensor) -> int:
        """Re-initialise the dead latents toward badly reconstructed inputs; returns how many."""
        dead_F = self.activity.dead_mask()
        num_dead = int(dead_F.sum())
        if num_dead == 0:
            return 0
        ae = self.ae
        x_BD = x_BD.float()
        err_B = (x_BD - ae(x_BD).float()).square().sum(dim=-1)
        weights_B = err_B.square()
        if not torch.isfinite(weights_B).all() or weights_B.sum() <= 0:
            weights_B = torch.ones_like(err_B)
        # Without replacement (distinct directions) unless more latents are dead than inputs; from
        # the trainer's generator, so the same seed resamples the same inputs.
        picks_N = torch.multinomial(weights_B, num_dead, replacement=num_dead > int((weights_B > 0).sum()), generator=self.generator)
        dirs_ND = x_BD[picks_N] - ae.b_dec.float()
        dirs_ND = dirs_ND / dirs_ND.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        enc_W_FD = ae.encoder.weight
        alive_norm = enc_W_FD[~dead_F].norm(dim=-1).mean() if (~dead_F).any() else 1.0
        dead_idx = dead_F.nonzero().squeeze(-1)
        enc_W_FD[dead_idx] = (0.2 * alive_norm * dirs_ND).to(enc_W_FD.dtype)
        ae.encoder.bias[dead_idx] = 0.0
        ae.decoder.weight[:, dead_idx] = dirs_ND.T.to(ae.decoder.weight.dtype)  # unit norm already
        reset = [(enc_W_FD, (dead_idx,)), (ae.encoder.bias, (dead_idx,)), (ae.decoder.weight, (slice(None), dead_idx))]
        if ae.learned_var:  # back to the initial variance exp(log_var_init)
            ae.log_var_head.weight[dead_idx] = 0.0
            ae.log_var_head.bias[dead_idx] = self.cfg.log_var_init
            reset += [(ae.log_var_head.weight, (dead_idx,)), (ae.log_var_head.bias, (dead_idx,))]
        for param, index in reset:
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.activity.tokens_since_fired[dead_idx] = 0  # a fresh start, not dead again at once
        return num_dead

    def sample_topk(self, mu_BF: torch.Tensor, log_var_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time selection: (indices (B, k), sampled values (B, k)) (dense kernel)."""
        if self.cfg.select_on == "sample":
            z_BF = mu_BF
            if self.cfg.sampling:
                z_BF = mu_BF + torch.exp(0.5 * log_var_BF) * sample_noise(mu_BF, self.generator)
            idx_BK = self.ae.select(z_BF)
            return idx_BK, z_BF.gather(-1, idx_BK)
        idx_BK = self.ae.select(mu_BF)
        mu_BK = mu_BF.gather(-1, idx_BK)
        if not self.cfg.sampling:
            return idx_BK, mu_BK
        std_BK = torch.exp(0.5 * log_var_BF.gather(-1, idx_BK))
        return idx_BK, mu_BK + std_BK * sample_noise(mu_BK, self.generator)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        out = super().loss(x, step=step, logging=logging)
        if logging and isinstance(out.f, TopKCodes):
            out = out._replace(f=out.f.to_dense())  # dictionary_learning's logging counts L0 on (B, F)
        return out

    def compute_loss(self, x: torch.Tensor, step: int):
        if self.cfg.kernel == "dense" or (self.cfg.kernel == "auto" and x.shape[0] < AUTO_SPARSE_MIN_BATCH):
            return self._compute_loss_dense(x, step)
        return self._compute_loss_sparse(x, step)

    # --- the loss from the (B, k) terms, shared by both kernels ---------------------------
    def kl_loss(self, kl_BX: torch.Tensor, idx_BK: torch.Tensor | None) -> torch.Tensor:
        """The KL term from elementwise KLs: (B, F) for kl_scope="all", or (B, k) at ``idx_BK``."""
        if self.cfg.free_bits > 0:
            if idx_BK is None:
                kl_F = kl_BX.mean(dim=0)
            else:  # per-latent batch average, 0 where the latent was not selected
                kl_F = torch.zeros(self.cfg.dict_size, dtype=kl_BX.dtype, device=kl_BX.device)
                kl_F = kl_F.index_add(0, idx_BK.reshape(-1), kl_BX.reshape(-1)) / kl_BX.shape[0]
            kl = kl_F.clamp_min(self.cfg.free_bits).sum()
        else:
            kl = kl_BX.sum(dim=-1).mean()
        return kl / kl_BX.shape[-1] if self.cfg.kl_normalize else kl

    def _finish(self, x, x_hat_BD, kl_terms, idx_BK, aux_fn):
        """``idx_BK``: the selected latents when the KL is on them only (None: on all)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            residual_BD = x.float() - x_hat_BD.float()
            recon = residual_BD.square().sum(dim=-1).mean()
            kl = self.kl_loss(kl_to_standard_normal(*kl_terms), idx_BK)
            loss = recon + self.beta * kl
            aux = torch.zeros((), device=x.device)
            if self.cfg.auxk_alpha > 0:
                aux = aux_fn(residual_BD)
                loss = loss + self.cfg.auxk_alpha * aux
        return loss, {"l2_loss": recon, "kl_loss": kl, "auxk_loss": aux}

    def _compute_loss_dense(self, x: torch.Tensor, step: int):
        self.beta = self.beta_at(step)
        mu_BF, log_var_BF = self.ae.posterior(x)
        idx_BK, vals_BK = self.sample_topk(mu_BF, log_var_BF)
        f_BF = torch.zeros_like(mu_BF).scatter(-1, idx_BK, vals_BK)
        x_hat_BD = self.ae.decode(f_BF)
        if self.cfg.kl_scope == "all":
            kl_terms = (mu_BF, log_var_BF)
        else:
            kl_terms = (mu_BF.gather(-1, idx_BK), log_var_BF.gather(-1, idx_BK))

        def aux_fn(residual_BD):
            return auxk_loss(residual_BD, mu_BF, self.activity.dead_mask(), self.ae.decoder.weight, self.k_aux)

        kl_idx_BK = None if self.cfg.kl_scope == "all" else idx_BK
        loss, terms = self._finish(x, x_hat_BD, kl_terms, kl_idx_BK, aux_fn)
        return loss, x_hat_BD, f_BF, terms

    def _compute_loss_sparse(self, x: torch.Tensor, step: int):
        """Same loss as the dense kernel; see ``sparse_topk`` for what is k-sparse."""
        self.beta = self.beta_at(step)
        ae, cfg = self.ae, self.cfg
        act = MEAN_ACTIVATIONS[ae.mean_activation]
        dense_kl = cfg.kl_scope == "all"
        with torch.no_grad():
            xc_BD = x - ae.b_dec
        # Dense encoder forward (needed to rank); with a gradient only when the KL covers every latent.
        if dense_kl:
            pre_BF = centered_linear(xc_BD, ae.encoder, ae.b_dec)
            mu_BF = act(pre_BF)
        else:
            with torch.no_grad():
                pre_BF = ae.encoder(xc_BD)
                # In place: no second (B, F) buffer. Gathering act(pre) instead of pre below is
                # exact, since act(act(p)) == act(p) and relu's backward reads its output.
                mu_BF = pre_BF.relu_() if ae.mean_activation == "relu" else act(pre_BF)

        lv_BF = lv_BK = None  # log sigma^2; a 0-dim tensor when fixed (no (B, F) constant tensor)
        lo, hi = ae.log_var_bounds.tolist()
        if not ae.learned_var:
            # As the dense kernel's full_like(mu, 2 log sigma), as a 0-dim tensor of mu's dtype.
            lv_fixed = torch.full((), 2.0 * math.log(ae.sigma.item()), dtype=mu_BF.dtype, device=x.device)
        elif dense_kl:
            lv_BF = centered_linear(xc_BD, ae.log_var_head, ae.b_dec).clamp(lo, hi)
        elif cfg.select_on == "sample" and cfg.sampling:
            with torch.no_grad():
                lv_BF = ae.log_var_head(xc_BD).clamp(lo, hi)

        # Selection, once.
        eps_BF = None
        with torch.no_grad():
            if cfg.select_on == "sample" and cfg.sampling:
                eps_BF = sample_noise(mu_BF, self.generator)
                std = torch.exp(0.5 * (lv_BF if ae.learned_var else lv_fixed))
                idx_BK = ae.select(mu_BF + std * eps_BF)
            else:
                idx_BK = ae.select(mu_BF)

        # Values at the selected latents, with k-sparse gradients (dense ones if the KL is dense).
        pattern = TopKPattern(idx_BK, cfg.dict_size)  # shared by the decoder's and encoder's backward
        if dense_kl:
            mu_BK = mu_BF.gather(-1, idx_BK)
        else:
            mu_BK = act(selected_linear(xc_BD, ae.encoder, ae.b_dec, pattern, mu_BF.gather(-1, idx_BK)))
        if ae.learned_var:
            if lv_BF is not None and lv_BF.requires_grad:
                lv_BK = lv_BF.gather(-1, idx_BK)
            else:
                pre_lv_BK = None if lv_BF is None else lv_BF.gather(-1, idx_BK)
                lv_BK = selected_linear(xc_BD, ae.log_var_head, ae.b_dec, pattern, pre_lv_BK).clamp(lo, hi)
        if not cfg.sampling:
            vals_BK = mu_BK
        else:
            if eps_BF is not None:
                eps_BK = eps_BF.gather(-1, idx_BK)
            else:  # same draw (shape and dtype) as the dense kernel's
                eps_BK = sample_noise(mu_BF.detach().gather(-1, idx_BK), self.generator)
            std_BK = torch.exp(0.5 * (lv_BK if ae.learned_var else lv_fixed))
            vals_BK = mu_BK + std_BK * eps_BK

        x_hat_BD = sparse_decode(vals_BK, pattern, ae.decoder.weight) + ae.b_dec
        if dense_kl:
            kl_terms = (mu_BF, lv_BF if ae.learned_var else lv_fixed)
        else:
            kl_terms = (mu_BK, lv_BK if ae.learned_var else lv_fixed)

        def aux_fn(residual_BD):
            # The dead mask is needed only here, and the dense masked top-k only if a latent is dead.
            idx_aux_BK = auxk_select(mu_BF.detach(), self.activity.dead_mask(), self.k_aux)
            if idx_aux_BK is None:
                return torch.zeros((), dtype=torch.float32, device=x.device)
            aux_pattern = TopKPattern(idx_aux_BK, cfg.dict_size)
            if dense_kl:
                mu_aux_BK = mu_BF.gather(-1, idx_aux_BK)
            else:
                pre_aux_BK = mu_BF.gather(-1, idx_aux_BK)  # act(act(p)) == act(p), see above
                mu_aux_BK = act(selected_linear(xc_BD, ae.encoder, ae.b_dec, aux_pattern, pre_aux_BK))
            return normalized_aux_mse(residual_BD, sparse_decode(mu_aux_BK, aux_pattern, ae.decoder.weight))

        loss, terms = self._finish(x, x_hat_BD, kl_terms, None if dense_kl else idx_BK, aux_fn)
        return loss, x_hat_BD, TopKCodes(idx_BK, vals_BK, cfg.dict_size), terms
