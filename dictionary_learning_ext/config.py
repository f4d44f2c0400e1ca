"""Typed, validating configs: trainer configs here, and the helpers every config dataclass of the
project uses (the run configuration, study definitions, eval profiles).

A config is a dataclass built with ``from_dict``: unknown keys raise, missing required keys raise,
every field is checked against its type (``Literal[...]`` choices included) before the ranges are,
and 0 is a value like any other (no ``x or default``). Each field is documented by the string under
it; ``field_docs`` reads those strings (the command-line help is generated from them).
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, Optional, Union

from .errors import ConfigError

# Keys that dictionary_learning's trainSAE and this project's run folders carry beside the hyper-parameters.
BOOKKEEPING_KEYS = ("trainer_class", "dict_class", "norm_factor", "architecture", "variant")


# --- field documentation and types, for any config dataclass -------------------------------------
@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # built with make_dataclass, or a builtin: no source
            continue
        body = ast.parse(source).body
        if not body or not isinstance(body[0], ast.ClassDef):
            continue
        statements = body[0].body
        for stmt, nxt in zip(statements, statements[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (annotations may be strings)."""
    return typing.get_type_hints(cls)


def literal_choices(hint: Any) -> Optional[tuple[Any, ...]]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) hint, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else []
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (bool, int, float, str, Literal, Optional/Union, tuple[X, ...],
    Mapping); hints this does not understand accept anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(hint))
    if _is_union(hint):
        return any(matches_type(value, a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches_type(v, args[0]) for v in value)
        return len(args) == len(value) and all(matches_type(v, a) for v, a in zip(value, args))
    if origin in (dict, collections.abc.Mapping) or hint in (dict, Mapping):
        return isinstance(value, collections.abc.Mapping)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_error(cfg: Any, name: str, value: Any, hint: Any) -> ConfigError:
    """The message for a field whose value does not fit its type."""
    where = f"{type(cfg).__name__}.{name}"
    choices = literal_choices(hint)
    if choices is not None:
        allowed = list(choices) + ([None] if _is_union(hint) else [])
        return ConfigError(f"{where}={value!r} must be one of {allowed}")
    plain = {bool: "a bool", int: "an int", float: "a number", str: "a string"}
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    what = " or ".join(plain.get(a, getattr(a, "__name__", str(a))) for a in args)
    if _is_union(hint):
        what += " or None"
    return ConfigError(f"{where} must be {what}, got {value!r}")


def check_field_types(cfg: Any) -> None:
    """Every field of dataclass ``cfg`` against its type hint; a field's own default always passes
    (libraries annotate e.g. ``seed: int = None``)."""
    hints = field_types(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING and value is f.default:
            continue
        hint = hints.get(f.name, Any)
        if not matches_type(value, hint):
            raise type_error(cfg, f.name, value, hint)


def dataclass_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` after naming unknown and missing keys (the checks of ``cls`` then run)."""
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    missing = [f.name for f in fields(cls) if f.init and _is_required(f) and f.name not in values]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing required key(s) {missing}")
    return cls(**dict(values))


# --- trainer configs ---------------------------------------------------------------------------
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
        return dataclass_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        check_field_types(self)
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
    """Adam learning rate (the paper's gelu-1l setting)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (dictionary_learning's schedule)."""
    decay_start: Optional[int] = None
    """Step at which the learning rate starts decaying linearly to 0 (None: never)."""
    seed: Optional[int] = None
    """Seeds the initial weights and the training noise."""
    device: Optional[str] = None
    """Torch device; None picks cuda when available."""
    wandb_name: str = "trainer"
    """Run name on Weights & Biases."""
    submodule_name: Optional[str] = None
    """Name of the hooked submodule (dictionary_learning records it)."""
    dead_window_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead (dictionary_learning's window)."""
    grad_clip_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    b_dec_init: Literal["geometric_median", "zero"] = "geometric_median"
    """How b_dec starts: set to the geometric median of the first batch at step 0 (Gao et al. 2024), or left
    at its initial 0 ("zero"; the authors' VSAETopK, whose decoder bias starts at 0)."""

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
    specs, seen = [], set()
    # A subclass may add keyword arguments and pass the rest on (*args, **kwargs): read every class's.
    params = [p for klass in trainer_class.__mro__ if "__init__" in vars(klass)
              for p in inspect.signature(klass.__init__).parameters.values()]
    for p in params:
        if p.name in ("self", "dict_class") or p.name in base_names or p.name in seen:
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        seen.add(p.name)
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
