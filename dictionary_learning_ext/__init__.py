"""New dictionaries and trainers for dictionary_learning: VSAE, VSAETopK and MP-SAE.

Importing the registry registers them (and dictionary_learning's own architectures) by name::

    from dictionary_learning_ext import ARCHITECTURES, load_dictionary
    cfg = ARCHITECTURES["vsae_topk"].trainer_config(steps=..., activation_dim=..., ...)
    trainSAE(buffer, [cfg], steps=...)

An architecture is one file (dictionary + config + trainer) ending with its ``register_trainer`` call,
plus its import at the end of ``registry.py``. The names below load on first use, so light modules
(``errors``, ``config``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("CheckpointError", "ConfigError", "EvalError", "ExportError", "MissingFileError",
                     "NonFiniteError", "StudyError", "UsageError", "VsaeError", "WrapperError"), "errors"),
    "TrainerConfig": "config",
    **dict.fromkeys(("ARCHITECTURES", "Architecture", "Variant", "architecture_of", "by_trainer_class",
                     "get_architecture", "load_dictionary", "parse_spec", "read_trainer_config", "register",
                     "register_trainer"), "registry"),
    "ExtTrainer": "trainer_base",
    **dict.fromkeys(("MPSAE", "MPSAEConfig", "MPSAETrainer"), "mp_sae"),
    **dict.fromkeys(("VSAE", "VSAEConfig", "VSAETrainer"), "vsae"),
    **dict.fromkeys(("PAPER_VARIANT", "VSAETopK", "VSAETopKConfig", "VSAETopKTrainer"), "vsae_topk"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.registry")  # every built-in architecture registers with it
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
