"""The decoder side every dictionary of this package shares with dictionary_learning's:
x_hat = W_dec f + b_dec, and ``forward`` = decode(encode(x)) (optionally returning the codes)."""

from __future__ import annotations

import torch
import torch.nn as nn
from dictionary_learning.dictionary import Dictionary


class LinearDecoderDictionary(Dictionary, nn.Module):
    """Subclasses define ``encode`` and the ``decoder`` (Linear, no bias) and ``b_dec`` parameters."""

    decoder: nn.Linear
    b_dec: nn.Parameter

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_BF) + self.b_dec

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat
