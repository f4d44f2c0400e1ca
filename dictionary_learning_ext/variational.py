"""The Gaussian encoder shared by VSAE and VSAETopK, and their common config fields.

mu = act(W_enc (x - b_dec) + b_enc), log sigma^2 fixed (``2 log sigma``) or from a separate
head, decoder rows at unit norm. ``encode`` never samples: sampling happens only in the
trainers' loss, so evaluation (dictionary_learning's ``evaluate``, SAEBench) is deterministic.

Construction options, all defaulting to the above (a config that wants them passes them on, e.g.
VSAETopK's ``authors`` variant): ``center_input`` (False: mu = act(W_enc x + b_enc), b_dec is then only
the decoder's output bias), ``unit_norm_decoder`` (False: the dictionary declares a free decoder, which
``ExtTrainer.update`` leaves unconstrained and the SAEBench wrapper presents as trained),
``decoder_init`` / ``init_norm`` (directions and norm of the initial atoms; the encoder starts as their
transpose) and ``weights_dtype`` (the parameters' dtype; inputs are cast to it, as in the authors' code).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from dictionary_learning.trainers.trainer import set_decoder_norm_to_unit_norm

from .config import SAETrainerConfig, check_float
from .errors import ConfigError
from .linear_decoder import LinearDecoderDictionary
from .schedules import linear_warmup

MEAN_ACTIVATIONS = {"relu": torch.relu, "identity": lambda t: t}
MeanActivation = Literal["relu", "identity"]
DecoderInit = Literal["kaiming_uniform", "gaussian"]
WeightsDtype = Literal["float32", "bfloat16"]


@dataclass
class VariationalConfig(SAETrainerConfig):
    beta: float = 1.0
    """Final KL coefficient (the paper's beta = 1)."""
    kl_warmup_frac: float = 0.1
    """Fraction of steps over which beta rises linearly from 0 (0: no warm-up)."""
    sigma: float = 1.0
    """Posterior standard deviation when it is fixed (the paper: 1)."""
    learned_var: bool = False
    """Learn log sigma^2 per input with a separate linear head."""
    log_var_init: float = 0.0
    """Initial log sigma^2 of the learned head (bias; its weights start at 0)."""
    log_var_min: float = -10.0
    """Clamp of the learned log sigma^2, keeping exp() and the KL finite."""
    log_var_max: float = 4.0
    """Upper clamp of the learned log sigma^2."""

    def validate(self) -> None:
        super().validate()
        check_float(self, "beta", minimum=0.0)
        check_float(self, "kl_warmup_frac", minimum=0.0, maximum=1.0)
        check_float(self, "sigma", minimum=0.0, strict=True)
        for name in ("log_var_init", "log_var_min", "log_var_max"):
            check_float(self, name)
        if not self.log_var_min <= self.log_var_init <= self.log_var_max:
            raise ConfigError(
                f"{type(self).__name__}: need log_var_min <= log_var_init <= log_var_max, got "
                f"{self.log_var_min}, {self.log_var_init}, {self.log_var_max}"
            )

    def beta_schedule(self):
        return linear_warmup(self.beta, self.kl_warmup_frac, self.steps)

    def variational_kwargs(self) -> dict:
        return dict(
            activation_dim=self.activation_dim,
            dict_size=self.dict_size,
            sigma=self.sigma,
            learned_var=self.learned_var,
            log_var_init=self.log_var_init,
            log_var_min=self.log_var_min,
            log_var_max=self.log_var_max,
        )


class VariationalDictionary(LinearDecoderDictionary):
    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        mean_activation: str = "identity",
        sigma: float = 1.0,
        learned_var: bool = False,
        log_var_init: float = 0.0,
        log_var_min: float = -10.0,
        log_var_max: float = 4.0,
        center_input: bool = True,
        unit_norm_decoder: bool = True,
        decoder_init: DecoderInit = "kaiming_uniform",
        init_norm: float = 1.0,
        weights_dtype: WeightsDtype = "float32",
    ):
        super().__init__()
        if mean_activation not in MEAN_ACTIVATIONS:
            raise ValueError(f"mean_activation={mean_activation!r} must be one of {list(MEAN_ACTIVATIONS)}")
        for name, value, hint in (("decoder_init", decoder_init, DecoderInit),
                                  ("weights_dtype", weights_dtype, WeightsDtype)):
            if value not in typing.get_args(hint):
                raise ValueError(f"{name}={value!r} must be one of {list(typing.get_args(hint))}")
        if not init_norm > 0 or not math.isfinite(init_norm):
            raise ValueError(f"init_norm={init_norm} must be a finite number > 0")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.mean_activation = mean_activation
        self.learned_var = learned_var
        # False: the encoder reads x itself, not x - b_dec (the SAEBench wrapper reads this too).
        self.center_input = bool(center_input)
        # False declares a free decoder: ExtTrainer.update neither projects its gradient nor renormalises it,
        # and the SAEBench wrapper evaluates it as trained.
        self.unit_norm_decoder = bool(unit_norm_decoder)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        if decoder_init == "gaussian":
            # Isotropic directions: randn atoms normalised (the authors' VSAETopK._init_weights,
            # dictionary_learning/trainers/vsae_topk.py), drawn after nn.Linear's own init.
            w_DF = torch.randn(activation_dim, dict_size)
            self.decoder.weight.data = w_DF / w_DF.norm(dim=0, keepdim=True)
        else:
            self.decoder.weight.data = set_decoder_norm_to_unit_norm(self.decoder.weight, activation_dim, dict_size)
        self.decoder.weight.data *= init_norm  # exact for 1.0
        self.encoder = nn.Linear(activation_dim, dict_size)
        self.encoder.weight.data = self.decoder.weight.T.clone()
        self.encoder.bias.data.zero_()
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        # Buffers, so ae.pt describes itself and scale_biases can fold normalisation into them.
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.register_buffer("log_var_bounds", torch.tensor([float(log_var_min), float(log_var_max)]))
        if learned_var:
            self.log_var_head = nn.Linear(activation_dim, dict_size)
            nn.init.zeros_(self.log_var_head.weight)  # starts as the fixed variance exp(log_var_init)
            nn.init.constant_(self.log_var_head.bias, log_var_init)
        if weights_dtype != "float32":  # parameters only: the sigma/log-var bound buffers stay float32
            dtype = getattr(torch, weights_dtype)
            for param in self.parameters():
                param.data = param.data.to(dtype)

    # --- posterior ---------------------------------------------------------------------
    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What the encoder heads read: x - b_dec, or x itself (``center_input=False``), in the weights'
        dtype (a no-op for float32 weights; bfloat16 weights read bfloat16 inputs, as the authors' code)."""
        x_BD = x_BD.to(self.encoder.weight.dtype)
        return x_BD - self.b_dec if self.center_input else x_BD

    def mean(self, x_BD: torch.Tensor) -> torch.Tensor:
        return MEAN_ACTIVATIONS[self.mean_activation](self.encoder(self.encoder_input(x_BD)))

    def log_var(self, x_BD: torch.Tensor, mu_BF: torch.Tensor) -> torch.Tensor:
        if self.learned_var:
            lo, hi = self.log_var_bounds.tolist()
            return self.log_var_head(self.encoder_input(x_BD)).clamp(lo, hi)
        return torch.full_like(mu_BF, 2.0 * math.log(self.sigma.item()))

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_BF.to(self.decoder.weight.dtype)) + self.b_dec

    def posterior(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_BF = self.mean(x_BD)
        return mu_BF, self.log_var(x_BD, mu_BF)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Fold an activation scale into the weights (dictionary_learning's convention):
        afterwards the dictionary maps raw activations exactly as it mapped scaled ones."""
        self.encoder.bias.data *= scale
        self.b_dec.data *= scale
        self.sigma *= scale
        if self.learned_var:
            shift = 2.0 * math.log(scale)
            self.log_var_head.weight.data /= scale
            self.log_var_head.bias.data += shift
            self.log_var_bounds += shift
