"""Feature pages in the spirit of SAE-Vis: for chosen latents, the top-activating contexts with
per-token activations, an activation histogram, and the top positive/negative logit effects of
the decoder direction through the unembedding (direct path, final LayerNorm scale ignored,
as SAE-Vis does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from matplotlib.ticker import MaxNLocator

from .figures import plt, save_figure
from .firing import SparseCodes


def choose_latents(stats: dict[str, Any], n: int, min_firings: int = 20) -> list[int]:
    """``n`` latents spread over the utilisation ranking (most used first, then evenly spaced), so the pages
    show frequent and rare features alike; only latents that fire at least ``min_firings`` times on the
    sample qualify (a page for a latent seen once shows nothing)."""
    counts_F = (stats["utilisation_F"] * stats["n_tokens"]).round()
    alive = (counts_F >= min_firings).nonzero().flatten()
    if n == 0 or alive.numel() == 0:
        return []
    order = alive[torch.argsort(stats["utilisation_F"][alive], descending=True, stable=True)]
    picks = np.unique(np.linspace(0, order.numel() - 1, num=min(n, order.numel())).round().astype(int))
    return [int(order[i]) for i in picks]


def feature_page(
    latent: int,
    codes: SparseCodes,
    tokens_NT: torch.Tensor,
    W_dec_FD: torch.Tensor,
    W_U_DV: torch.Tensor,
    token_str: Callable[[int], str],
    n_examples: int,
    window: int = 12,
    n_logits: int = 8,
) -> dict[str, Any]:
    ctx_len = tokens_NT.shape[1]
    mine = codes.latent_idx == latent
    tok_idx, values = codes.token_idx[mine], codes.values[mine]
    acts_N = torch.zeros(codes.n_tokens).index_put_((tok_idx,), values)
    # The strongest token per context, then the best contexts (one example per context).
    per_ctx = acts_N.reshape(-1, ctx_len).abs()
    best_val, best_pos = per_ctx.max(dim=1)
    order = torch.argsort(best_val, descending=True)[:n_examples]
    examples = []
    for ctx in order.tolist():
        if best_val[ctx] == 0:
            break
        pos = int(best_pos[ctx])
        lo, hi = max(0, pos - window), min(ctx_len, pos + window // 2 + 1)
        row = acts_N.reshape(-1, ctx_len)[ctx]
        examples.append({
            "context": ctx, "position": pos,
            "tokens": [token_str(int(t)) for t in tokens_NT[ctx, lo:hi]],
            "acts": [round(float(a), 4) for a in row[lo:hi]],
            "max_index": pos - lo,
        })
    logits_V = W_dec_FD[latent].detach().float().cpu() @ W_U_DV.detach().float().cpu()
    top = torch.topk(logits_V, n_logits)
    bottom = torch.topk(-logits_V, n_logits)
    return {
        "latent": latent,
        "utilisation": values.numel() / codes.n_tokens,
        "max_abs_activation": float(values.abs().max()) if values.numel() else 0.0,
        "mean_abs_activation": float(values.abs().mean()) if values.numel() else 0.0,
        "examples": examples,
        "logits_positive": [[token_str(int(i)), round(float(v), 4)] for v, i in zip(top.values, top.indices)],
        "logits_negative": [[token_str(int(i)), round(-float(v), 4)] for v, i in zip(bottom.values, bottom.indices)],
        "_values": values,
    }


def plot_activation_histogram(page: dict[str, Any], title: str, path: str | Path) -> Path:
    values = page["_values"].numpy()
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.hist(values, bins=min(40, max(5, values.size // 5)), color="tab:orange")
    ax.set_xlabel("activation (non-zero)")
    ax.set_ylabel("tokens")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    ax.set_title(f"{title}: latent {page['latent']} activations (n={values.size})")
    return save_figure(fig, path)


def public(page: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in page.items() if not k.startswith("_")}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """A token as text; a byte-level token that is not valid UTF-8 on its own (part of a multi-byte
    character) is shown as its bytes, e.g. <e2 80>, instead of the replacement character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not all(c in byte_of for c in piece):
        return text
    return "<" + " ".join(f"{byte_of[c]:02x}" for c in piece) + ">"
