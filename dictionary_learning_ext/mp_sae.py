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

Two kernels compute the same pursuit (``kernel``):

* ``"unrolled"`` (the reference): each step correlates the residual with every atom, c = D^T r (a
  B x F x D product per step), and autograd records the loop. Per step only the chosen index (B,), its
  coefficient (B,) and the new residual (B, D) are kept for backward; the (B, F) correlations are
  computed without gradient and the codes are scattered into one dense (B, F) tensor at the end.
* ``"gram"`` (the fast path, the Batch-OMP trick): with G = D^T D (F x F, once per call) the
  correlations follow the pursuit without touching the residual: c_0 = D^T r_0, then after picking
  atom j with coefficient a, c <- c - a G[j] (B x F per step instead of B x F x D). Coefficients are
  read from c (a_t = c_t[j_t], equal in exact arithmetic to r_{t-1} . d_j), and the final residual is
  r_0 - sum_t a_t d_{j_t}. Its backward (``_GramPursuit``) is the reverse sweep of the unrolled loop
  written out by hand, with the residuals r_{t-1} = r_t + a_t d_t recomputed from r_T, so the gradients
  are those of the unrolled path (tests: ``tests/test_mp_fast_path.py``). Rows are processed in blocks
  so the block's (rows x F) correlations stay in cache over the k steps.
  It needs the F x F Gram matrix: ``gram_max_mb`` bounds it, and above that bound (or with
  ``kernel="unrolled"``) the unrolled loop runs. ``"auto"`` takes the Gram path when it fits and costs
  fewer multiply-adds (F^2 D for G against k B F D for the unrolled correlations: F <= k B). A
  threshold-stopped pursuit (``encode(threshold=...)``) always runs unrolled.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn as nn
from dictionary_learning.trainers.trainer import set_decoder_norm_to_unit_norm

from .config import SAETrainerConfig, check_float, check_k
from .linear_decoder import LinearDecoderDictionary
from .registry import register_trainer
from .trainer_base import ExtTrainer

Selection = Literal["relu", "abs"]
SELECT: tuple[str, ...] = typing.get_args(Selection)
Kernel = Literal["auto", "gram", "unrolled"]
KERNELS: tuple[str, ...] = typing.get_args(Kernel)
GRAM_MAX_MB = 1024.0  # default bound on the F x F Gram matrix: F = 16384 in float32 fits
# Rows per block of the Gram path's forward: a block's (rows x F) correlations and the (rows x F) rows
# of G gathered per step stay in cache over the k steps (measured on this CPU; the result does not
# depend on it).
GRAM_BLOCK_BYTES = 1 << 21
BACKWARD_BLOCK_TENSORS = 6


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
    kernel: str = "unrolled"
    """Which kernel ran: "unrolled" or "gram" (see the module docstring)."""

    def codes(self) -> torch.Tensor:
        """Dense codes (B, F): the step coefficients summed per atom (one scatter, not one per step)."""
        B = self.coefs_BT.shape[0]
        f_BF = torch.zeros(B, self.dict_size, dtype=self.coefs_BT.dtype, device=self.coefs_BT.device)
        return f_BF.scatter_add(-1, self.indices_BT, self.coefs_BT)


