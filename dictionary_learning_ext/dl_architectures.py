"""dictionary_learning's own architectures, registered under the names its demo uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from dictionary_learning import utils as dl_utils
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

from .config import check_k, config_from_signature
from .registry import Architecture, register


def _load_with_dictionary_learning(ae_path: str, trainer_cfg: Mapping[str, Any], device: Optional[str]):
    dictionary, _ = dl_utils.load_dictionary(str(Path(ae_path).parent), device=device or "cpu")
    return dictionary


for name, trainer, dictionary, checks in (
    ("standard", StandardTrainer, AutoEncoder, ()),
    ("standard_new", StandardTrainerAprilUpdate, AutoEncoder, ()),
    ("top_k", TopKTrainer, AutoEncoderTopK, (check_k,)),
    ("batch_top_k", BatchTopKTrainer, BatchTopKSAE, (check_k,)),
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
