"""k-sparse forward/backward for TopK-gated dictionaries, in plain PyTorch.

A TopK step needs the encoder's forward densely (to rank the latents). Everything after the
selection touches only the k chosen latents per token:

* decoding   x_hat[b] = sum_k v[b, k] W_dec[:, i[b, k]]          -- an embedding bag (weighted row sums)
* grad of v  g_v[b, k] = g[b] . W_dec[:, i[b, k]]                -- sampled dense-dense matmul
* grad of W  g_W[:, f] = sum_{(b, k): i[b, k] = f} v[b, k] g[b]  -- an embedding bag per latent over the
                                                                   transposed pattern (dense from
                                                                   DENSE_SCATTER_DENSITY selected on)
* encoder    the same scatter for W_enc's rows, an index_add for b_enc, and b_dec's gradient
             through x - b_dec as one vector-matrix product (autograd would form a dense (B, D)
             gradient of x - b_dec with a full (B, F) @ (F, D) matmul, only to sum it).

The selection (top-k) is computed once by the caller and passed in as ``idx_BK``; the
pre-activations already computed densely are passed in too, so nothing is recomputed.

The sampled matmul (CSR mask) and the embedding bags run in float32 (CSR kernels have no bfloat16 on
CPU; their cost is small; under bf16 autocast only the dense encoder forward runs in bfloat16). Columns
of a row need not be sorted for these kernels (checked in the tests against dense references).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# From this fraction of selected latents (k / F) on, a gradient that scatters into (F, D) is faster as a dense
# (F, B) @ (B, D) product of the scattered codes than through the transposed pattern (whose sort grows with
# B k): measured on this CPU with one thread, B 4096: the three such gradients of a VSAETopK step cost
# 77 ms dense against 99 ms sparse at k = 256 of 1024 latents (0.25), 73 against 34 ms at k = 128 (0.125).
DENSE_SCATTER_DENSITY = 0.2


def _no_autocast(device: torch.device):
    # backward() may be called inside an autocast region; the CSR kernels need float32.
    return torch.autocast(device_type=device.type, enabled=False)


class TopKPattern:
    """The (B, F) sparsity pattern of one top-k selection, as CSR, plus its transpose (F, B),
    built once per step on first use and shared by every gradient that scatters into (F, D)."""

    def __init__(self, idx_BK: torch.Tensor, num_latents: int):
        self.idx_BK = idx_BK
        self.num_latents = num_latents
        B, K = idx_BK.shape
        self.crow_B = torch.arange(0, B * K + 1, K, device=idx_BK.device, dtype=torch.int64)
        self.col = idx_BK.reshape(-1)
        self._transpose: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.idx_BK.shape[0], self.num_latents)

    @property
    def density(self) -> float:
        """Fraction of the (B, F) entries selected: k / F."""
        return self.idx_BK.shape[1] / self.num_latents

    def dense(self, vals_BK: torch.Tensor) -> torch.Tensor:
        """(B, F) with vals_BK at the selected entries (the indices of a row are distinct)."""
        out = torch.zeros(self.shape, dtype=vals_BK.dtype, device=vals_BK.device)
        return out.scatter_(-1, self.idx_BK, vals_BK)

    def csr(self, vals_BK: torch.Tensor) -> torch.Tensor:
        """(B, F) with vals_BK at the selected entries."""
        return _csr(self.crow_B, self.col, vals_BK.reshape(-1), self.shape)

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pattern by latent: (order of the (b, k) entries sorted by latent, row pointers (F + 1,), the
        token b of each entry in that order); built once, on first use."""
        if self._transpose is None:
            K = self.idx_BK.shape[1]
            # int32 stable sort: several times faster than int64 argsort on CPU; dict_size < 2**31.
            order = torch.sort(self.col.to(torch.int32), stable=True).indices
            counts_F = torch.bincount(self.col, minlength=self.num_latents)
            crow_F = torch.zeros(self.num_latents + 1, dtype=torch.int64, device=self.col.device)
            crow_F[1:] = counts_F.cumsum(0)
            self._transpose = (order, crow_F, order // K)
        return self._transpose

    def csr_t(self, vals_BK: torch.Tensor) -> torch.Tensor:
        """(F, B) = the transpose of ``csr(vals_BK)``."""
        order, crow_F, rows = self.transpose()
        return _csr(crow_F, rows, vals_BK.reshape(-1).index_select(0, order), self.shape[::-1])

    def scatter_rows(self, w_BK: torch.Tensor, A_BD: torch.Tensor) -> torch.Tensor:
        """``csr_t(w_BK) @ A_BD`` -> (F, D), as one embedding bag per latent over the transposed pattern (the
        tokens that selected it, weighted): about 2x faster on CPU than the CSR product."""
        order, crow_F, rows = self.transpose()
        return F.embedding_bag(rows, A_BD.contiguous(), offsets=crow_F[:-1],
                               per_sample_weights=w_BK.reshape(-1).index_select(0, order).to(A_BD.dtype), mode="sum")


def _csr(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the kernels used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _pattern(idx_BK, num_latents: int) -> TopKPattern:
    return idx_BK if isinstance(idx_BK, TopKPattern) else TopKPattern(idx_BK, num_latents)


def sparse_rows_matmul(idx_BK, vals_BK: torch.Tensor, M_FD: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_k vals[b, k] * M[idx[b, k]]  -> (B, D). ``idx_BK``: indices or a TopKPattern.

    As an embedding bag with per-sample weights (a weighted sum of gathered rows): 2-5x faster on CPU
    than the same product as CSR (B, F) @ (F, D) (e.g. 1.8 against 9 ms at B 4096, k 64, F 1024, D 256)."""
    idx = idx_BK.idx_BK if isinstance(idx_BK, TopKPattern) else idx_BK
    return F.embedding_bag(idx, M_FD, per_sample_weights=vals_BK.to(M_FD.dtype), mode="sum")


def gather_dot(idx_BK, A_BD: torch.Tensor, M_FD: torch.Tensor) -> torch.Tensor:
    """out[b, k] = A[b] . M[idx[b, k]]  -> (B, K), without the dense (B, F) product."""
    pattern = _pattern(idx_BK, M_FD.shape[0])
    B, K = pattern.idx_BK.shape
    mask = pattern.csr(torch.zeros(B * K, dtype=A_BD.dtype, device=A_BD.device))
    return torch.sparse.sampled_addmm(mask, A_BD, M_FD.t(), beta=0.0).values().view(B, K)


def scatter_outer(idx_BK, w_BK: torch.Tensor, A_BD: torch.Tensor, num_latents: int) -> torch.Tensor:
    """out[f] = sum over (b, k) with idx[b, k] == f of w[b, k] * A[b]  -> (F, D). Above
    DENSE_SCATTER_DENSITY selected latents, as the dense product of the scattered (B, F) weights."""
    pattern = _pattern(idx_BK, num_latents)
    if pattern.density >= DENSE_SCATTER_DENSITY:
        return pattern.dense(w_BK).t() @ A_BD
    return pattern.scatter_rows(w_BK, A_BD)


class _SparseDecode(torch.autograd.Function):
    """sum_k vals[b, k] * W_dec[:, idx[b, k]] (no bias), gradients only on selected latents."""

    @staticmethod
    def forward(ctx, vals_BK: torch.Tensor, pattern: TopKPattern, W_dec_DF: torch.Tensor) -> torch.Tensor:
        # Rows per latent, contiguous: one 4-byte * D * F copy beats strided row gathers.
        W_FD = W_dec_DF.detach().t().float().contiguous()
        vals_BK = vals_BK.detach().float().contiguous()
        ctx.save_for_backward(vals_BK, W_FD)
        ctx.pattern = pattern
        return sparse_rows_matmul(pattern, vals_BK, W_FD)

    @staticmethod
    def backward(ctx, g_BD: torch.Tensor):
        vals_BK, W_FD = ctx.saved_tensors
        pattern = ctx.pattern
        g_BD = g_BD.float().contiguous()
        grad_vals = grad_W = None
        with _no_autocast(g_BD.device):
            if ctx.needs_input_grad[0]:
                grad_vals = gather_dot(pattern, g_BD, W_FD)
            if ctx.needs_input_grad[2]:
                grad_W = scatter_outer(pattern, vals_BK, g_BD, W_FD.shape[0]).t().contiguous()
        return grad_vals, None, grad_W


def sparse_decode(vals_BK: torch.Tensor, idx_BK, W_dec_DF: torch.Tensor) -> torch.Tensor:
    """Decoder matmul (no bias) from the k selected codes; float32 output.
    ``idx_BK``: the (B, k) indices or their TopKPattern (shared with ``selected_linear``)."""
    with torch.autocast(device_type=vals_BK.device.type, enabled=False):
        return _SparseDecode.apply(vals_BK, _pattern(idx_BK, W_dec_DF.shape[1]), W_dec_DF)


class _SelectedLinear(torch.autograd.Function):
    """pre[b, k] = W[idx[b, k]] . (x[b] - b_dec) + b[idx[b, k]], for a dense-computed layer.

    ``pre_BK`` (already gathered from the dense forward) is returned as is when given; the
    backward touches only the selected rows of W and b, and b_dec gets -(sum of b's grad) @ W.
    """

    @staticmethod
    def forward(ctx, xc_BD, W_FD, b_F, b_dec_D, pattern: TopKPattern, pre_BK):
        xc_BD = xc_BD.detach().float().contiguous()
        if pre_BK is None:
            b_BK = b_F.detach().float().index_select(0, pattern.col).view(pattern.idx_BK.shape)
            pre_BK = gather_dot(pattern, xc_BD, W_FD.detach().float()) + b_BK
        ctx.save_for_backward(xc_BD, W_FD)
        ctx.pattern = pattern
        return pre_BK.detach().float()

    @staticmethod
    def backward(ctx, g_BK: torch.Tensor):
        xc_BD, W_FD = ctx.saved_tensors
        pattern = ctx.pattern
        g_BK = g_BK.float().contiguous()
        num_latents = W_FD.shape[0]
        with _no_autocast(g_BK.device):
            grad_W = scatter_outer(pattern, g_BK, xc_BD, num_latents) if ctx.needs_input_grad[1] else None
            grad_b_F = torch.zeros(num_latents, dtype=torch.float32, device=g_BK.device)
            grad_b_F.index_add_(0, pattern.col, g_BK.reshape(-1))
            grad_b_dec = -(grad_b_F @ W_FD.detach().float()) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b_F if ctx.needs_input_grad[2] else None, grad_b_dec, None, None


def selected_linear(
    xc_BD: torch.Tensor,
    layer: torch.nn.Linear,
    b_dec_D: torch.Tensor,
    idx_BK,
    pre_BK: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``layer(x - b_dec)`` at the selected latents only (float32), k-sparse gradients.

    ``xc_BD`` is x - b_dec (its value; b_dec's gradient is produced here). ``pre_BK`` are the
    values already computed by the dense forward, gathered at ``idx_BK`` (None: computed here).
    """
    with torch.autocast(device_type=xc_BD.device.type, enabled=False):
        pattern = _pattern(idx_BK, layer.weight.shape[0])
        return _SelectedLinear.apply(xc_BD, layer.weight, layer.bias, b_dec_D, pattern, pre_BK)


class _CenteredLinear(torch.autograd.Function):
    """Dense ``layer(x - b_dec)`` whose backward skips the (B, F) @ (F, D) gradient of x - b_dec:
    b_dec's gradient is -(column sums of the output gradient) @ W, a vector-matrix product."""

    @staticmethod
    def forward(ctx, xc_BD, W_FD, b_F, b_dec_D):
        xc_BD = xc_BD.detach()
        ctx.save_for_backward(xc_BD, W_FD)
        return F.linear(xc_BD, W_FD, b_F)  # autocast (if on) applies as in nn.Linear

    @staticmethod
    def backward(ctx, g_BF: torch.Tensor):
        xc_BD, W_FD = ctx.saved_tensors
        g_BF = g_BF.float()
        with _no_autocast(g_BF.device):
            grad_W = g_BF.t() @ xc_BD.float() if ctx.needs_input_grad[1] else None
            grad_b_F = g_BF.sum(dim=0)
            grad_b_dec = -(grad_b_F @ W_FD.detach().float()) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b_F if ctx.needs_input_grad[2] else None, grad_b_dec


def centered_linear(xc_BD: torch.Tensor, layer: torch.nn.Linear, b_dec_D: torch.Tensor) -> torch.Tensor:
    """``layer(x - b_dec)`` densely with a cheaper backward (used when every latent gets a gradient,
    e.g. the KL over all latents)."""
    return _CenteredLinear.apply(xc_BD, layer.weight, layer.bias, b_dec_D)


@dataclass
class TopKCodes:
    """The training codes of a step as (indices, values): a dense (B, F) copy is built only
    on demand (logging), never on the training hot path."""

    idx_BK: torch.Tensor
    vals_BK: torch.Tensor
    dict_size: int

    def detach(self) -> "TopKCodes":
        return TopKCodes(self.idx_BK, self.vals_BK.detach(), self.dict_size)

    def to_dense(self) -> torch.Tensor:
        B = self.idx_BK.shape[0]
        f_BF = torch.zeros(B, self.dict_size, dtype=self.vals_BK.dtype, device=self.vals_BK.device)
        return f_BF.scatter_(-1, self.idx_BK, self.vals_BK.detach())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.idx_BK.shape[0], self.dict_size))
