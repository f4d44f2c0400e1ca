"""Typed, validating trainer configs.

Every trainer config is a dataclass built with ``from_dict``: unknown keys raise, missing
required keys raise, and 0 is a value like any other (no ``x or default``).
"""

from __future__ import annotations

import dataclasses
import json
import inspect
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A trainer config that cannot be used; the message names the key and the fix."""


# Keys that dictionary_learning's trainSAE and checkpoints carry beside the hyper-parameters.
BOOKKEEPING_KEYS = ("trainer_class", "dict_class", "norm_factor")


@dataclass
class TrainerConfig:
    """Fields every trainer shares (the dictionary_learning trainer interface)."""

    steps: int
    """Total number of training steps."""
    activation_dim: int
    """Width of the activations (d_model at the chosen site)."""
    dict_size: int
    """Number of latents."""
    layer: int
    """Layer of the language model the activations come from (read by SAEBench)."""
    lm_name: str
    """Name of the language model (read by SAEBench's loaders)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainerConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}"
            )
        required = [f.name for f in fields(cls) if _is_required(f)]
        missing = [n for n in required if n not in values]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required key(s) {missing}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_int(self, "steps", minimum=1)
        check_int(self, "activation_dim", minimum=1)
        check_int(self, "dict_size", minimum=1)
        check_int(self, "layer", minimum=0)
        if not isinstance(self.lm_name, str) or not self.lm_name:
            raise ConfigError(f"{type(self).__name__}.lm_name must be a non-empty string")


@dataclass
class SAETrainerConfig(TrainerConfig):
    """Optimisation settings shared by this package's trainers."""

    lr: float = 8e-4
    """Adam learning rate (the paper's gelu-1l preset)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (dictionary_learning's schedule)."""
    decay_start: Optional[int] = None
    """Step at which the learning rate starts decaying linearly to 0 (None: never)."""
    seed: Optional[int] = None
    """Seeds the initial weights and the training noise."""
    device: Optional[str] = None
    """Torch device; None picks cuda when available."""
    wandb_name: str = "trainer"
    submodule_name: Optional[str] = None
    dead_window_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead (dictionary_learning's window)."""
    grad_clip_norm: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_float(self, "lr", minimum=0.0, strict=True)
        check_int(self, "warmup_steps", minimum=0)
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"{type(self).__name__}.warmup_steps={self.warmup_steps} must be < steps={self.steps}"
            )
        if self.decay_start is not None:
            check_int(self, "decay_start", minimum=0)
            if not self.warmup_steps < self.decay_start < self.steps:
                raise ConfigError(
                    f"{type(self).__name__}.decay_start={self.decay_start} must lie in "
                    f"(warmup_steps={self.warmup_steps}, steps={self.steps})"
                )
        if self.seed is not None:
            check_int(self, "seed", minimum=0)
        check_int(self, "dead_window_tokens", minimum=1)
        check_float(self, "grad_clip_norm", minimum=0.0, strict=True)


def parse_value(raw: str) -> Any:
    """A ``KEY=VALUE`` override's value from a command line: JSON (0.5, true, [32, 64]) or else the bare
    string (``select_on=mean``)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def check_int(cfg: Any, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be <= {maximum}")


def check_float(
    cfg: Any,
    name: str,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    strict: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be {op} {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{type(cfg).__name__}.{name}={value} must be <= {maximum}")


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} must be one of {list(choices)}")


def check_k(cfg: Any) -> None:
    check_int(cfg, "k", minimum=1)
    if cfg.k > cfg.dict_size:
        raise ConfigError(f"{type(cfg).__name__}.k={cfg.k} must be <= dict_size={cfg.dict_size}")


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def config_from_signature(trainer_class: type, name: str, extra_checks=()) -> type[TrainerConfig]:
    """A TrainerConfig subclass mirroring a dictionary_learning trainer's constructor.

    dictionary_learning's trainers take plain keyword arguments; deriving the dataclass from
    the signature keeps the two in step instead of copying every default by hand.
    """
    base_names = {f.name for f in fields(TrainerConfig)}
    specs = []
    for p in inspect.signature(trainer_class.__init__).parameters.values():
        if p.name in ("self", "dict_class") or p.name in base_names:
            continue
        annotation = p.annotation if p.annotation is not inspect.Parameter.empty else Any
        # kw_only lets required fields (e.g. k) follow the base class's defaulted ones.
        if p.default is inspect.Parameter.empty:
            specs.append((p.name, annotation, dataclasses.field(kw_only=True)))
        else:
            specs.append((p.name, annotation, dataclasses.field(default=p.default, kw_only=True)))

    def validate(self) -> None:
        TrainerConfig.validate(self)
        for key in ("warmup_steps", "sparsity_warmup_steps"):
            # dictionary_learning asserts these deep inside its schedules; say it up front.
            value = getattr(self, key, None)
            if value is not None and not 0 <= value < self.steps:
                raise ConfigError(f"{name}.{key}={value} must be >= 0 and < steps={self.steps}")
        if getattr(self, "lr", None) is not None:
            check_float(self, "lr", minimum=0.0, strict=True)
        for check in extra_checks:
            check(self)

    return dataclasses.make_dataclass(name, specs, bases=(TrainerConfig,), namespace={"validate": validate})
