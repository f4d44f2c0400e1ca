"""One registry of architectures, used by every entry point: trainer configs, CLI names,
loading and the SAEBench loaders. Nothing here branches on class names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .atomic import check_torch_file
from .config import ConfigError, TrainerConfig

Loader = Callable[[str, Mapping[str, Any], Optional[str]], Any]


@dataclass(frozen=True)
class Architecture:
    name: str
    """Name used on command lines and in scripts (e.g. "vsae_topk", "top_k")."""
    trainer_class: type
    dict_class: type
    config_class: type[TrainerConfig]
    load: Loader
    """(path to ae.pt, saved trainer config, device) -> dictionary."""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Named overrides of the config defaults; "default" is the defaults themselves."""
    description: str = ""
    saebench_tied_encoder: bool = False
    """The encoder reads the decoder (e.g. matching pursuit): SAEBench's W_enc is W_dec^T and b_enc is 0,
    derived, not parameters of their own."""

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self.config_class))

    def preset_names(self) -> list[str]:
        return ["default", *[p for p in self.presets if p != "default"]]

    def preset_values(self, preset: str = "default") -> dict[str, Any]:
        """Overrides of a preset; "a+b" applies preset a, then b on top (e.g. "paper+auxk": the
        authors' setting with one remedy switched on)."""
        values: dict[str, Any] = {}
        for part in preset.split("+"):
            if part != "default" and part not in self.presets:
                raise ConfigError(
                    f"architecture {self.name!r} has no preset {part!r}; presets: {self.preset_names()} "
                    "(combine them with '+', e.g. paper+auxk)"
                )
            values.update(self.presets.get(part, {}))
        return values

    def has_preset(self, preset: str) -> bool:
        return all(part == "default" or part in self.presets for part in preset.split("+"))

    def config(self, preset: str = "default", **values: Any) -> TrainerConfig:
        return self.config_class.from_dict({**self.preset_values(preset), **values})

    def trainer_config(self, preset: str = "default", **values: Any) -> dict[str, Any]:
        """A fresh ``{"trainer": TrainerClass, ...}`` dict for ``dictionary_learning.training.trainSAE``
        (which mutates what it is given, so every call builds a new one)."""
        return {"trainer": self.trainer_class, **self.config(preset, **values).to_dict()}


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


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def by_trainer_class(trainer_class: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if arch.trainer_class.__name__ == trainer_class:
            return arch
    raise ConfigError(
        f"no registered architecture trains with {trainer_class!r}; known trainer classes: "
        f"{sorted(a.trainer_class.__name__ for a in ARCHITECTURES.values())}"
    )


def read_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: pass a trainer folder written by trainSAE (it holds ae.pt and config.json)"
        )
    with open(config_path) as fh:
        config = json.load(fh)
    if "trainer" not in config or "trainer_class" not in config["trainer"]:
        raise ConfigError(f"{config_path} has no trainer.trainer_class; it was not written by trainSAE")
    return config


def load_dictionary(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a trainer folder (``ae.pt`` + ``config.json``) of any registered architecture.

    Ours are rebuilt from their config; dictionary_learning's go through its own loader.
    """
    config = read_config(path)
    ae_path = Path(path) / "ae.pt"
    if not ae_path.is_file():
        raise FileNotFoundError(f"{ae_path} not found: the run did not finish writing this trainer")
    check_torch_file(ae_path, "weights file")  # a truncated ae.pt: say so, not a zip-reader error
    trainer_cfg = config["trainer"]
    arch = by_trainer_class(trainer_cfg["trainer_class"])
    if arch.dict_class.__name__ != trainer_cfg.get("dict_class", arch.dict_class.__name__):
        raise ConfigError(
            f"{path}: config says dict_class={trainer_cfg['dict_class']!r} but {arch.trainer_class.__name__} "
            f"trains {arch.dict_class.__name__}"
        )
    return arch.load(str(ae_path), trainer_cfg, device), config
