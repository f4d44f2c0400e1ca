"""Models the eval runner can load by name: a small registry, filled by plugins.

The library knows no model of its own. An application registers its models through the entry-point
group ``saebench_adapters.models``: each entry point names a zero-argument callable returning a
``ModelSpec`` (or a list of them), e.g. in ``pyproject.toml``::

    [project.entry-points."saebench_adapters.models"]
    vsae-gelu-1l = "experiments.lm.registration:default_model_spec"

``find_model`` and ``registered_models`` load those plugins (once per process) before answering;
``register_model`` adds a spec directly. A name nobody registered is left to SAEBench, which loads it
from the hub itself.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from dictionary_learning_ext.errors import ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ENTRY_POINT_GROUP = "saebench_adapters.models"


@dataclass(frozen=True)
class ModelSpec:
    """How to load one language model for SAEBench's evals."""

    name: str
    """The lm_name SAE configs record and the name SAEBench is given."""
    load: Callable[[int, str], "HookedTransformer"]
    """(layer, device) -> the model, with unprocessed weights (like ``from_pretrained_no_processing``)."""
    aliases: tuple[str, ...] = ()
    """Other names that select this model on command lines (e.g. "default")."""
    d_model: Optional[int] = None
    """Residual stream width, for SAEBench's ``MODEL_CONFIGS`` (None: unknown)."""
    n_layers: Optional[int] = None
    """Number of blocks, for SAEBench's ``MODEL_CONFIGS`` (None: unknown)."""
    standins: bool = True
    """Evaluated offline on the generated stand-in datasets by default (not on SAEBench's hub datasets)."""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class EvalModel:
    """The model a set of evals runs on, resolved from what the caller passed."""

    name: str
    """The name SAEBench's eval configs carry (and the SAEs' lm_name must match)."""
    hooked: Optional["HookedTransformer"]
    """The model object handed to the evals; None: SAEBench loads ``name`` from the hub itself."""
    standins: bool
    """Whether to use the stand-in datasets unless the caller says otherwise."""


_SPECS: dict[str, ModelSpec] = {}  # every name and alias -> its spec
_plugin_errors: dict[str, str] = {}  # "name = module:attr" -> why it failed
_plugins_loaded = False


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` findable by its name and aliases; registering the same spec again is a no-op."""
    for key in spec.names:
        other = _SPECS.get(key)
        if other is not None and other != spec:
            raise ConfigError(f"model {spec.name!r}: the name {key!r} is already registered for model {other.name!r}")
    for key in spec.names:
        _SPECS[key] = spec
    return spec


def registered_models() -> dict[str, ModelSpec]:
    """Every registered model by its name (aliases not repeated), plugins included."""
    _load_plugins()
    return {spec.name: spec for spec in _SPECS.values()}


def find_model(name_or_alias: str) -> Optional[ModelSpec]:
    """The spec registered under ``name_or_alias``, or None if there is none.

    Raises ``ConfigError`` if the name is not registered and a model plugin failed to load: the
    missing name may be one that plugin would have provided.
    """
    _load_plugins()
    spec = _SPECS.get(name_or_alias)
    if spec is None and _plugin_errors:
        failures = "; ".join(f"{ep}: {err}" for ep, err in _plugin_errors.items())
        raise ConfigError(
            f"model {name_or_alias!r} is not registered, and model plugins of the entry-point group "
            f"{ENTRY_POINT_GROUP!r} failed to load ({failures}). Fix the plugin, or reinstall the project "
            "(pip install -e .) if its entry points are stale."
        )
    return spec


def resolve_model(model: Any, layer: int, device: str) -> EvalModel:
    """What the evals run on, from a registered name or alias (loaded through its spec), a
    ``HookedTransformer`` object (evaluated as given, on stand-ins), or any other name (left to SAEBench)."""
    if not isinstance(model, str):
        return EvalModel(name=model.cfg.model_name, hooked=model, standins=True)
    spec = find_model(model)
    if spec is None:
        return EvalModel(name=model, hooked=None, standins=False)
    return EvalModel(name=spec.name, hooked=spec.load(layer, device), standins=spec.standins)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    seen = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"{ep.name} = {ep.value}"
        if label in seen:  # an editable install can list its metadata twice
            continue
        seen.add(label)
        try:
            provided = ep.load()()
            specs = provided if isinstance(provided, (list, tuple)) else [provided]
            for spec in specs:
                if not isinstance(spec, ModelSpec):
                    raise ConfigError(f"returned {type(spec).__name__}, not a ModelSpec")
                register_model(spec)
        except Exception as err:  # noqa: BLE001 - reported when a model is asked for, not at import
            _plugin_errors[label] = f"{type(err).__name__}: {err}"
