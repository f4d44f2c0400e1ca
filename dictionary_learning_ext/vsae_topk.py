"""VSAETopK: the variational SAE with TopK gating (dictionary, config, trainer and its variants).

The paper leaves four choices open; each is a named config option:

* ``mean_activation`` -- what the mean passes through: "relu" or "identity".
* ``select_on``       -- top-k chosen on the sampled ``z`` ("sample") or on ``mu`` ("mean"; noise
  is then added to the k selected latents only, so training and evaluation pick the same latents).
* ``select_by``       -- rank by "value" or by "magnitude" (|.|, keeping the sign: signed codes).
* ``kl_scope``        -- KL over "all" latents or only the "selected" ones.

``encode`` (evaluation) is deterministic: top-k of ``mu`` by the same rule, codes = mu there.

Remedies against latents the KL kills, each off in the ``paper`` variant: ``auxk_alpha`` (auxK on
dead latents, residual detached), ``kl_scope="selected"``, ``learned_var``/``log_var_init``,
``select_on="mean"``, ``free_bits``, ``kl_normalize``, ``resample_steps``. ``kernel`` picks the
k-sparse training step (``vsae_topk_sparse``) or the dense one here (the reference); both compute the
same loss from the same selection (``VSAETopKTrainer.select_latents``).

The ``authors`` variant re-implements the authors' published VSAETopK as their paper runs configured it
(see ``authors_variant``): a few options express it -- ``center_input``, ``unit_norm_decoder``,
``decoder_init``/``init_norm``, ``b_dec_init`` (shared by every ExtTrainer), ``kl_form`` and
``weights_dtype``; each defaults to the behaviour above.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch

from .auxk import auxk_loss
from .config import check_float, check_int, check_k
from .errors import ConfigError
from .gaussian import kl_to_standard_normal, sample_noise
from .registry import Variant, register_trainer
from .sparse_topk import TopKCodes
from .trainer_base import ExtTrainer
from .variational import DecoderInit, MeanActivation, VariationalConfig, VariationalDictionary, WeightsDtype

SelectOn = Literal["sample", "mean"]
SelectBy = Literal["value", "magnitude"]
KLScope = Literal["all", "selected"]
Kernel = Literal["auto", "sparse", "dense"]
KLForm = Literal["gaussian", "clamped_l2"]
KL_CLAMP = 10.0  # clamped_l2: |mu| clamped here (the authors' _compute_kl_loss, fixed-variance branch)
# "auto": below this many tokens per batch the dense step would be faster; with the gathered-row kernels the
# k-sparse step is faster from batch 192 on (1.1-1.9x the dense one, experiments.bench_train), so 0.
AUTO_SPARSE_MIN_BATCH = 0


class VSAETopK(VariationalDictionary):
    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        k: int,
        mean_activation: MeanActivation = "relu",
        select_by: SelectBy = "value",
        **variational: Any,
    ):
        super().__init__(activation_dim, dict_size, mean_activation=mean_activation, **variational)
        if not isinstance(k, int) or not 0 < k <= dict_size:
            raise ValueError(f"k={k} must be an int in [1, dict_size={dict_size}]")
        if select_by not in typing.get_args(SelectBy):
            raise ValueError(f"select_by={select_by!r} must be one of {list(typing.get_args(SelectBy))}")
        self.select_by = select_by
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))

    def top_k_indices(self, scores_BF: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the k latents that win under ``select_by``."""
        key_BF = scores_BF.abs() if self.select_by == "magnitude" else scores_BF
        return key_BF.topk(int(self.k), dim=-1, sorted=False).indices

    def encode(self, x: torch.Tensor, return_topk: bool = False):
        mu_BF = self.mean(x)
        idx_BK = self.top_k_indices(mu_BF)
        vals_BK = mu_BF.gather(-1, idx_BK)
        f_BF = torch.zeros_like(mu_BF).scatter_(-1, idx_BK, vals_BK)
        return (f_BF, vals_BK, idx_BK, mu_BF) if return_topk else f_BF


