"""What this package's trainers share: config parsing, optimiser, schedule, the decoder
unit-norm constraint (unless the dictionary declares ``unit_norm_decoder = False``), geometric-median
init of b_dec (``b_dec_init``) and dead-latent bookkeeping.

A trainer here satisfies dictionary_learning's duck-typed interface (constructor from the
config dict, ``.ae``, ``.update(step, x)``, ``.loss(x, step=, logging=)``, ``.config``,
``.logging_parameters``), so it goes straight into ``dictionary_learning.training.trainSAE``.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, ClassVar, Mapping

import torch
from dictionary_learning.trainers.top_k import geometric_median
from dictionary_learning.trainers.trainer import (
    SAETrainer,
    get_lr_schedule,
    set_decoder_norm_to_unit_norm,
)

from .config import BOOKKEEPING_KEYS, SAETrainerConfig
from .errors import CheckpointError, ConfigError, NonFiniteError
from .latent_activity import LatentActivityTracker
from .linear_decoder import load_checked

LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])


def check_activations(x_BD: torch.Tensor, activation_dim: int, step: int | None = None) -> None:
    where = f" at step {step}" if step is not None else ""
    if x_BD.ndim != 2 or x_BD.shape[-1] != activation_dim:
        raise ValueError(
            f"activation batch{where} has shape {tuple(x_BD.shape)}; expected (batch, {activation_dim}). "
            "Check that activation_dim matches the model's width at the chosen layer."
        )
    if not torch.isfinite(x_BD).all():
        bad = int((~torch.isfinite(x_BD)).any(dim=-1).sum())
        raise NonFiniteError(
            f"activation batch{where} contains NaN/Inf in {bad} of {x_BD.shape[0]} rows; "
            "the model or buffer produced non-finite activations (check the model dtype)."
        )


@torch.no_grad()
def remove_parallel_decoder_grad_(W_dec_DF: torch.Tensor, grad_DF: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's remove_gradient_parallel_to_decoder_directions, same math, in place.

    Theirs runs an einops einsum that becomes F tiny batched matmuls (~100 ms per step on this
    CPU at F = 2048, more than the rest of a k-sparse step); this is two elementwise passes.
    """
    normed_DF = W_dec_DF / (W_dec_DF.norm(dim=0, keepdim=True) + 1e-6)
    grad_DF -= (grad_DF * normed_DF).sum(dim=0, keepdim=True) * normed_DF
    return grad_DF


