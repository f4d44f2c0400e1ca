"""Pairwise cosine similarity of the active latents' decoder directions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BINS = np.linspace(-1.0, 1.0, 101)


def decoder_directions(W_dec_FD: torch.Tensor) -> torch.Tensor:
    W = W_dec_FD.detach().float().cpu()
    return W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def cosine_stats(W_dec_FD: torch.Tensor, alive_F: torch.Tensor) -> dict[str, Any]:
    """Mean/variance/max of cos(d_i, d_j) over pairs i < j of alive latents, and a histogram."""
    d_AD = decoder_directions(W_dec_FD)[alive_F.cpu()]
    n = d_AD.shape[0]
    if n < 2:
        return {"n_active": n, "mean": float("nan"), "var": float("nan"), "mean_abs": float("nan"),
                "max_abs": float("nan"), "hist_counts": [0] * (len(BINS) - 1), "hist_edges": BINS.tolist()}
    iu = torch.triu_indices(n, n, offset=1)
    cos = (d_AD @ d_AD.T)[iu[0], iu[1]]
    counts, _ = np.histogram(cos.numpy(), bins=BINS)
    return {
        "n_active": n,
        "mean": cos.mean().item(),
        "var": cos.var().item(),
        "mean_abs": cos.abs().mean().item(),
        "max_abs": cos.abs().max().item(),
        "hist_counts": counts.tolist(),
        "hist_edges": BINS.tolist(),
    }
