"""The embedded default model as a model the SAEBench adapters can evaluate on.

``saebench_adapters`` (a library) never imports this application; it finds this function through the
entry point ``saebench_adapters.models`` declared in ``pyproject.toml``. The hub models the studies name
(gelu-1l) are described by the library itself (``saebench_adapters.models.HUB_MODELS``): SAEBench loads them
from the hub, nothing of this application is needed for them.
"""

from __future__ import annotations

import json

from saebench_adapters.models import ModelSpec, tokenizer_prepends_bos

from experiments.lm.assets import ASSETS_DIR
from experiments.lm.models import DEFAULT_ALIASES, DEFAULT_MODEL_NAME


def _load(layer: int, device: str = "cpu"):
    from experiments.lm.models import load_model

    return load_model(DEFAULT_MODEL_NAME, layer=layer, device=device).hooked_transformer()


def _prepends_bos() -> bool:
    """What the training buffer sees: ``experiments.lm.models`` hands dictionary_learning's ActivationBuffer
    this tokenizer (through nnsight), called with its defaults."""
    from transformers import AutoTokenizer

    return tokenizer_prepends_bos(AutoTokenizer.from_pretrained(ASSETS_DIR))


def default_model_spec() -> ModelSpec:
    hf_config = json.loads((ASSETS_DIR / "config.json").read_text())
    return ModelSpec(
        name=DEFAULT_MODEL_NAME,
        load=_load,
        aliases=tuple(a for a in DEFAULT_ALIASES if a != DEFAULT_MODEL_NAME),
        d_model=hf_config["n_embd"],
        n_layers=hf_config["n_layer"],
        standins=True,
        prepend_bos=_prepends_bos(),
    )
