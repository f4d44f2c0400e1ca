"""The activations the benchmark trains on.

* ``embedded``: the embedded default model's residual stream after block 0 (d 256), read through the
  training path itself (``experiments.training.data.make_buffer``: nnsight, dictionary_learning's
  ActivationBuffer, its shuffling) and written once to ``cache/bench/``; later runs reuse the file while the
  model's checksum and the collection settings match.
* ``synthetic``: no embedded model is 512 wide, so the d 512 workload is a sparse-feature mixture (the
  generative model SAEs assume): 8 d unit feature directions with Zipfian frequencies (feature i fires
  with probability ~ 1/i), about 40 active per token with exponential magnitudes, plus a constant offset
  (the mean a residual stream carries) and 5% isotropic noise. Generated in seconds from a seed, not
  cached. Unlike Gaussian noise it has rare features, so latents can die as they do on real data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CACHE_DIR = Path(__file__).resolve().parents[2] / "cache" / "bench"
COLLECTION = dict(layer=0, ctx_len=128, n_ctxs=500, refresh_batch_size=64, text="local", seed=0)


@dataclass
class Workload:
    name: str
    acts: torch.Tensor
    """(N, d) float32 activations; batches are consecutive slices, wrapping around."""
    description: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.acts.shape[1]

    def batch(self, index: int, size: int) -> torch.Tensor:
        """The ``index``-th batch of ``size`` rows (the same for every contender)."""
        n = self.acts.shape[0]
        start = (index * size) % n
        if start + size <= n:
            return self.acts[start:start + size]
        return torch.cat([self.acts[start:], self.acts[: size - (n - start)]])


def _model_digest() -> str:
    from experiments.lm.assets import ASSETS_DIR, read_checksums

    return read_checksums(ASSETS_DIR)["model.safetensors"][:16]


def embedded_workload(n_tokens: int = 200_000, cache_dir: Path = CACHE_DIR, log=print) -> Workload:
    """The embedded model's activations at the SAE site, from the cache or collected now (~15 s)."""
    from dictionary_learning_ext.io import load_torch, save_torch

    meta = {"model": "default", "model_sha256": _model_digest(), "n_tokens": n_tokens, **COLLECTION}
    path = Path(cache_dir) / f"default_lm_layer{COLLECTION['layer']}_{n_tokens}tok_{meta['model_sha256']}.pt"
    if path.is_file():
        saved = load_torch(path, what="benchmark activations")
        if saved.get("meta") == meta:
            acts = saved["acts"]
            log(f"  activations: {tuple(acts.shape)} from {path}")
            return Workload("embedded", acts, _embedded_description(acts), meta)
    acts = collect_embedded(n_tokens)
    save_torch({"acts": acts, "meta": meta}, path)
    log(f"  activations: collected {tuple(acts.shape)} from the embedded model, written to {path}")
    return Workload("embedded", acts, _embedded_description(acts), meta)


def _embedded_description(acts: torch.Tensor) -> str:
    return (f"embedded model (vsae-gelu-2l), residual stream after block {COLLECTION['layer']}, d {acts.shape[1]}, "
            f"{acts.shape[0]} tokens through ActivationBuffer")


def collect_embedded(n_tokens: int) -> torch.Tensor:
    from experiments.lm.models import load_model
    from experiments.training.config import RunConfig
    from experiments.training.data import make_buffer

    lm = load_model("default", layer=COLLECTION["layer"])
    config = RunConfig(n_ctxs=COLLECTION["n_ctxs"], ctx_len=COLLECTION["ctx_len"], text=COLLECTION["text"],
                       refresh_batch_size=COLLECTION["refresh_batch_size"], batch_size=8192, seed=COLLECTION["seed"])
    stream = make_buffer(config, lm)
    chunks, have = [], 0
    while have < n_tokens:
        x = next(stream)
        chunks.append(x.float().cpu())
        have += x.shape[0]
    return torch.cat(chunks)[:n_tokens].contiguous()


def synthetic_workload(d: int = 512, n_tokens: int = 100_000, seed: int = 0, features_per_dim: int = 8,
                       active: int = 40) -> Workload:
    """The sparse-feature mixture described in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    n_features = features_per_dim * d
    dirs_ND = torch.randn(n_features, d, generator=gen)
    dirs_ND /= dirs_ND.norm(dim=1, keepdim=True)
    weights = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64)
    cdf = (weights.cumsum(0) / weights.sum()).float()
    offset_D = torch.randn(d, generator=gen)
    offset_D *= 5.0 / offset_D.norm()
    slots = 2 * active  # each slot draws a feature by frequency and is on with probability 1/2
    acts = torch.empty(n_tokens, d)
    for start in range(0, n_tokens, 8192):
        m = min(8192, n_tokens - start)
        feats = torch.searchsorted(cdf, torch.rand(m, slots, generator=gen)).clamp_(max=n_features - 1)
        mags = torch.empty(m, slots).exponential_(1.0, generator=gen) * (torch.rand(m, slots, generator=gen) < 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sparse CSR "beta"
            codes = torch.sparse_csr_tensor(torch.arange(0, m * slots + 1, slots), feats.reshape(-1),
                                            mags.reshape(-1), (m, n_features))
            signal = codes @ dirs_ND
        noise = torch.randn(m, d, generator=gen)
        acts[start:start + m] = signal + offset_D + 0.05 * signal.norm(dim=1, keepdim=True) / d**0.5 * noise
    desc = (f"synthetic sparse-feature mixture, d {d}: {n_features} Zipfian features, ~{active} active per token, "
            f"exponential magnitudes, offset + 5% noise, {n_tokens} tokens (seed {seed})")
    return Workload(f"synthetic{d}", acts, desc, {"d": d, "n_tokens": n_tokens, "seed": seed})
