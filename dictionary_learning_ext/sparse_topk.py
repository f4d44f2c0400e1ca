"""k-sparse forward/backward for TopK-gated dictionaries, in plain PyTorch.

A TopK step needs the encoder's forward densely (to rank the latents). Everything after the
selection touches only the k chosen latents per token:

* decoding   x_hat[b] = sum_k v[b, k] W_dec[:, i[b, k]]          -- CSR (B, F) @ W_dec^T
* grad of v  g_v[b, k] = g[b] . W_dec[:, i[b, k]]                -- sampled dense-dense matmul
* grad of W  g_W[:, f] = sum_{(b, k): i[b, k] = f} v[b, k] g[b]  -- CSR^T (F, B) @ g
* encoder    the same scatter for W_enc's rows, an index_add for b_enc, and b_dec's gradient
             through x - b_dec as one vector-matrix product (autograd would form a dense (B, D)
             gradient of x - b_dec with a full (B, F) @ (F, D) matmul, only to sum it).

The selection (top-k) is computed once by the caller and passed in as ``idx_BK``; the
pre-activations already computed densely are passed in too, so nothing is recomputed.

CSR kernels exist on CPU and CUDA in float32/float64 but not bfloat16 on CPU, so the k-sparse
ops run in float32 (their cost is small; under bf16 autocast only the dense encoder forward runs
in bfloat16). Columns of a row need not be sorted for these three kernels (checked in the tests
against dense references).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

def _no_autocast(device: torch.device):
    # backward() may be called inside an autocast region; the CSR kernels need float32.
    return torch.autocast(device_type=device.type, enabled=False)


def topk_csr(idx_BK: torch.Tensor, vals_BK: torch.Tensor, num_latents: int) -> torch.Tensor:
    """The (B, F) code matrix with k stored entries per row, as CSR, without a dense copy."""
    B, K = idx_BK.shape
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device, dtype=torch.int64)
    with warnings.catch_warnings():  # "CSR support is in beta": the kernels used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, idx_BK.reshape(-1), vals_BK.reshape(-1), (B, num_latents), check_invariants=False
        )


def sparse_rows_matmul(idx_BK: torch.Tensor, vals_BK: torch.Tensor, M_FD: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_k vals[b, k] * M[idx[b, k]]  -> (B, D)."""
    return topk_csr(idx_BK, vals_BK, M_FD.shape[0]) @ M_FD


def gather_dot(idx_BK: torch.Tensor, A_BD: torch.Tensor, M_FD: torch.Tensor) -> torch.Tensor:
    """out[b, k] = A[b] . M[idx[b, k]]  -> (B, K), without the dense (B, F) product."""
    B, K = idx_BK.shape
    pattern = topk_csr(idx_BK, torch.zeros(B * K, dtype=A_BD.dtype, device=A_BD.device), M_FD.shape[0])
    return torch.sparse.sampled_addmm(pattern, A_BD, M_FD.t(), beta=0.0).values().view(B, K)


def scatter_outer(idx_BK: torch.Tensor, w_BK: torch.Tensor, A_BD: torch.Tensor, num_latents: int) -> torch.Tensor:
    """out[f] = sum over (b, k) with idx[b, k] == f of w[b, k] * A[b]  -> (F, D)."""
    return topk_csr(idx_BK, w_BK, num_latents).t() @ A_BD


class _SparseDecode(torch.autograd.Function):
    """sum_k vals[b, k] * W_dec[:, idx[b, k]] (no bias), gradients only on selected latents."""

    @staticmethod
    def forward(ctx, vals_BK: torch.Tensor, idx_BK: torch.Tensor, W_dec_DF: torch.Tensor) -> torch.Tensor:
        # Rows per latent, contiguous: one 4-byte * D * F copy beats strided row gathers.
        W_FD = W_dec_DF.detach().t().float().contiguous()
        vals_BK = vals_BK.detach().float().contiguous()
        ctx.save_for_backward(vals_BK, idx_BK, W_FD)
        return sparse_rows_matmul(idx_BK, vals_BK, W_FD)

    @staticmethod
    def backward(ctx, g_BD: torch.Tensor):
        vals_BK, idx_BK, W_FD = ctx.saved_tensors
        g_BD = g_BD.float().contiguous()
        grad_vals = grad_W = None
        with _no_autocast(g_BD.device):
            if ctx.needs_input_grad[0]:
                grad_vals = gather_dot(idx_BK, g_BD, W_FD)
            if ctx.needs_input_grad[2]:
                grad_W = scatter_outer(idx_BK, vals_BK, g_BD, W_FD.shape[0]).t().contiguous()
        return grad_vals, None, grad_W


def sparse_decode(vals_BK: torch.Tensor, idx_BK: torch.Tensor, W_dec_DF: torch.Tensor) -> torch.Tensor:
    """Decoder matmul (no bias) from the k selected codes; float32 output."""
    with torch.autocast(device_type=vals_BK.device.type, enabled=False):
        return _SparseDecode.apply(vals_BK, idx_BK, W_dec_DF)


class _SelectedLinear(torch.autograd.Function):
    """pre[b, k] = W[idx[b, k]] . (x[b] - b_dec) + b[idx[b, k]], for a dense-computed layer.

    ``pre_BK`` (already gathered from the dense forward) is returned as is when given; the
    backward touches only the selected rows of W and b, and b_dec gets -(sum of b's grad) @ W.
    """

    @staticmethod
    def forward(ctx, xc_BD, W_FD, b_F, b_dec_D, idx_BK, pre_BK):
        xc_BD = xc_BD.detach().float().contiguous()
        if pre_BK is None:
            pre_BK = gather_dot(idx_BK, xc_BD, W_FD.detach().float()) + b_F.detach().float()[idx_BK]
        ctx.save_for_backward(xc_BD, W_FD, idx_BK)
        return pre_BK.detach().float()

    @staticmethod
    def backward(ctx, g_BK: torch.Tensor):
        xc_BD, W_FD, idx_BK = ctx.saved_tensors
        g_BK = g_BK.float().contiguous()
        num_latents = W_FD.shape[0]
        with _no_autocast(g_BK.device):
            grad_W = scatter_outer(idx_BK, g_BK, xc_BD, num_latents) if ctx.needs_input_grad[1] else None
            grad_b_F = torch.zeros(num_latents, dtype=torch.float32, device=g_BK.device)
            grad_b_F.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
            grad_b_dec = -(grad_b_F @ W_FD.detach().float()) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b_F if ctx.needs_input_grad[2] else None, grad_b_dec, None, None


def selected_linear(
    xc_BD: torch.Tensor,
    layer: torch.nn.Linear,
    b_dec_D: torch.Tensor,
    idx_BK: torch.Tensor,
    pre_BK: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``layer(x - b_dec)`` at the selected latents only (float32), k-sparse gradients.

    ``xc_BD`` is x - b_dec (its value; b_dec's gradient is produced here). ``pre_BK`` are the
    values already computed by the dense forward, gathered at ``idx_BK`` (None: computed here).
    """
    with torch.autocast(device_type=xc_BD.device.type, enabled=False):
        return _SelectedLinear.apply(xc_BD, layer.weight, layer.bias, b_dec_D, idx_BK, pre_BK)


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