@dataclass
class VSAETopKConfig(VariationalConfig):
    k: int = 64
    """Latents kept per token."""
    mean_activation: MeanActivation = "relu"
    """What the posterior mean passes through."""
    select_on: SelectOn = "mean"
    """Top-k on the sampled z ("sample") or on mu with noise on the k selected only ("mean")."""
    select_by: SelectBy = "value"
    """Rank by "value" or by "magnitude" (|.|, keeping the sign: signed codes)."""
    kl_scope: KLScope = "selected"
    """KL over "all" latents or only the k "selected" ones."""
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
    auxk_k: Optional[int] = None
    """Dead latents used by auxK; None means activation_dim // 2 (Gao et al. 2024, B.1)."""
    free_bits: float = 0.0
    """Per-latent KL floor in nats (Kingma et al. 2016): each latent's KL averaged over the batch
    (0 on tokens where it is not selected, under kl_scope="selected") counts as
    max(kl_j, free_bits), so latents under the floor get no KL gradient. 0: off."""
    kl_normalize: bool = True
    """Divide the KL (summed over latents per token) by the number of latents it sums over --
    dict_size for kl_scope="all", k for "selected" -- so beta means the same at every size."""
    resample_steps: int = 0
    """Every this many steps, re-initialise the dead latents (silent for dead_window_tokens) toward
    inputs of the current batch drawn with probability proportional to the square of their squared
    reconstruction error (the fourth power of the residual norm; after Anthropic, "Towards
    Monosemanticity", 2023): decoder atom = the unit input direction, encoder row = that direction
    scaled to 0.2 x the mean alive encoder row norm, encoder bias 0, Adam moments of those rows reset.
    0: off."""
    kernel: Kernel = "auto"
    """Training step: "auto" (dense below AUTO_SPARSE_MIN_BATCH tokens per batch, else sparse, and dense
    for any setting the sparse step does not implement), "sparse" (decoder and all gradients touch only
    the k selected latents per token; with kl_scope="all" the KL's gradient on mu is dense, so the encoder
    backward is dense there; it does not implement weights_dtype="bfloat16") or "dense" (scatter into
    (B, F) codes, dense decoder; the reference)."""
    sampling: bool = True
    """False: z = mu (no noise), the deterministic twin used to measure the cost of sampling."""
    center_input: bool = True
    """The encoder reads x - b_dec; False: x itself (b_dec is then only the decoder's output bias, as the
    decoder bias of the authors' code in its "april update" mode)."""
    unit_norm_decoder: bool = True
    """Keep the decoder atoms at unit norm (project their gradient, renormalise after each step). False: a
    free decoder, as the authors' code trained it; the dictionary then declares it, and the SAEBench wrapper
    evaluates it as trained (no norm folding, which would change which latents win the top-k)."""
    decoder_init: DecoderInit = "kaiming_uniform"
    """Directions of the initial decoder atoms: "kaiming_uniform" (nn.Linear's init, normalised, as
    dictionary_learning) or "gaussian" (randn, normalised: uniform on the sphere, as the authors' code).
    The encoder starts as the decoder's transpose either way."""
    init_norm: float = 1.0
    """Norm of the initial decoder atoms and of the tied encoder rows (the authors' code: 0.1). Under
    unit_norm_decoder the atoms are back at norm 1 after the first step; only the encoder keeps this scale."""
    kl_form: KLForm = "gaussian"
    """The KL term per latent: "gaussian" (KL[N(mu, sigma^2) || N(0, 1)]) or "clamped_l2"
    (1/2 clamp(mu, -10, 10)^2: the authors' fixed-variance "KL", which they take on the latent z, equal to
    mu in the configuration their paper ran since nothing is sampled there; it has no variance term, so it
    does not go with learned_var)."""
    weights_dtype: WeightsDtype = "float32"
    """Dtype the dictionary's parameters are stored and optimised in (Adam on them directly; "bfloat16" as
    the authors' runs; inputs are cast to it). Losses are still reduced in float32. The sparse kernel
    implements float32 only."""
    wandb_name: str = "VSAETopK"
    """Run name on Weights & Biases."""

    def validate(self) -> None:
        super().validate()
        check_k(self)
        check_float(self, "auxk_alpha", minimum=0.0)
        check_float(self, "free_bits", minimum=0.0)
        check_int(self, "resample_steps", minimum=0)
        if self.auxk_k is not None:
            check_int(self, "auxk_k", minimum=1)
        check_float(self, "init_norm", minimum=0.0, strict=True)
        if self.kl_form == "clamped_l2" and self.learned_var:
            raise ConfigError(
                f"{type(self).__name__}: kl_form='clamped_l2' has no variance term, so a learned variance "
                "(learned_var=True) would get no KL gradient; use kl_form='gaussian' or learned_var=False"
            )
        if self.kernel == "sparse":
            missing = sparse_unsupported(self)
            if missing:
                raise ConfigError(
                    f"{type(self).__name__}: kernel='sparse' does not implement {', '.join(missing)}; use "
                    "kernel='dense' (or 'auto', which picks the dense step for it)"
                )


