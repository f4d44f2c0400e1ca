"""A fixed sample of contexts and their activations at the SAE's hook, for the analyses."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import torch

from dictionary_learning_ext.io import save_torch, load_torch


@dataclass
class ActivationSample:
    tokens_NT: torch.Tensor
    """Token ids (contexts x positions)."""
    acts_NTD: torch.Tensor
    """Residual-stream activations at the SAE's hook, float32."""
    hook_name: str

    @property
    def acts_BD(self) -> torch.Tensor:
        return self.acts_NTD.reshape(-1, self.acts_NTD.shape[-1])

    def save(self, path: str | Path) -> None:
        save_torch({"tokens_NT": self.tokens_NT, "acts_NTD": self.acts_NTD, "hook_name": self.hook_name}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationSample":
        state = load_torch(path, what="analysis sample")
        return cls(state["tokens_NT"], state["acts_NTD"], state["hook_name"])


def token_contexts(texts: Iterator[str], tokenizer: Any, n_contexts: int, ctx_len: int) -> torch.Tensor:
    """``n_contexts`` windows of exactly ``ctx_len`` tokens cut from the concatenated token stream
    (no padding, so every position is a real token)."""
    stream: list[int] = []
    need = n_contexts * ctx_len
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"the text source ran out after {len(stream)} tokens; {need} are needed for the analyses")
    return torch.tensor(stream[:need], dtype=torch.long).reshape(n_contexts, ctx_len)


@torch.no_grad()
def collect(tl_model: Any, hook_name: str, tokens_NT: torch.Tensor, batch_size: int = 16) -> ActivationSample:
    """Run the model (TransformerLens) up to the hook on every context."""
    layer = int(hook_name.split(".")[1])
    device = next(tl_model.parameters()).device
    chunks = []
    for start in range(0, tokens_NT.shape[0], batch_size):
        _, cache = tl_model.run_with_cache(
            tokens_NT[start:start + batch_size].to(device), names_filter=hook_name, stop_at_layer=layer + 1
        )
        chunks.append(cache[hook_name].float().cpu())
    return ActivationSample(tokens_NT, torch.cat(chunks), hook_name)


def sample_from_text(lm: Any, tl_model: Any, text_spec: str, n_contexts: int, ctx_len: int, seed: int) -> ActivationSample:
    """The analysis sample for a loaded ``experiments.lm.models.LoadedModel`` and its HookedTransformer."""
    from experiments.lm.corpus import text_source

    tokenizer = lm.model.tokenizer
    # Held-out text: files (local corpus) or rows (hub datasets) the training never reads.
    texts = text_source(text_spec, tokenizer=tokenizer, seed=seed + 1, heldout=True, ctx_len=ctx_len)
    tokens = token_contexts(islice(texts, 1_000_000), tokenizer, n_contexts, ctx_len)
    return collect(tl_model, lm.hook_name, tokens)
