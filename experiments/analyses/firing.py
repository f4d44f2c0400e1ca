"""Which latents fire, how often and how strongly: alive/dead counts (signed-correct: a latent
is alive if its code is ever non-zero, whatever the sign) and the post's "unique latents firing
over 20,000 activations"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SparseCodes:
    """The non-zero codes of a batch of activations, as (token, latent, value) triples."""

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor
    n_tokens: int
    dict_size: int


@torch.no_grad()
def encode_sparse(sae: Any, acts_BD: torch.Tensor, chunk: int = 4096) -> SparseCodes:
    """Encode with the SAE (SAEBench ``BaseSAE``) chunk by chunk, keeping only non-zeros."""
    tok, lat, val = [], [], []
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    for start in range(0, acts_BD.shape[0], chunk):
        f_BF = sae.encode(acts_BD[start:start + chunk].to(device=device, dtype=dtype)).float().cpu()
        rows, cols = f_BF.nonzero(as_tuple=True)
        tok.append(rows + start)
        lat.append(cols)
        val.append(f_BF[rows, cols])
    return SparseCodes(torch.cat(tok), torch.cat(lat), torch.cat(val), acts_BD.shape[0], int(sae.cfg.d_sae))


def firing_stats(codes: SparseCodes, unique_window: int) -> dict[str, Any]:
    """Numbers (for results.json) and per-latent arrays (for the figures)."""
    counts_F = torch.bincount(codes.latent_idx, minlength=codes.dict_size)
    abs_sum_F = torch.zeros(codes.dict_size).index_add_(0, codes.latent_idx, codes.values.abs())
    alive_F = counts_F > 0
    window = min(unique_window, codes.n_tokens)
    unique = int(torch.unique(codes.latent_idx[codes.token_idx < window]).numel())
    return {
        "n_tokens": codes.n_tokens,
        "frac_alive": alive_F.float().mean().item(),
        "n_alive": int(alive_F.sum()),
        "unique_window": window,
        "unique_latents_in_window": unique,
        "l0": codes.values.numel() / codes.n_tokens,
        "frac_negative_codes": (codes.values < 0).float().mean().item() if codes.values.numel() else 0.0,
        # per latent
        "utilisation_F": (counts_F.float() / codes.n_tokens),
        "mean_activation_F": torch.where(alive_F, abs_sum_F / counts_F.clamp(min=1), torch.zeros(())),
        "alive_F": alive_F,
    }


def scalar_part(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if not k.endswith("_F")}
