"""The decoder side every dictionary of this package shares with dictionary_learning's:
x_hat = W_dec f + b_dec, and ``forward`` = decode(encode(x)) (optionally returning the codes)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from dictionary_learning.dictionary import Dictionary

from .errors import CheckpointError


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

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, **kwargs: Any) -> "LinearDecoderDictionary":
        """Load ``ae.pt``; ``kwargs`` are the constructor arguments (the trainer's ``dictionary_kwargs``;
        ``dictionary_learning_ext.load_dictionary`` fills them from config.json)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**kwargs)
        load_checked(model, state, path)
        return model.to(device) if device is not None else model


def load_checked(model: nn.Module, state: dict, path: str) -> None:
    """load_state_dict with an error that says which file and what to do."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match its config for {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {wrong}. The config.json beside it must be "
            "the one written by the run that produced these weights."
        )
    model.load_state_dict(state)
