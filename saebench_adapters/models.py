"""Models the eval runner can load by name: a small registry, filled by plugins.

The library knows no model of its own. An application registers its models through the entry-point
group ``saebench_adapters.models``: each entry point names a zero-argument callable returning a
``ModelSpec`` (or a list of them), e.g. in ``pyproject.toml``::

    [project.entry-points."saebench_adapters.models"]
    vsae-gelu-2l = "experiments.lm.registration:default_model_spec"

``find_model`` and ``registered_models`` load those plugins (once per process) before answering;
``register_model`` adds a spec directly. A name nobody registered is left to SAEBench, which loads it
from the hub itself; ``HUB_MODELS`` describes the hub models the project names (gelu-1l,
pythia-70m-deduped) for SAEBench's runner scripts, which accept only the models in their ``MODEL_CONFIGS``.
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
    prepend_bos: Optional[bool] = None
    """Whether the model's tokenizer, called as dictionary_learning's ``ActivationBuffer`` calls it (its
    defaults), puts a BOS token first, i.e. whether SAEs trained on it saw BOS (None: unknown). The
    SAELens export records it."""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class HubModel:
    """A hub model SAEBench loads itself (by TransformerLens name), described for SAEBench's runner scripts
    (``MODEL_CONFIGS``) and the SAELens export. Nothing is loaded from here."""

    name: str
    """The TransformerLens / SAEBench name (what ``lm_name`` records and SAEBench is given)."""
    d_model: int
    n_layers: int
    layers: tuple[int, ...]
    """The layers SAEBench's runner scripts evaluate by default."""
    aliases: tuple[str, ...] = ()
    batch_size: int = 512
    """SAEBench's LLM batch size for it (``MODEL_CONFIGS[name]["batch_size"]``)."""
    dtype: str = "float32"
    prepend_bos: Optional[bool] = None
    """As ``ModelSpec.prepend_bos``; None: read from its tokenizer (needs it in the local HF cache)."""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def model_config(self) -> dict[str, Any]:
        """SAEBench's ``MODEL_CONFIGS`` entry."""
        return {"batch_size": self.batch_size, "dtype": self.dtype, "layers": list(self.layers),
                "d_model": self.d_model}


HUB_MODELS: tuple[HubModel, ...] = (
    # Neel Nanda's 1-layer GELU model (the VSAE paper's), TransformerLens-only. Loaded through TransformerLens,
    # whose tokenizer puts BOS first on every call (HookedTransformer.set_tokenizer wraps it so), which is also
    # what an nnsight LanguageModel around it hands dictionary_learning's ActivationBuffer.
    HubModel("gelu-1l", d_model=512, n_layers=1, layers=(0,), prepend_bos=True),
    # The usual dictionary_learning / SAEBench model (SAEBench's own table names it without the organisation).
    HubModel("EleutherAI/pythia-70m-deduped", d_model=512, n_layers=6, layers=(3, 4),
             aliases=("pythia-70m-deduped",)),
)
"""Hub models this project's studies and examples name (``experiments/studies/definitions.py``: gelu-1l; the
README: pythia-70m-deduped), beside the registered (local) ones."""


def hub_model(name: str) -> Optional[HubModel]:
    for model in HUB_MODELS:
        if name in model.names:
            return model
    return None


def tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (default arguments, as dictionary_learning's buffer calls it through
    nnsight) starts with the BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and int(ids[0]) == int(bos)


def prepends_bos(lm_name: str) -> Optional[bool]:
    """Whether SAEs trained with dictionary_learning's buffer on ``lm_name`` saw a BOS token first: from its
    registration, the known hub models, or its tokenizer in the local HF cache; None if none of them tells."""
    try:
        spec = find_model(lm_name)
    except ConfigError:
        spec = None
    if spec is not None and spec.prepend_bos is not None:
        return spec.prepend_bos
    known = hub_model(lm_name)
    if known is not None and known.prepend_bos is not None:
        return known.prepend_bos
    try:
        from transformers import AutoTokenizer

        return tokenizer_prepends_bos(AutoTokenizer.from_pretrained(known.name if known else lm_name))
    except Exception:  # noqa: BLE001 - not cached, no network, not a HF id: unknown
        return None


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
