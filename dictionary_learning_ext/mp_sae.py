"""MP-SAE: a sparse autoencoder whose encoder unrolls matching pursuit (dictionary + trainer).

After "Evaluating Sparse Autoencoders: From Shallow Design to Matching Pursuit" (Costa et al. 2025)::

    r_0 = x - b_dec ;  z = 0
    for t in 1..k:
        c   = D^T r_{t-1}                    (atoms d_j = columns of D, unit norm)
        j   = argmax_j relu(c_j)             (select="relu"; select="abs": argmax_j |c_j|)
        z_j = z_j + a_t,  a_t = relu(c_j)    (select="abs": a_t = c_j; an atom may be picked again)
        r_t = r_{t-1} - a_t d_j
    x_hat = D z + b_dec                      (= x - r_k)

The encoder is tied to the decoder: there is no encoder matrix. Each step removes the projection
of the residual on one unit atom, so ||r_t|| never increases, and ``encode`` can run any number of
steps, or until ||r_t|| <= threshold, at inference. The trainer runs a fixed k and backpropagates
the reconstruction loss through the unrolled loop (the argmax itself has no gradient).

Memory: per step only the chosen index (B,), its coefficient (B,) and the new residual (B, D) are
kept for backward; the (B, F) correlations are computed without gradient and the codes are
scattered into one dense (B, F) tensor at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn as nn
from dictionary_learning.trainers.trainer import set_decoder_norm_to_unit_norm

from .config import SAETrainerConfig, check_k
from .linear_decoder import LinearDecoderDictionary
from .registry import register_trainer
from .trainer_base import ExtTrainer

Selection = Literal["relu", "abs"]
SELECT: tuple[str, ...] = typing.get_args(Selection)


class Pursuit(NamedTuple):
    """The trace of one matching-pursuit run on a batch."""

    indices_BT: torch.Tensor
    """Atom chosen at each step (T steps actually run)."""
    coefs_BT: torch.Tensor
    """Coefficient added at each step (0 for rows that had already stopped)."""
    residual_BD: torch.Tensor
    """Final residual r_T."""
    residual_norms_BT1: torch.Tensor
    """||r_t|| for t = 0..T (detached)."""
    dict_size: int

    def codes(self) -> torch.Tensor:
        """Dense codes (B, F): the step coefficients summed per atom (one scatter, not one per step)."""
        B = self.coefs_BT.shape[0]
        f_BF = torch.zeros(B, self.dict_size, dtype=self.coefs_BT.dtype, device=self.coefs_BT.device)
        return f_BF.scatter_add(-1, self.indices_BT, self.coefs_BT)


class MPSAE(LinearDecoderDictionary):
    def __init__(self, activation_dim: int, dict_size: int, k: int, select: str = "relu"):
        super().__init__()
        if not isinstance(k, int) or not 0 < k <= dict_size:
            raise ValueError(f"k={k} must be an int in [1, dict_size={dict_size}]")
        if select not in SELECT:
            raise ValueError(f"select={select!r} must be one of {list(SELECT)}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.select = select
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.decoder.weight.data = set_decoder_norm_to_unit_norm(self.decoder.weight, activation_dim, dict_size)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        # A buffer, so ae.pt records the training k (SAEBench's loaders and the export read `.k`).
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))

    # --- the pursuit -------------------------------------------------------------------
    def pursue(
        self, x_BD: torch.Tensor, max_steps: int, threshold: Optional[float] = None
    ) -> Pursuit:
        """Run up to ``max_steps`` pursuit steps; with ``threshold``, a row stops once ||r|| <= threshold
        (its later coefficients are 0) and the loop ends when every row has stopped."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"number of pursuit steps must be an int >= 0, got {max_steps!r}")
        if threshold is not None and not (threshold >= 0 and threshold != float("inf")):
            raise ValueError(f"threshold={threshold!r} must be a finite number >= 0 (a residual L2 norm)")
        W_dec_DF = self.decoder.weight
        atoms_FD = W_dec_DF.T
        r_BD = x_BD - self.b_dec
        norm_B = r_BD.detach().norm(dim=-1)
        norms, indices, coefs = [norm_B], [], []
        active_B = norm_B > threshold if threshold is not None else None
        for _ in range(max_steps):
            if active_B is not None and not bool(active_B.any()):
                break
            # Selection needs no gradient: keeping the (B, F) correlations out of the graph is
            # what stops memory from growing with k.
            with torch.no_grad():
                c_BF = r_BD @ W_dec_DF
                j_B = (c_BF.relu() if self.select == "relu" else c_BF.abs()).argmax(dim=-1)
            d_BD = atoms_FD[j_B]
            a_B = (r_BD * d_BD).sum(dim=-1)
            if self.select == "relu":
                a_B = a_B.relu()
            if active_B is not None:
                a_B = a_B * active_B.to(a_B.dtype)
            r_BD = r_BD - a_B[:, None] * d_BD
            norm_B = r_BD.detach().norm(dim=-1)
            if active_B is not None:
                active_B = active_B & (norm_B > threshold)
            indices.append(j_B)
            coefs.append(a_B)
            norms.append(norm_B)
        B = x_BD.shape[0]
        empty = lambda dtype: torch.zeros(B, 0, dtype=dtype, device=x_BD.device)  # noqa: E731
        return Pursuit(
            indices_BT=torch.stack(indices, dim=-1) if indices else empty(torch.long),
            coefs_BT=torch.stack(coefs, dim=-1) if coefs else empty(r_BD.dtype),
            residual_BD=r_BD,
            residual_norms_BT1=torch.stack(norms, dim=-1),
            dict_size=self.dict_size,
        )

    def encode(
        self,
        x: torch.Tensor,
        k: Optional[int] = None,
        threshold: Optional[float] = None,
        max_steps: Optional[int] = None,
    ) -> torch.Tensor:
        """Codes (..., F) of activations (..., D). Default: the training k. ``k=n``: n steps.
        ``threshold=t``: steps until ||x - x_hat|| <= t, at most ``max_steps`` (default activation_dim)."""
        if threshold is None:
            if max_steps is not None:
                raise ValueError("max_steps only applies with threshold=...; use k=... for a fixed number of steps")
            steps = int(self.k) if k is None else k
        else:
            if k is not None:
                raise ValueError("give either k (fixed steps) or threshold (+ max_steps), not both")
            steps = self.activation_dim if max_steps is None else max_steps
        # Leading dims flattened: dictionary_learning's evaluate passes (batch, ctx, D) activations.
        lead = x.shape[:-1]
        f_BF = self.pursue(x.reshape(-1, x.shape[-1]), steps, threshold).codes()
        return f_BF.reshape(*lead, self.dict_size)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Fold an activation scale into the weights: the pursuit is positively homogeneous (x -> s x
        picks the same atoms with s-times the coefficients), so only b_dec moves."""
        self.b_dec.data *= scale


@dataclass
class MPSAEConfig(SAETrainerConfig):
    k: int = 32
    """Pursuit steps in training (= max latents per input; fewer if an atom is picked twice)."""
    select: Selection = "relu"
    """Atom selection: "relu" (largest positive correlation, nonnegative codes) or "abs" (classic MP, signed)."""
    wandb_name: str = "MPSAE"
    """Run name on Weights & Biases."""

    def validate(self) -> None:
        super().validate()
        check_k(self)


class MPSAETrainer(ExtTrainer):
    """Reconstruction loss (sum of squares over D, mean over the batch) through k unrolled steps."""

    config_class = MPSAEConfig
    dict_class = MPSAE

    @staticmethod
    def dictionary_kwargs(cfg: MPSAEConfig) -> dict[str, Any]:
        return dict(activation_dim=cfg.activation_dim, dict_size=cfg.dict_size, k=cfg.k, select=cfg.select)

    def compute_loss(self, x: torch.Tensor, step: int):
        trace = self.ae.pursue(x, self.cfg.k)
        f_BF = trace.codes()
        x_hat_BD = self.ae.decode(f_BF)
        with torch.autocast(device_type=x.device.type, enabled=False):
            recon = (x.float() - x_hat_BD.float()).square().sum(dim=-1).mean()
        return recon, x_hat_BD, f_BF, {"l2_loss": recon}


register_trainer("mp_sae", MPSAETrainer, saebench_tied_encoder=True)
