"""Diagonal-Gaussian posterior helpers: reparameterised sampling and the closed-form KL to N(0, I)."""

from typing import Optional

import torch


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise KL[N(mu, exp(log_var)) || N(0, 1)], computed in float32.

    KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2). Float32 because under bf16 autocast the
    ``-1 - log sigma^2`` cancellation loses every significant digit.
    """
    mu = mu.float()
    log_var = log_var.float()
    return 0.5 * (mu.square() + log_var.exp() - 1.0 - log_var)


def sample_noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` drawn from the trainer's own generator.

    A per-trainer generator keeps each trainer's noise reproducible when trainSAE steps several
    trainers on one batch (the global RNG would interleave their draws).
    """
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def reparameterize(
    mu: torch.Tensor, log_var: torch.Tensor, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I); differentiable in mu and log_var."""
    eps = sample_noise(mu, generator)
    return mu + torch.exp(0.5 * log_var) * eps
