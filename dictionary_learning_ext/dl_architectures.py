"""dictionary_learning's own architectures, registered under the names its demo uses.

Its TopK-style trainers fix the dead-latent window (auxK's target set) at 10M tokens, which a run
shorter than that never reaches, so their auxK never acts; here the window is a config option
(``dead_window_tokens``, default dictionary_learning's), so a study can give every architecture the same
dead-latent treatment. The subclasses keep dictionary_learning's class names, so its loaders and
SAEBench's loader table recognise their runs as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from dictionary_learning import utils as dl_utils
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.trainers import batch_top_k, top_k
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate

from .config import check_k, config_from_signature
from .registry import Architecture, register

DICTIONARY_LEARNING_DEAD_WINDOW = 10_000_000


def with_dead_window(base: type) -> type:
    """``base`` with its dead-latent window (``dead_feature_threshold``) set from ``dead_window_tokens``."""

    class Trainer(base):
        def __init__(self, *args: Any, dead_window_tokens: int = DICTIONARY_LEARNING_DEAD_WINDOW, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.dead_feature_threshold = dead_window_tokens

        @property
        def config(self) -> dict[str, Any]:
            return {**super().config, "dead_window_tokens": self.dead_feature_threshold}

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    Trainer.__doc__ = f"dictionary_learning's {base.__name__} with a configurable dead-latent window."
    return Trainer


TopKTrainer = with_dead_window(top_k.TopKTrainer)
BatchTopKTrainer = with_dead_window(batch_top_k.BatchTopKTrainer)


def _load_with_dictionary_learning(ae_path: str, trainer_cfg: Mapping[str, Any], device: Optional[str]):
    dictionary, _ = dl_utils.load_dictionary(str(Path(ae_path).parent), device=device or "cpu")
    return dictionary


for name, trainer, dictionary, checks in (
    ("standard", StandardTrainer, AutoEncoder, ()),
    ("standard_new", StandardTrainerAprilUpdate, AutoEncoder, ()),
    ("top_k", TopKTrainer, top_k.AutoEncoderTopK, (check_k,)),
    ("batch_top_k", BatchTopKTrainer, batch_top_k.BatchTopKSAE, (check_k,)),
):
    register(
        Architecture(
            name=name,
            trainer_class=trainer,
            dict_class=dictionary,
            config_class=config_from_signature(trainer, f"{trainer.__name__}Config", checks),
            load=_load_with_dictionary_learning,
        )
    )