def sparse_unsupported(cfg: VSAETopKConfig) -> list[str]:
    """The settings of ``cfg`` the k-sparse step does not implement (empty: it does them all)."""
    # Its CSR kernels run in float32 and would hand float32 gradients to bfloat16 parameters.
    return [] if cfg.weights_dtype == "float32" else [f"weights_dtype={cfg.weights_dtype!r}"]


# What the paper describes, with the noise really sampled (the authors' code never sampled it).
PAPER_VARIANT: dict[str, Any] = dict(
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


def authors_variant(given: Mapping[str, Any]) -> dict[str, Any]:
    """The authors' published VSAETopK (github ZachData/SPAR-Variational-Sparse-Autoencoders), as the
    configuration their paper ran. Each value names its source: V = dictionary_learning/trainers/
    vsae_topk.py, T = train_vsae_topk.py. Where their repository's current defaults differ from what
    the paper ran (kl_coeff 500, auxk_alpha 1/32, batch 1024, lr 5e-4) the paper's run wins.

    The LR schedule depends on the run's ``steps`` (given explicitly); without it only the rest is set.
    Batch size (192) and activation normalisation (on) are run-level options, not the trainer's."""
    values: dict[str, Any] = dict(
        # V VSAETopKConfig var_flag=0: fixed variance; encode() then sets z = mu, reparameterize() returns
        # mu: no noise is ever drawn.
        sampling=False, learned_var=False, sigma=1.0,
        # V encode(): mu = relu(encoder(x)), top-k of |z| keeping its sign (with relu codes: by value).
        mean_activation="relu", select_by="magnitude", select_on="sample",
        # V _preprocess_input(), use_april_update_mode=True: the input is not shifted by any bias.
        center_input=False,
        # V _init_layers()/_init_weights(), april mode: a decoder bias of its own, initialised at 0 (and
        # update() skips the geometric median in april mode) -- our b_dec plays its role.
        b_dec_init="zero",
        # V _init_weights(): w = randn(D, F), each atom normalised then x 0.1; encoder.weight = w.T.
        decoder_init="gaussian", init_norm=0.1,
        # V update(), april mode: neither decoder renormalisation nor gradient projection.
        unit_norm_decoder=False,
        # V VSAETopKConfig dtype=torch.bfloat16: parameters (and so Adam's updates) in bf16.
        weights_dtype="bfloat16",
        # V _compute_kl_loss(), fixed variance: 0.5 * sum over all latents of clamp(z, -10, 10)^2, batch
        # mean, clamped >= 0 (a no-op for a sum of squares).
        kl_form="clamped_l2", kl_scope="all", kl_normalize=False, free_bits=0.0,
        # Paper run: kl_coeff (beta) 1; V VSAETopKTrainingConfig: kl_warmup_steps = int(0.1 * steps), linear.
        beta=1.0, kl_warmup_frac=0.1,
        # Paper run: lr 8e-4, auxK off; V: gradient_clip_norm 1.0, Adam betas (0.9, 0.999).
        lr=8e-4, auxk_alpha=0.0, grad_clip_norm=1.0,
        # No resampling; the dead window only selects auxK's/resampling's latents (both off): dictionary_learning's.
        resample_steps=0, dead_window_tokens=10_000_000,
    )
    steps = given.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        # V VSAETopKTrainingConfig.__post_init__ (T's ExperimentConfig the same): warm-up
        # max(200, int(2% of steps)); linear decay to 0 from int(80% of steps), None if that is not after
        # the warm-up (their sparsity warm-up, 5% of steps, only validates the schedule and is always earlier).
        warmup = max(200, int(0.02 * steps))
        decay = int(0.8 * steps)
        values.update(warmup_steps=warmup, decay_start=decay if decay > warmup else None)
    return values


# Config fields where the authors' variant departs on purpose from a study's training protocol.
AUTHORS_KEEPS = ("lr", "warmup_steps", "decay_start", "auxk_alpha", "weights_dtype", "unit_norm_decoder")


# One remedy each, to stack on the paper's setting ("paper+auxk", ...) for the ablation study.
REMEDY_VARIANTS: dict[str, dict[str, Any] | Variant] = {
    "no_sampling": {"sampling": False},  # z = mu, as the authors' code ran: for comparison, not a remedy
    # A stronger auxK than a study's protocol gives every SAE: the remedy is the departure, so it says so.
    "auxk": Variant({"auxk_alpha": 1 / 2, "dead_window_tokens": 20_000}, keeps=("auxk_alpha",)),
    "kl_selected": {"kl_scope": "selected"},
    "free_bits": {"free_bits": 0.5},
    "learned_var": {"learned_var": True},
    "select_mean": {"select_on": "mean"},
    "kl_per_dim": {"kl_normalize": True},
    "resample": {"resample_steps": 250, "dead_window_tokens": 20_000},
}

# Weaker KL: with activations normalised to unit mean squared norm (a study's protocol) the reconstruction
# error is ~1/D of what it is on raw residual streams, so beta = 1 weighs the KL far more there.
KL_WEIGHT_VARIANTS: dict[str, dict[str, Any]] = {"beta_0.1": {"beta": 0.1}, "beta_0.01": {"beta": 0.01}}


class VSAETopKTrainer(ExtTrainer):
    config_class = VSAETopKConfig
    dict_class = VSAETopK

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta_at = self.cfg.beta_schedule()
        self.beta = self.beta_at(0)
        self.k_aux = self.cfg.auxk_k if self.cfg.auxk_k is not None else self.cfg.activation_dim // 2
        self.logging_parameters += ["beta"]

    @staticmethod
    def dictionary_kwargs(cfg: VSAETopKConfig) -> dict[str, Any]:
        return dict(
            k=cfg.k, mean_activation=cfg.mean_activation, select_by=cfg.select_by, **cfg.variational_kwargs(),
            center_input=cfg.center_input, unit_norm_decoder=cfg.unit_norm_decoder, decoder_init=cfg.decoder_init,
            init_norm=cfg.init_norm, weights_dtype=cfg.weights_dtype,
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

    # --- the training-time selection, written once for both kernels ------------------------
    @torch.no_grad()
    def select_latents(
        self, mu_BF: torch.Tensor, log_var: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The k latents per token and the standard-normal noise on them: (idx (B, k), eps (B, k) or None
        when sampling is off). ``log_var`` (B, F), or 0-dim for a fixed variance, is read only when
        selecting on the sample; the sampled values are then mu + exp(log_var / 2) * eps at idx."""
        if not self.cfg.sampling:
            return self.ae.top_k_indices(mu_BF), None
        if self.cfg.select_on == "sample":
            eps_BF = sample_noise(mu_BF, self.generator)
            idx_BK = self.ae.top_k_indices(mu_BF + torch.exp(0.5 * log_var) * eps_BF)
            return idx_BK, eps_BF.gather(-1, idx_BK)
        idx_BK = self.ae.top_k_indices(mu_BF)
        return idx_BK, sample_noise(mu_BF.gather(-1, idx_BK), self.generator)

    @staticmethod
    def sampled_values(mu_BK: torch.Tensor, log_var: torch.Tensor, eps_BK: Optional[torch.Tensor]) -> torch.Tensor:
        """z at the selected latents: mu + sigma * eps (mu itself when sampling is off)."""
        return mu_BK if eps_BK is None else mu_BK + torch.exp(0.5 * log_var) * eps_BK

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        out = super().loss(x, step=step, logging=logging)
        if logging and isinstance(out.f, TopKCodes):
            out = out._replace(f=out.f.to_dense())  # dictionary_learning's logging counts L0 on (B, F)
        return out

    def uses_sparse_step(self, batch_size: int) -> bool:
        """Whether a batch of this many tokens trains with the k-sparse step (see ``kernel``)."""
        if self.cfg.kernel != "auto":
            return self.cfg.kernel == "sparse"
        return batch_size >= AUTO_SPARSE_MIN_BATCH and not sparse_unsupported(self.cfg)

    def compute_loss(self, x: torch.Tensor, step: int):
        self.beta = self.beta_at(step)
        return self.sparse_step(x) if self.uses_sparse_step(x.shape[0]) else self.dense_step(x)

    # --- the loss from the selected terms, shared by both kernels ------------------------------
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

    def kl_elementwise(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """The KL term of each latent (float32) under ``kl_form``; ``log_var`` may be 0-dim (fixed)."""
        if self.cfg.kl_form == "clamped_l2":
            return 0.5 * mu.float().clamp(-KL_CLAMP, KL_CLAMP).square()
        return kl_to_standard_normal(mu, log_var)

    def finish_loss(self, x, x_hat_BD, kl_terms, idx_BK, aux_fn):
        """Reconstruction + beta KL (+ alpha auxK) in float32. ``idx_BK``: the selected latents when the
        KL is on them only (None: on all)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            residual_BD = x.float() - x_hat_BD.float()
            recon = residual_BD.square().sum(dim=-1).mean()
            kl = self.kl_loss(self.kl_elementwise(*kl_terms), idx_BK)
            loss = recon + self.beta * kl
            aux = torch.zeros((), device=x.device)
            if self.cfg.auxk_alpha > 0:
                aux = aux_fn(residual_BD)
                loss = loss + self.cfg.auxk_alpha * aux
        return loss, {"l2_loss": recon, "kl_loss": kl, "auxk_loss": aux}

    def dense_step(self, x: torch.Tensor):
        """The reference step: codes scattered into (B, F), dense decoder, autograd everywhere."""
        mu_BF, log_var_BF = self.ae.posterior(x)
        idx_BK, eps_BK = self.select_latents(mu_BF, log_var_BF)
        mu_BK, lv_BK = mu_BF.gather(-1, idx_BK), log_var_BF.gather(-1, idx_BK)
        f_BF = torch.zeros_like(mu_BF).scatter(-1, idx_BK, self.sampled_values(mu_BK, lv_BK, eps_BK))
        x_hat_BD = self.ae.decode(f_BF)
        kl_on_all = self.cfg.kl_scope == "all"

        def aux_fn(residual_BD):
            return auxk_loss(residual_BD, mu_BF, self.activity.dead_mask(), self.ae.decoder.weight, self.k_aux)

        loss, terms = self.finish_loss(x, x_hat_BD, (mu_BF, log_var_BF) if kl_on_all else (mu_BK, lv_BK),
                                       None if kl_on_all else idx_BK, aux_fn)
        return loss, x_hat_BD, f_BF, terms

    def sparse_step(self, x: torch.Tensor):
        from .vsae_topk_sparse import sparse_step

        return sparse_step(self, x)


register_trainer("vsae_topk", VSAETopKTrainer, variants={
    "paper": PAPER_VARIANT,
    **REMEDY_VARIANTS,
    **KL_WEIGHT_VARIANTS,
    "authors": Variant(authors_variant, keeps=AUTHORS_KEEPS),
})
