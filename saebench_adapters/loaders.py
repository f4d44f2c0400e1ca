"""Our architectures in SAEBench's own dictionary_learning loading path.

``register_with_saebench()`` adds, to
``sae_bench.custom_saes.run_all_evals_dictionary_learning_saes``:

* ``TRAINER_LOADERS[<trainer class name>]`` for every registered architecture SAEBench does not
  already load itself (i.e. ``VSAETrainer``, ``VSAETopKTrainer``, and any future one), all served by
  the one generic ``load_dictionary_learning_registered_sae``;
* ``MODEL_CONFIGS[<name>]`` (in both runner scripts) for every model registered with
  ``saebench_adapters.models`` and every known hub model (``models.HUB_MODELS``: gelu-1l,
  EleutherAI/pythia-70m-deduped).

After that, SAEBench's ``load_dictionary_learning_sae(repo_id, location, ...)`` and ``run_evals``
load our checkpoints from a HF repo (``hf_hub_download``) or from the ``downloaded_saes`` layout
written by ``python -m saebench_adapters.export``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import torch
from huggingface_hub import hf_hub_download

import dictionary_learning_ext as dle
from dictionary_learning_ext.errors import ConfigError, MissingFileError, WrapperError
from dictionary_learning_ext.registry import load_dictionary

from .models import HUB_MODELS, ModelSpec, registered_models
from .wrappers import DictionarySAE, wrap_dictionary

WEIGHTS_FILE, CONFIG_FILE = "ae.pt", "config.json"  # one trainer folder, as trainSAE writes it


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
    in ``dictionary_learning_ext.ARCHITECTURES``. ``repo_id`` is a HF repo id (files fetched with
    ``hf_hub_download`` into ``local_dir``) or a local directory holding ``filename``."""
    if PurePosixPath(filename).name != WEIGHTS_FILE:
        raise ConfigError(f"filename must point at an {WEIGHTS_FILE}, got {filename!r}")
    config_filename = PurePosixPath(filename).with_name(CONFIG_FILE).as_posix()  # hub paths use "/"
    if os.path.isdir(repo_id):
        folder = (Path(repo_id) / filename).parent
        for p in (folder / WEIGHTS_FILE, folder / CONFIG_FILE):
            if not p.is_file():
                raise MissingFileError(f"{p} not found")
    else:
        ae_path, config_path = (
            Path(hf_hub_download(repo_id=repo_id, filename=f, force_download=False, local_dir=local_dir))
            for f in (filename, config_filename)
        )
        if ae_path.parent != config_path.parent:
            raise WrapperError(f"{ae_path} and {config_path} are not in one folder")
        folder = ae_path.parent
    dictionary, config = load_dictionary(folder, device="cpu")
    trainer_cfg = config["trainer"]
    if layer is not None and layer != trainer_cfg["layer"]:
        raise ConfigError(f"{filename}: asked for layer {layer} but the SAE was trained on layer {trainer_cfg['layer']}")
    # SAEBench's own loaders assert this: TransformerLens names are often shortened HF names.
    if model_name not in trainer_cfg["lm_name"]:
        raise ConfigError(f"{filename}: model {model_name!r} is not part of the SAE's lm_name {trainer_cfg['lm_name']!r}")
    sae = wrap_dictionary(dictionary, trainer_cfg, model_name=model_name, device=str(device), dtype=dtype)
    # SAEBench's own loaders demand unit-norm rows; a dictionary trained with a free decoder declares it
    # (the wrapper then presents it as trained, cfg.decoder_norms == "free").
    if sae.cfg.decoder_norms != "free" and not sae.check_decoder_norms():
        raise WrapperError(f"{filename}: decoder rows are not unit norm")
    return sae


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """SAEBench's ``MODEL_CONFIGS`` entry for a registered model."""
    layers = list(range(spec.n_layers)) if spec.n_layers else [0]
    return {"batch_size": 64, "dtype": "float32", "layers": layers, "d_model": spec.d_model}


def saebench_model_configs() -> dict[str, dict[str, Any]]:
    """``MODEL_CONFIGS`` entries for every registered model and every known hub model (``HUB_MODELS``), under
    each of their names."""
    configs: dict[str, dict[str, Any]] = {}
    for model in HUB_MODELS:
        for name in model.names:
            configs[name] = model.model_config()
    for spec in registered_models().values():
        for name in spec.names:
            configs[name] = model_config(spec)
    return configs


def register_with_saebench() -> list[str]:
    """Add our loaders and the models to SAEBench's tables (idempotent; entries SAEBench or the user already
    has are kept). Returns the trainer classes added.

    * ``TRAINER_LOADERS`` of ``run_all_evals_dictionary_learning_saes``: every registered architecture
      SAEBench does not load itself;
    * ``MODEL_CONFIGS`` of both runner scripts (``run_all_evals_dictionary_learning_saes`` and
      ``run_all_evals_custom_saes``, which refuse any other model with ``Unsupported model``): the registered
      models and the known hub models (gelu-1l, EleutherAI/pythia-70m-deduped).
    """
    import sae_bench.custom_saes.run_all_evals_custom_saes as custom_saes
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    added = []
    for arch in dle.ARCHITECTURES.values():
        name = arch.trainer_class.__name__
        if name not in dl_saes.TRAINER_LOADERS or dl_saes.TRAINER_LOADERS[name] is load_dictionary_learning_registered_sae:
            dl_saes.TRAINER_LOADERS[name] = load_dictionary_learning_registered_sae
            added.append(name)
    for name, config in saebench_model_configs().items():
        for table in (dl_saes.MODEL_CONFIGS, custom_saes.MODEL_CONFIGS):
            table.setdefault(name, dict(config))
    return added


def saebench_loads_natively(trainer_class: str) -> Optional[Any]:
    """SAEBench's own loader for ``trainer_class`` (e.g. TopKTrainer's), or None when SAEBench has none or
    it is ours."""
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    loader = dl_saes.TRAINER_LOADERS.get(trainer_class)
    return None if loader is None or loader is load_dictionary_learning_registered_sae else loader