def _block_rows(width: int, itemsize: int, tensors: int = 2) -> int:
    """Rows per block so that ``tensors`` (rows x width) blocks fill GRAM_BLOCK_BYTES."""
    return max(1, GRAM_BLOCK_BYTES // (tensors * width * itemsize))


def _gram_forward(r0_BD: torch.Tensor, W_DF: torch.Tensor, steps: int, select: str):
    """Atoms picked (B, T), correlations at the picks p_t = r_{t-1} . d_{j_t} (B, T), coefficients (B, T)
    and final residual (B, D), with the correlations updated through the Gram matrix (no gradient)."""
    B, F = r0_BD.shape[0], W_DF.shape[1]
    G_FF = W_DF.T @ W_DF
    idx_BT = torch.empty(B, steps, dtype=torch.long, device=r0_BD.device)
    pre_BT = torch.empty(B, steps, dtype=W_DF.dtype, device=r0_BD.device)
    # argmax by three vectorised passes (max; positions where the max is, weighted F, F-1, ..., 1; their
    # max = F - first position) instead of torch's argmax, which does not vectorise on CPU (~5x slower).
    # Float positions are exact up to 2^24 atoms.
    reverse_F = torch.arange(F, 0, -1, dtype=W_DF.dtype, device=r0_BD.device)
    zero = torch.zeros((), dtype=torch.long, device=r0_BD.device)
    relu = select == "relu"
    rows = _block_rows(F, W_DF.element_size())
    for start in range(0, B, rows):
        block = slice(start, start + rows)
        c_bF = r0_BD[block] @ W_DF
        buf_bF = torch.empty_like(c_bF)
        picks, pres = [], []
        for t in range(steps):
            key_bF = c_bF if relu else torch.abs(c_bF, out=buf_bF)
            top_b1 = key_bF.amax(dim=-1, keepdim=True)
            first_b = torch.eq(key_bF, top_b1, out=buf_bF).mul_(reverse_F).amax(dim=-1)
            # A row of NaN (nothing equals its max) gets some atom; its loss is NaN and the trainer stops.
            j_b = (F - first_b).long().clamp_(0, F - 1)
            if relu:
                # relu(c).argmax() picks atom 0 when no correlation is positive; its coefficient is then 0.
                positive_b = top_b1.squeeze(-1) > 0
                j_b = torch.where(positive_b, j_b, zero)
                p_b = torch.where(positive_b, top_b1.squeeze(-1), c_bF[:, 0])
                a_b = p_b.clamp_min(0)
            else:
                p_b = a_b = c_bF.gather(-1, j_b[:, None]).squeeze(-1)
            # c <- c - a G[j]: the correlations of the new residual r - a d_j with every atom.
            c_bF.addcmul_(torch.index_select(G_FF, 0, j_b, out=buf_bF), a_b[:, None], value=-1.0)
            picks.append(j_b)
            pres.append(p_b)
        torch.stack(picks, dim=-1, out=idx_BT[block])
        torch.stack(pres, dim=-1, out=pre_BT[block])
    a_BT = pre_BT.clamp_min(0) if relu else pre_BT.clone()
    # r_T = r_0 - sum_t a_t d_{j_t}: one weighted sum of gathered atoms per row (an atom picked twice is
    # summed twice).
    r_BD = r0_BD - torch.nn.functional.embedding_bag(idx_BT, W_DF.t().contiguous(), per_sample_weights=a_BT, mode="sum")
    return idx_BT, pre_BT, a_BT, r_BD


class _GramPursuit(torch.autograd.Function):
    """The fixed-step pursuit of MPSAE.pursue by the Gram path, with the unrolled loop's gradients.

    Outputs (indices (B, T), coefficients a (B, T), final residual r_T (B, D), correlations at the picks
    p (B, T)); indices and correlations carry no gradient. The backward is the reverse sweep of

        r_0 = x - b_dec ;  p_t = r_{t-1} . d_{j_t} ;  a_t = s(p_t) ;  r_t = r_{t-1} - a_t d_{j_t}

    (s = relu or identity) given dL/da and dL/dr_T: with rho = dL/dr_t,
        h_t = s'(p_t) (dL/da_t - rho . d_{j_t})          (dL/dp_t)
        dL/dd_{j_t} += h_t r_{t-1} - a_t rho ;  rho <- rho + h_t d_{j_t}
    and dL/dx = rho_0, dL/db_dec = -sum_b rho_0. r_{t-1} = r_t + a_t d_{j_t} is recomputed from r_T, so
    backward keeps O(B T + B D) tensors, not one (B, D) residual per step. Rows are swept in blocks (all of
    it is row-wise but the (F, D) gradient, which stays in cache).
    """

    @staticmethod
    def forward(ctx, x_BD, W_DF, b_dec_D, steps: int, select: str):
        with torch.no_grad(), torch.autocast(device_type=x_BD.device.type, enabled=False):
            W_DF_ = W_DF.detach()
            r0_BD = x_BD.detach().to(W_DF_.dtype) - b_dec_D.detach().to(W_DF_.dtype)
            idx_BT, pre_BT, a_BT, r_BD = _gram_forward(r0_BD, W_DF_, steps, select)
        ctx.save_for_backward(idx_BT, pre_BT, a_BT, r_BD, W_DF)
        ctx.select = select
        ctx.input_dtype = x_BD.dtype
        ctx.mark_non_differentiable(idx_BT, pre_BT)
        return idx_BT, a_BT, r_BD, pre_BT

    @staticmethod
    def backward(ctx, _g_idx, g_a_BT, g_r_BD, _g_pre):
        idx_BT, pre_BT, a_BT, r_BD, W_DF = ctx.saved_tensors
        with torch.no_grad(), torch.autocast(device_type=r_BD.device.type, enabled=False):
            W_FD = W_DF.detach().t().contiguous()
            dtype = W_FD.dtype
            rho_BD = g_r_BD.to(dtype).clone()
            g_a_BT = g_a_BT.to(dtype)
            r_BD = r_BD.clone()
            relu_BT = (pre_BT > 0).to(dtype) if ctx.select == "relu" else None
            need_W = ctx.needs_input_grad[1]
            grad_FD = torch.zeros_like(W_FD) if need_W else None
            B, D = r_BD.shape
            rows = _block_rows(D, W_FD.element_size(), tensors=BACKWARD_BLOCK_TENSORS)
            for start in range(0, B, rows):
                block = slice(start, start + rows)
                rho_bD, r_bD = rho_BD[block], r_BD[block]
                for t in reversed(range(idx_BT.shape[1])):
                    j_b = idx_BT[block, t]
                    d_bD = torch.index_select(W_FD, 0, j_b)
                    a_b1 = a_BT[block, t, None]
                    h_b = g_a_BT[block, t] - torch.linalg.vecdot(rho_bD, d_bD)
                    if relu_BT is not None:
                        h_b = h_b * relu_BT[block, t]
                    r_bD.addcmul_(d_bD, a_b1)  # r_{t-1}
                    if need_W:
                        grad_FD.index_add_(0, j_b, torch.addcmul(h_b[:, None] * r_bD, a_b1, rho_bD, value=-1.0))
                    rho_bD.addcmul_(d_bD, h_b[:, None])  # dL/dr_{t-1}
            grad_x = rho_BD.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
            grad_W = grad_FD.t().contiguous() if need_W else None
            grad_b = -rho_BD.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, None, None


@dataclass
class PursuitCodes:
    """Training codes as the pursuit's (indices, coefficients), without the dense (B, F) scatter: what the
    dead-latent count reads (``LatentActivityTracker.update_from_codes``: a latent fired if one of its
    coefficients is non-zero, exact when coefficients are >= 0, i.e. select="relu"). ``to_dense`` sums an
    atom's coefficients (an atom may be picked twice), for logging."""

    idx_BK: torch.Tensor
    vals_BK: torch.Tensor
    dict_size: int

    def detach(self) -> "PursuitCodes":
        return PursuitCodes(self.idx_BK, self.vals_BK.detach(), self.dict_size)

    def to_dense(self) -> torch.Tensor:
        B = self.idx_BK.shape[0]
        f_BF = torch.zeros(B, self.dict_size, dtype=self.vals_BK.dtype, device=self.vals_BK.device)
        return f_BF.scatter_add_(-1, self.idx_BK, self.vals_BK.detach())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.idx_BK.shape[0], self.dict_size))


