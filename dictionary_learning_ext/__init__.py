"""New dictionaries and trainers for dictionary_learning: VSAE, VSAETopK and MP-SAE.

Importing this package registers them (and dictionary_learning's own architectures) by name::

    from dictionary_learning_ext import ARCHITECTURES, load_dictionary
    cfg = ARCHITECTURES["vsae_topk"].trainer_config(steps=..., activation_dim=..., ...)
    trainSAE(buffer, [cfg], steps=...)
"""

from . import dl_architectures, our_architectures  # noqa: F401  (registration side effects)
from .config import ConfigError, TrainerConfig
from .mp_sae import MPSAE, MPSAEConfig, MPSAETrainer
from .registry import ARCHITECTURES, Architecture, by_trainer_class, get_architecture, load_dictionary, register
from .trainer_base import ExtTrainer, NonFiniteError
from .variational import CheckpointError
from .vsae import VSAE, VSAEConfig, VSAETrainer
from .vsae_topk import PAPER_PRESET, VSAETopK, VSAETopKConfig, VSAETopKTrainer

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CheckpointError",
    "ConfigError",
    "ExtTrainer",
    "MPSAE",
    "MPSAEConfig",
    "MPSAETrainer",
    "NonFiniteError",
    "PAPER_PRESET",
    "TrainerConfig",
    "VSAE",
    "VSAEConfig",
    "VSAETopK",
    "VSAETopKConfig",
    "VSAETopKTrainer",
    "VSAETrainer",
    "by_trainer_class",
    "get_architecture",
    "load_dictionary",
    "register",
]
