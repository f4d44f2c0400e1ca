"""Our architectures in SAEBench's own dictionary_learning loading path.

``register_with_saebench()`` adds, to
``sae_bench.custom_saes.run_all_evals_dictionary_learning_saes``:

* ``TRAINER_LOADERS[<trainer class name>]`` for every registered architecture SAEBench does not
  already load itself (i.e. ``VSAETrainer``, ``VSAETopKTrainer``, and any future one), all served by
  the one generic ``load_dictionary_learning_registered_sae``;
* ``MODEL_CONFIGS["vsae-gelu-1l"]`` for the embedded default model.

After that, SAEBench's ``load_dictionary_learning_sae(repo_id, location, ...)`` and ``run_evals``
load our checkpoints from a HF repo (``hf_hub_download``) or from the ``downloaded_saes`` layout
written by ``python -m saebench_adapters.export``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import hf_hub_download

import dictionary_learning_ext as dle

from .wrappers import DictionarySAE, WrapperError, wrap_dictionary

DEFAULT_MODEL_NAME = "vsae-gelu-1l"
DEFAULT_MODEL_ASSETS = Path(__file__).resolve().parent.parent / "experiments" / "assets" / "default_lm"


def load_dictionary_learning_registered_sae(
    repo_id: str,
    filename: str,
    model_name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    layer: Optional[int] = None,
    local_dir: str = "downloaded_saes",
) -> DictionarySAE:
    """SAEBench loader signature (see ``topk_sae.load_dictionary_learning_topk_sae``) for any architecture
    in ``dictionary_learning_ext.ARCHITECTURES``. ``repo_id`` may also be a local directory holding
    ``filename``."""
    if not filename.endswith("ae.pt"):
        raise ValueError(f"filename must point at an ae.pt, got {filename!r}")
    config_filename = filename[: -len("ae.pt")] + "config.json"
    if os.path.isdir(repo_id):
        ae_path, config_path = Path(repo_id) / filename, Path(repo_id) / config_filename
        for p in (ae_path, config_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found")
    else:
        ae_path = Path(hf_hub_download(repo_id=repo_id, filename=filename, force_download=False, local_dir=local_dir))
        config_path = Path(
            hf_hub_download(repo_id=repo_id, filename=config_filename, force_download=False, local_dir=local_dir)
        )
    if ae_path.parent != config_path.parent:
        raise WrapperError(f"{ae_path} and {config_path} are not in one folder")
    with open(config_path) as fh:
        trainer_cfg = json.load(fh)["trainer"]
    if layer is not None and layer != trainer_cfg["layer"]:
        raise ValueError(f"{filename}: asked for layer {layer} but the SAE was trained on layer {trainer_cfg['layer']}")
    # SAEBench's own loaders assert this: TransformerLens names are often shortened HF names.
    if model_name not in trainer_cfg["lm_name"]:
        raise ValueError(f"{filename}: model {model_name!r} is not part of the SAE's lm_name {trainer_cfg['lm_name']!r}")
    arch = dle.by_trainer_class(trainer_cfg["trainer_class"])
    dictionary = arch.load(str(ae_path), trainer_cfg, "cpu")
    sae = wrap_dictionary(dictionary, trainer_cfg, model_name=model_name, device=str(device), dtype=dtype)
    if not sae.check_decoder_norms():
        raise ValueError(f"{filename}: decoder rows are not unit norm")
    return sae


def default_model_config() -> dict:
    """MODEL_CONFIGS entry for the embedded default model (d_model from its assets when present)."""
    d_model = None
    cfg = DEFAULT_MODEL_ASSETS / "config.json"
    if cfg.is_file():
        with open(cfg) as fh:
            hf_cfg = json.load(fh)
        d_model = hf_cfg.get("n_embd", hf_cfg.get("hidden_size"))
    return {"batch_size": 64, "dtype": "float32", "layers": [0], "d_model": d_model}


def register_with_saebench() -> list[str]:
    """Add our loaders and the default model to SAEBench's dictionary_learning tables (idempotent).
    Returns the trainer classes added."""
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    added = []
    for arch in dle.ARCHITECTURES.values():
        name = arch.trainer_class.__name__
        if name not in dl_saes.TRAINER_LOADERS or dl_saes.TRAINER_LOADERS[name] is load_dictionary_learning_registered_sae:
            dl_saes.TRAINER_LOADERS[name] = load_dictionary_learning_registered_sae
            added.append(name)
    dl_saes.MODEL_CONFIGS.setdefault(DEFAULT_MODEL_NAME, default_model_config())
    return added