class MPSAE(LinearDecoderDictionary):
    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        k: int,
        select: str = "relu",
        kernel: str = "auto",
        gram_max_mb: float = GRAM_MAX_MB,
    ):
        super().__init__()
        if not isinstance(k, int) or not 0 < k <= dict_size:
            raise ValueError(f"k={k} must be an int in [1, dict_size={dict_size}]")
        if select not in SELECT:
            raise ValueError(f"select={select!r} must be one of {list(SELECT)}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} must be one of {list(KERNELS)}")
        if not gram_max_mb >= 0:
            raise ValueError(f"gram_max_mb={gram_max_mb!r} must be >= 0 (megabytes for the F x F Gram matrix)")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.select = select
        # Plain attributes, not buffers: how the pursuit is computed is not part of the weights.
        self.kernel = kernel
        self.gram_max_mb = float(gram_max_mb)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.decoder.weight.data = set_decoder_norm_to_unit_norm(self.decoder.weight, activation_dim, dict_size)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        # A buffer, so ae.pt records the training k (SAEBench's loaders and the export read `.k`).
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))

    # --- the pursuit -------------------------------------------------------------------
    def gram_fits(self) -> bool:
        """Whether the F x F Gram matrix fits in ``gram_max_mb``."""
        itemsize = self.decoder.weight.element_size()
        return self.dict_size ** 2 * itemsize <= self.gram_max_mb * 2**20

    def uses_gram(self, batch_size: int, steps: int) -> bool:
        """Whether a fixed-step pursuit of ``steps`` on ``batch_size`` rows takes the Gram path."""
        if self.kernel == "unrolled" or steps == 0 or batch_size == 0 or not self.gram_fits():
            return False
        # "auto": G costs F^2 D multiply-adds, the unrolled correlations k B F D.
        return self.kernel == "gram" or self.dict_size <= steps * batch_size

    def pursue(
        self, x_BD: torch.Tensor, max_steps: int, threshold: Optional[float] = None
    ) -> Pursuit:
        """Run up to ``max_steps`` pursuit steps; with ``threshold``, a row stops once ||r|| <= threshold
        (its later coefficients are 0) and the loop ends when every row has stopped."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"number of pursuit steps must be an int >= 0, got {max_steps!r}")
        if threshold is not None and not (threshold >= 0 and threshold != float("inf")):
            raise ValueError(f"threshold={threshold!r} must be a finite number >= 0 (a residual L2 norm)")
        if threshold is None and self.uses_gram(x_BD.shape[0], max_steps):
            return self.pursue_gram(x_BD, max_steps)
        return self.pursue_unrolled(x_BD, max_steps, threshold)

    def pursue_gram(self, x_BD: torch.Tensor, steps: int) -> Pursuit:
        """``steps`` pursuit steps by the Gram path (whatever ``kernel`` says; no threshold)."""
        W_dec_DF = self.decoder.weight
        idx_BT, coefs_BT, residual_BD, pre_BT = _GramPursuit.apply(x_BD, W_dec_DF, self.b_dec, steps, self.select)
        with torch.no_grad():
            # ||r_{t-1}||^2 = ||r_t||^2 + 2 a_t p_t - a_t^2 ||d_j||^2 (p_t = r_{t-1} . d_j), exact for any atom
            # norms, summed backwards from the exact ||r_T|| (and ||r_0|| taken exactly): small late norms
            # are then sums of small late drops, not differences of large early ones.
            sq_atom_F = W_dec_DF.detach().double().square().sum(dim=0)
            a_BT, p_BT = coefs_BT.detach().double(), pre_BT.double()
            drops_BT = 2 * a_BT * p_BT - a_BT.square() * sq_atom_F[idx_BT]
            sqT_B = residual_BD.detach().double().square().sum(dim=-1)
            sq_BT = sqT_B[:, None] + drops_BT.flip(-1).cumsum(dim=-1).flip(-1)  # ||r_{t-1}||^2, t = 1..T
            sq0_B = (x_BD.detach().double() - self.b_dec.detach().double()).square().sum(dim=-1)
            sq_BT1 = torch.cat([sq0_B[:, None], sq_BT[:, 1:], sqT_B[:, None]], dim=-1)
            norms_BT1 = sq_BT1.clamp_min(0).sqrt().to(residual_BD.dtype)
        return Pursuit(idx_BT, coefs_BT, residual_BD, norms_BT1, self.dict_size, kernel="gram")

    def pursue_unrolled(
        self, x_BD: torch.Tensor, max_steps: int, threshold: Optional[float] = None
    ) -> Pursuit:
        """The reference: the loop above with autograd (see ``pursue``)."""
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
    kernel: Kernel = "auto"
    """How the pursuit is computed (same codes and gradients): "gram" (correlations updated with the
    F x F Gram matrix, B x F work per step), "unrolled" (the reference: D^T r recomputed every step,
    B x F x D per step) or "auto" (gram when it fits in gram_max_mb and costs fewer multiply-adds)."""
    gram_max_mb: float = GRAM_MAX_MB
    """Memory bound on the Gram matrix (F^2 x 4 bytes in float32); above it the unrolled loop runs. 0: never gram."""
    wandb_name: str = "MPSAE"
    """Run name on Weights & Biases."""

    def validate(self) -> None:
        super().validate()
        check_k(self)
        check_float(self, "gram_max_mb", minimum=0.0)


class MPSAETrainer(ExtTrainer):
    """Reconstruction loss (sum of squares over D, mean over the batch) through k unrolled steps."""

    config_class = MPSAEConfig
    dict_class = MPSAE

    @staticmethod
    def dictionary_kwargs(cfg: MPSAEConfig) -> dict[str, Any]:
        return dict(activation_dim=cfg.activation_dim, dict_size=cfg.dict_size, k=cfg.k, select=cfg.select,
                    kernel=cfg.kernel, gram_max_mb=cfg.gram_max_mb)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        out = super().loss(x, step=step, logging=logging)
        if logging and isinstance(out.f, PursuitCodes):
            out = out._replace(f=out.f.to_dense())  # dictionary_learning's logging reads (B, F) codes
        return out

    def compute_loss(self, x: torch.Tensor, step: int):
        trace = self.ae.pursue(x, self.cfg.k)
        if trace.kernel == "gram":
            # x_hat = D f + b_dec = x - r_k: the loss reads the final residual, whose gradient reaches the
            # atoms and b_dec through the pursuit exactly as the decoder's would (no dense (B, F) decode).
            # The codes are for the activity count and logging only.
            codes = PursuitCodes(trace.indices_BT, trace.coefs_BT.detach(), self.cfg.dict_size)
            # Signed codes (select="abs") could cancel to 0 when an atom is picked twice: count them densely.
            f_BF = codes if self.cfg.select == "relu" else codes.to_dense()
            residual_BD = trace.residual_BD
            x_hat_BD = x - residual_BD.to(x.dtype)
            with torch.autocast(device_type=x.device.type, enabled=False):
                recon = residual_BD.float().square().sum(dim=-1).mean()
            return recon, x_hat_BD, f_BF, {"l2_loss": recon}
        f_BF = trace.codes()
        x_hat_BD = self.ae.decode(f_BF)
        with torch.autocast(device_type=x.device.type, enabled=False):
            recon = (x.float() - x_hat_BD.float()).square().sum(dim=-1).mean()
        return recon, x_hat_BD, f_BF, {"l2_loss": recon}


register_trainer("mp_sae", MPSAETrainer, saebench_tied_encoder=True)
