"""One registry of architectures, used by every entry point: trainer configs, CLI names,
loading and the SAEBench loaders. Nothing here branches on class names.

An architecture is registered by name (``top_k``, ``vsae_topk``) with named *variants*: overrides of
its config defaults (``vsae_topk:paper``), composable with ``+`` (``vsae_topk:paper+auxk``). A run
folder's ``config.json`` records the name and variant next to dictionary_learning's ``trainer_class``,
and ``architecture_of`` reads them back (falling back to ``trainer_class`` for folders written by plain
dictionary_learning).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .config import ConfigError, TrainerConfig
from .errors import MissingFileError
from .io import check_torch_file, read_json

Loader = Callable[[str, Mapping[str, Any], Optional[str]], Any]
DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class Variant:
    """A named setting of an architecture: overrides of its config defaults."""

    values: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]]
    """The overrides, or a function of the config values given explicitly (e.g. ``steps``) returning them
    (for settings defined relative to the run, such as a warm-up of 2% of the steps)."""
    keeps: tuple[str, ...] = ()
    """Config fields this variant keeps against a study's training protocol: it departs from the
    protocol there on purpose (e.g. the authors' own LR schedule), and reports say so."""

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.values(given) if callable(self.values) else self.values)


@dataclass(frozen=True)
class Architecture:
    name: str
    """Name used on command lines and in scripts (e.g. "vsae_topk", "top_k")."""
    trainer_class: type
    dict_class: type
    config_class: type[TrainerConfig]
    load: Loader
    """(path to ae.pt, saved trainer config, device) -> dictionary."""
    variants: Mapping[str, Variant] = field(default_factory=dict)
    """Named settings; "default" is the config defaults themselves."""
    saebench_tied_encoder: bool = False
    """The encoder reads the decoder (e.g. matching pursuit): SAEBench's W_enc is W_dec^T and b_enc is 0,
    derived, not parameters of their own."""

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self.config_class))

    def variant_names(self) -> list[str]:
        return [DEFAULT_VARIANT, *[v for v in self.variants if v != DEFAULT_VARIANT]]

    def _parts(self, variant: str) -> list[Variant]:
        parts = []
        for part in variant.split("+"):
            if part != DEFAULT_VARIANT and part not in self.variants:
                raise ConfigError(
                    f"architecture {self.name!r} has no variant {part!r}; variants: {self.variant_names()} "
                    "(combine them with '+', e.g. paper+auxk)"
                )
            if part != DEFAULT_VARIANT:
                parts.append(self.variants[part])
        return parts

    def variant_values(self, variant: str = DEFAULT_VARIANT, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Overrides of a variant; "a+b" applies variant a, then b on top (e.g. "paper+auxk": the
        paper's setting with one remedy switched on). ``given``: the explicit config values a variant
        defined relative to the run reads."""
        values: dict[str, Any] = {}
        for part in self._parts(variant):
            values.update(part.resolve(given or {}))
        return values

    def variant_keeps(self, variant: str = DEFAULT_VARIANT) -> frozenset[str]:
        """Config fields the variant keeps against a study's protocol (see ``Variant.keeps``)."""
        return frozenset(key for part in self._parts(variant) for key in part.keeps)

    def config(self, variant: str = DEFAULT_VARIANT, **values: Any) -> TrainerConfig:
        return self.config_class.from_dict({**self.variant_values(variant, values), **values})

    def trainer_config(self, variant: str = DEFAULT_VARIANT, **values: Any) -> dict[str, Any]:
        """A fresh ``{"trainer": TrainerClass, ...}`` dict for ``dictionary_learning.training.trainSAE``
        (which mutates what it is given, so every call builds a new one)."""
        return {"trainer": self.trainer_class, **self.config(variant, **values).to_dict()}


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for other in ARCHITECTURES.values():
        clash = [
            what
            for what, a, b in (
                ("name", other.name, arch.name),
                ("trainer_class", other.trainer_class.__name__, arch.trainer_class.__name__),
            )
            if a == b
        ]
        if clash:
            raise ValueError(f"architecture {arch.name!r} clashes with {other.name!r} on {clash}")
    ARCHITECTURES[arch.name] = arch
    return arch


def register_trainer(name: str, trainer: type, variants: Mapping[str, Variant | Mapping[str, Any]] | None = None,
                     **arch_fields: Any) -> Architecture:
    """Register a trainer of this package's kind (``config_class``, ``dict_class``, ``dictionary_kwargs``,
    ``config_from_saved``; see ``trainer_base.ExtTrainer``): the dictionary is rebuilt from the saved
    config and its ``from_pretrained`` loads the weights."""

    def load(ae_path: str, trainer_cfg: Mapping[str, Any], device: Optional[str]):
        cfg = trainer.config_from_saved(trainer_cfg)
        return trainer.dict_class.from_pretrained(ae_path, device=device, **trainer.dictionary_kwargs(cfg))

    variants = {k: v if isinstance(v, Variant) else Variant(v) for k, v in (variants or {}).items()}
    return register(Architecture(name=name, trainer_class=trainer, dict_class=trainer.dict_class,
                                 config_class=trainer.config_class, load=load, variants=variants, **arch_fields))


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def parse_spec(spec: str) -> tuple[Architecture, str]:
    """``"name[:variant]"`` -> (architecture, variant), the variant checked."""
    name, _, variant = spec.partition(":")
    arch = get_architecture(name)
    variant = variant or DEFAULT_VARIANT
    arch.variant_values(variant)
    return arch, variant


def by_trainer_class(trainer_class: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if arch.trainer_class.__name__ == trainer_class:
            return arch
    raise ConfigError(
        f"no registered architecture trains with {trainer_class!r}; known trainer classes: "
        f"{sorted(a.trainer_class.__name__ for a in ARCHITECTURES.values())}"
    )


def architecture_of(trainer_cfg: Mapping[str, Any]) -> Architecture:
    """The architecture a saved ``config["trainer"]`` was trained with: by its recorded registry name,
    or by ``trainer_class`` for folders written by plain dictionary_learning."""
    if "architecture" in trainer_cfg:
        arch = get_architecture(trainer_cfg["architecture"])
        if arch.trainer_class.__name__ != trainer_cfg.get("trainer_class", arch.trainer_class.__name__):
            raise ConfigError(
                f"config says architecture={trainer_cfg['architecture']!r} but trainer_class="
                f"{trainer_cfg['trainer_class']!r}; {arch.name} trains with {arch.trainer_class.__name__}"
            )
        return arch
    return by_trainer_class(trainer_cfg["trainer_class"])


def read_trainer_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a trainer folder written by trainSAE or this project (checked)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise MissingFileError(
            f"{config_path} not found: pass a trainer folder written by trainSAE (it holds ae.pt and config.json)"
        )
    config = read_json(config_path, "trainer config")
    if "trainer" not in config or "trainer_class" not in config["trainer"]:
        raise ConfigError(f"{config_path} has no trainer.trainer_class; it was not written by trainSAE")
    return config


def load_dictionary(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a trainer folder (``ae.pt`` + ``config.json``) of any registered architecture.

    Ours are rebuilt from their config; dictionary_learning's go through its own loader.
    """
    config = read_trainer_config(path)
    ae_path = Path(path) / "ae.pt"
    if not ae_path.is_file():
        raise MissingFileError(f"{ae_path} not found: the run did not finish writing this trainer")
    check_torch_file(ae_path, "weights file")  # a truncated ae.pt: say so, not a zip-reader error
    trainer_cfg = config["trainer"]
    arch = architecture_of(trainer_cfg)
    if arch.dict_class.__name__ != trainer_cfg.get("dict_class", arch.dict_class.__name__):
        raise ConfigError(
            f"{path}: config says dict_class={trainer_cfg['dict_class']!r} but {arch.trainer_class.__name__} "
            f"trains {arch.dict_class.__name__}"
        )
    return arch.load(str(ae_path), trainer_cfg, device), config


# The built-in architectures register themselves on import (each file ends with its registration), so
# whoever imports the registry sees them all. At the end: they import ``register_trainer`` from here.
from . import dl_architectures, mp_sae, vsae, vsae_topk  # noqa: E402,F401


# --- dictionary_learning's own loader, for every registered architecture -----------------------------
# Evaluation code written for dictionary_learning (e.g. dictionary_learning_demo's eval_saes) calls
# ``dictionary_learning.utils.load_dictionary``, which knows only its own classes ("Dictionary class VSAETopK
# not supported"). Importing the registry (``from dictionary_learning_ext import ARCHITECTURES`` or any other
# registry name) extends it: dictionary_learning's own classes still go to its original loader, unchanged;
# every other registered architecture is loaded here. Code that bound the function by name before this
# import (``from dictionary_learning.utils import load_dictionary``) keeps the original.
DICTIONARY_LEARNING_OWN_CLASSES = frozenset({
    "AutoEncoder", "GatedAutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
})


def _extend_dictionary_learning_loader() -> None:
    from dictionary_learning import utils as dl_utils

    if getattr(dl_utils.load_dictionary, "extends_dictionary_learning", False):
        return  # already extended (a re-import or reload)
    original = dl_utils.load_dictionary

    def load_any_dictionary(base_path: str, device: str) -> tuple:
        config_path = Path(base_path) / "config.json"
        trainer = read_json(config_path, "trainer config").get("trainer", {}) if config_path.is_file() else {}
        if not config_path.is_file() or trainer.get("dict_class") in DICTIONARY_LEARNING_OWN_CLASSES:
            return original(base_path, device)  # its own classes (and its own errors), unchanged
        return load_dictionary(base_path, device=device)

    load_any_dictionary.__doc__ = (f"{original.__doc__ or ''}\n\nExtended by dictionary_learning_ext: every "
                                   "architecture in dictionary_learning_ext.ARCHITECTURES loads too.")
    load_any_dictionary.__wrapped__ = original  # type: ignore[attr-defined]
    load_any_dictionary.extends_dictionary_learning = True  # type: ignore[attr-defined]
    dl_utils.load_dictionary = load_any_dictionary


_extend_dictionary_learning_loader()