class ExtTrainer(SAETrainer):
    """Base for this package's trainers. Subclasses set ``config_class`` and ``dict_class``,
    implement ``build_dictionary`` and ``loss``."""

    config_class: ClassVar[type[SAETrainerConfig]]
    dict_class: ClassVar[type]

    def __init__(self, **kwargs: Any):
        given_dict_class = kwargs.pop("dict_class", self.dict_class)
        if given_dict_class not in (self.dict_class, self.dict_class.__name__):
            raise ConfigError(
                f"{type(self).__name__} trains {self.dict_class.__name__}, got dict_class={given_dict_class!r}"
            )
        self.cfg = self.config_class.from_dict(kwargs)
        super().__init__(self.cfg.seed)
        self.device = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        self.ae = self.build_dictionary().to(self.device)
        # Own generator: several trainers stepping on one batch must not share noise draws.
        self.generator = torch.Generator(device=self.device)
        # Unseeded: draw from the global RNG (torch.seed() would reseed it as a side effect).
        seed = self.cfg.seed if self.cfg.seed is not None else int(torch.randint(0, 2**62, ()))
        self.generator.manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=get_lr_schedule(self.cfg.steps, self.cfg.warmup_steps, self.cfg.decay_start)
        )
        self.activity = LatentActivityTracker(self.cfg.dict_size, self.cfg.dead_window_tokens, self.device)
        self.logging_parameters = ["frac_alive", "dead_features"]
        # trainSAE writes e.g. config["norm_factor"] into trainer.config: one dict, so writes stick.
        self._config = {
            "trainer_class": type(self).__name__,
            "dict_class": self.dict_class.__name__,
            **self.cfg.to_dict(),
            "device": self.device,
        }

    # --- subclass hooks -------------------------------------------------------------
    @staticmethod
    def dictionary_kwargs(cfg: SAETrainerConfig) -> dict[str, Any]:
        """Constructor kwargs of ``dict_class`` implied by a config (also used when loading)."""
        raise NotImplementedError

    def build_dictionary(self) -> torch.nn.Module:
        return self.dict_class(**self.dictionary_kwargs(self.cfg))

    def compute_loss(self, x_BD: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """One forward pass: (loss, x_hat_BD, training codes f_BF, named loss terms)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        loss, x_hat, f, terms = self.compute_loss(x, 0 if step is None else step)
        if not logging:
            return loss
        values = {k: (v.item() if isinstance(v, torch.Tensor) else float(v)) for k, v in terms.items()}
        return LossLog(x, x_hat, f, {**values, "loss": loss.item()})

    # --- logging --------------------------------------------------------------------
    @property
    def frac_alive(self) -> float:
        return self.activity.frac_alive()

    @property
    def dead_features(self) -> int:
        return int(self.activity.dead_mask().sum())

    # --- one optimisation step ------------------------------------------------------
    def update(self, step: int, x: torch.Tensor) -> float:
        x = x.to(self.device)
        check_activations(x, self.cfg.activation_dim, step)
        if step == 0 and self.cfg.b_dec_init == "geometric_median":
            # Geometric median of the first batch: a robust centre for b_dec (Gao et al. 2024).
            self.ae.b_dec.data = geometric_median(x.float()).to(self.ae.b_dec.dtype)
        loss, _, f_BF, _ = self.compute_loss(x, step)
        # Counted here, not in loss(): trainSAE's logging calls loss() a second time per step.
        self.activity.update_from_codes(f_BF.detach())
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"{type(self).__name__}: loss became {loss.item()} at step {step}; lower the learning "
                "rate or check the activations. The weights before this step are unchanged."
            )
        loss.backward()
        W_dec_DF = self.ae.decoder.weight
        # A dictionary may declare a free decoder (unit_norm_decoder=False, e.g. VSAETopK's "authors"
        # variant): then its gradient is not projected and its atoms are not renormalised.
        unit_norm = getattr(self.ae, "unit_norm_decoder", True)
        if unit_norm and W_dec_DF.grad is not None:
            remove_parallel_decoder_grad_(W_dec_DF, W_dec_DF.grad)
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if unit_norm:
            # Unit-norm atoms: otherwise the KL/L1 can be met by shrinking codes and growing atoms.
            W_dec_DF.data = set_decoder_norm_to_unit_norm(W_dec_DF, self.cfg.activation_dim, self.cfg.dict_size)
        return loss.item()

    # --- resumable state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything training changes: weights, Adam moments, LR-schedule position, dead-latent
        counters, the noise generator and plain attributes (beta is recomputed from the step)."""
        return trainer_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_trainer_state_dict(self, state)

    # --- config, as written to config.json by trainSAE --------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @classmethod
    def hyperparameters(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor kwargs contained in a saved ``config["trainer"]`` dict."""
        return {k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}

    @classmethod
    def config_from_saved(cls, config: Mapping[str, Any]) -> SAETrainerConfig:
        return cls.config_class.from_dict(cls.hyperparameters(config))


# --- resumable state of any trainer (ours or dictionary_learning's) -----------------------
# dictionary_learning's trainers have no state_dict; their state is spread over attributes
# (TopKTrainer.num_tokens_since_fired, gated_anneal's sparsity queue, ...), so it is collected
# generically: sub-objects with a state_dict, generators, tensors and plain values.
_NOT_STATE = frozenset({"cfg", "_config", "logging_parameters", "device", "seed"})
_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def trainer_state_dict(trainer: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A torch-saveable (``weights_only``) snapshot of ``trainer``'s mutable state."""
    objects, generators, tensors, plain = {}, {}, {}, {}
    for name, value in vars(trainer).items():
        if name in _NOT_STATE or name in exclude:
            continue
        if isinstance(value, torch.Generator):
            generators[name] = value.get_state()
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().clone()
        elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
            objects[name] = _detached(value.state_dict())
        elif _is_plain(value):
            plain[name] = value
        elif not callable(value):  # schedules (step -> value) are functions: stateless
            # Silently dropping it would make a resumed run diverge without notice.
            raise TypeError(
                f"cannot checkpoint {type(trainer).__name__}.{name} ({type(value).__name__}); store trainer "
                "state as tensors, plain values or objects with state_dict/load_state_dict"
            )
    return {"trainer_class": type(trainer).__name__, "objects": objects, "generators": generators,
            "tensors": tensors, "plain": plain}


def _detached(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_detached(v) for v in state)
    return state


def load_trainer_state_dict(trainer: Any, state: Mapping[str, Any]) -> None:
    """Restore what ``trainer_state_dict`` saved into a trainer built from the same config."""
    name = type(trainer).__name__
    if state.get("trainer_class") != name:
        raise CheckpointError(
            f"checkpoint holds the state of a {state.get('trainer_class')!r}, not of a {name}; it belongs "
            "to a different run or trainer order"
        )
    groups = ("objects", "generators", "tensors", "plain")
    # Compared by name across groups: an attribute may be a tensor at one step and -1 at another
    # (TopKTrainer.pre_norm_auxk_loss).
    expected = {a for g in groups for a in trainer_state_dict(trainer)[g]}
    saved = {a for g in groups for a in state.get(g, {})}
    if expected != saved:
        raise CheckpointError(
            f"{name} checkpoint does not match this trainer: missing {sorted(expected - saved)}, unexpected "
            f"{sorted(saved - expected)}; it was written by a different version or configuration"
        )
    for attr, sub_state in state.get("objects", {}).items():
        target = getattr(trainer, attr)
        if isinstance(target, torch.nn.Module):
            load_checked(target, sub_state, f"{name}.{attr} in the checkpoint")
        else:
            try:
                target.load_state_dict(sub_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"{name}.{attr} state does not fit this trainer: {err}") from err
    for attr, gen_state in state.get("generators", {}).items():
        getattr(trainer, attr).set_state(gen_state)
    for attr, value in state.get("tensors", {}).items():
        current = getattr(trainer, attr)
        if not isinstance(current, torch.Tensor):
            setattr(trainer, attr, value)
            continue
        if current.shape != value.shape:
            raise CheckpointError(
                f"{name}.{attr}: checkpoint shape {tuple(value.shape)} vs {tuple(current.shape)}; the "
                "checkpoint was written with a different config"
            )
        setattr(trainer, attr, value.to(device=current.device, dtype=current.dtype))
    for attr, value in state.get("plain", {}).items():
        setattr(trainer, attr, value)
