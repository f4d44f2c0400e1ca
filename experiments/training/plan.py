"""What a run trains: one trainer per (architecture spec, k), in trainer_i order, and the trainer
config dict of each (through the registry, with the run's options and ``--set`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Optional

from dictionary_learning_ext.config import parse_value
from dictionary_learning_ext.errors import ConfigError, UsageError
from dictionary_learning_ext.registry import DEFAULT_VARIANT, ARCHITECTURES, Architecture, parse_spec

from experiments.training.config import SET_BY_OPTIONS, RunConfig, flag, protocol

# dictionary_learning's defaults assume 10k+ steps; in shorter runs they are scaled to a tenth of the run.
STEP_DEFAULTS_TO_FIT = ("warmup_steps", "sparsity_warmup_steps", "threshold_start_step")


@dataclass(frozen=True)
class PlannedTrainer:
    index: int
    architecture: str
    """Registry name."""
    variant: str
    """Registry variant ("default", "paper", "paper+auxk", ...)."""
    k: Optional[int]
    """None for architectures without a k."""

    @property
    def trainer(self) -> str:
        """The trainer's folder name in the run (dictionary_learning's layout)."""
        return f"trainer_{self.index}"

    @property
    def label(self) -> str:
        """``name`` or ``name:variant``, as on the command line."""
        return self.architecture if self.variant == DEFAULT_VARIANT else f"{self.architecture}:{self.variant}"

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]


def plan_trainers(config: RunConfig) -> list[PlannedTrainer]:
    """One trainer per architecture spec, swept over the run's k when the architecture has a k."""
    plan: list[PlannedTrainer] = []
    for spec in config.architectures:
        arch, variant = parse_spec(spec)
        for k in (config.ks if "k" in arch.field_names else [None]):
            plan.append(PlannedTrainer(len(plan), arch.name, variant, k))
    return plan


def parse_overrides(items: Iterable[str]) -> list[tuple[Optional[str], str, Any]]:
    """``[ARCH.]KEY=VALUE`` strings -> (architecture or None, key, JSON value)."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected [ARCH.]KEY=VALUE, e.g. --set vsae_topk.beta=0.5")
        arch, _, key = key.rpartition(".")
        if key in SET_BY_OPTIONS:
            raise UsageError(f"--set {item!r}: {key} is set by {SET_BY_OPTIONS[key]}; use that instead of --set")
        if arch and arch not in ARCHITECTURES:
            raise UsageError(f"--set {item!r}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        parsed.append((arch or None, key, parse_value(raw)))
    return parsed


def check_overrides_apply(config: RunConfig) -> None:
    """Every ``--set`` key names a field of an architecture it applies to (checked before any model loads)."""
    specs = [parse_spec(spec)[0] for spec in config.architectures]
    for item, (arch_name, key, _) in zip(config.overrides, parse_overrides(config.overrides)):
        targets = [ARCHITECTURES[arch_name]] if arch_name else specs
        if targets and not any(key in arch.field_names for arch in targets):
            where = targets[0].config_class.__name__ if arch_name else "the chosen architectures"
            fields_ = sorted(set().union(*(arch.field_names for arch in targets)) - set(SET_BY_OPTIONS))
            raise UsageError(f"--set {item!r}: key(s) [{key!r}] match no field of {where}; fields: {fields_}")


def protocol_values(config: RunConfig, t: PlannedTrainer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer config values the run's protocol sets for ``t``, and the ones its variant keeps
    against the protocol (protocol key -> the protocol's value), a declared departure.

    Raises ConfigError when the architecture cannot honour a protocol option (e.g. auxK above 0 on an
    architecture without auxK)."""
    arch = t.arch
    keeps = arch.variant_keeps(t.variant)
    values: dict[str, Any] = {}
    departures: dict[str, Any] = {}
    for name, value in protocol(config).items():
        key = PROTOCOL_KEYS[name]
        setting = round(value * config.steps) if name in ("warmup_frac", "decay_frac") else value
        if key in keeps:
            departures[key] = setting
        elif key in arch.field_names:
            values[key] = setting
        elif not _irrelevant(name, value, arch):
            raise ConfigError(
                f"the protocol's {flag(name)} {value} cannot be honoured by {t.label}: {arch.config_class.__name__} "
                f"has no {key!r}. Drop that architecture from the run, or set {flag(name)} to what it can honour"
                + (" (0: auxK off everywhere)" if name == "auxk_alpha" else "")
            )
    return values, departures


# Protocol option -> the trainer config field it sets.
PROTOCOL_KEYS = {"lr": "lr", "warmup_frac": "warmup_steps", "decay_frac": "decay_start", "auxk_alpha": "auxk_alpha",
                 "dead_window_tokens": "dead_window_tokens"}


def _irrelevant(name: str, value: Any, arch: Architecture) -> bool:
    """A protocol option an architecture meets by not having the mechanism at all."""
    if name == "auxk_alpha":
        return value == 0  # auxK off: nothing to switch off
    if name == "dead_window_tokens":
        return "auxk_alpha" not in arch.field_names  # the window only selects auxK's latents
    return False


def check_protocol_honoured(config: RunConfig) -> None:
    """Every planned trainer can honour the run's protocol (checked before any model loads)."""
    for t in plan_trainers(config):
        protocol_values(config, t)


def fitted_step_defaults(arch: Architecture, steps: int) -> dict[str, int]:
    """Step-count defaults of ``arch`` that do not fit in a run of ``steps``, set to a tenth of it."""
    return {
        f.name: steps // 10
        for f in fields(arch.config_class)
        if f.name in STEP_DEFAULTS_TO_FIT and isinstance(f.default, int) and f.default >= steps
    }


def trainer_configs(config: RunConfig, plan: list[PlannedTrainer], d_model: int, lm_name: str) -> list[dict[str, Any]]:
    """One trainSAE config dict per planned trainer; validated through the registry."""
    dict_size = config.dict_size if config.dict_size is not None else 4 * d_model
    overrides = parse_overrides(config.overrides)
    configs = []
    for t in plan:
        arch = t.arch
        values: dict[str, Any] = dict(
            steps=config.steps, activation_dim=d_model, dict_size=dict_size, layer=config.layer, lm_name=lm_name,
            device=config.device, seed=config.seed,
        )
        if t.k is not None:
            values["k"] = t.k
        values.update(fitted_step_defaults(arch, config.steps))
        values.update(protocol_values(config, t)[0])
        for arch_name, key, value in overrides:  # each key names a field of some target (checked by the config)
            if arch_name in (None, t.architecture) and key in arch.field_names:
                values[key] = value
        variant_tag = "" if t.variant == DEFAULT_VARIANT else "_" + t.variant
        values["wandb_name"] = f"{t.architecture}{variant_tag}{f'_k{t.k}' if t.k else ''}"
        configs.append(arch.trainer_config(t.variant, **values))
    return configs
