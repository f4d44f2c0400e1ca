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
import importlib.abc
import importlib.util
import sys
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


# --- dictionary_learning's own loader learns our architectures --------------------------------------
# After `import dictionary_learning_ext`, `dictionary_learning.utils.load_dictionary` loads every registered
# architecture (see registry._extend_dictionary_learning_loader). Importing the registry loads torch, so it
# happens when dictionary_learning.utils itself is imported (or now, if it already is), not on this import.
class _ExtendOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    TARGET = "dictionary_learning.utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        importlib.import_module(f"{__name__}.registry")


if _ExtendOnImport.TARGET in sys.modules:
    importlib.import_module(f"{__name__}.registry")
else:
    sys.meta_path.insert(0, _ExtendOnImport())
