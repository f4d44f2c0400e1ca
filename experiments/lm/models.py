"""Model loading for the training CLI and the SAEBench adapters.

`load_model(name, layer)` returns a `LoadedModel`: an nnsight `LanguageModel` (what
dictionary_learning's `ActivationBuffer` and `evaluate` take), the envoy whose output is the
residual stream after block `layer`, and a way to get the same weights as a TransformerLens
`HookedTransformer` (what SAEBench evaluates, unprocessed like `from_pretrained_no_processing`).

Names:
* "default" / "vsae-gelu-2l": the embedded offline model in experiments/assets/default_lm.
* "gelu-1l" (or any TransformerLens-only name in TL_NAMES): via TransformerLens, wrapped for nnsight.
* any Hugging Face causal-LM id (e.g. "EleutherAI/pythia-70m-deduped") or local model directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from nnsight import LanguageModel
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dictionary_learning_ext.errors import ConfigError
from experiments.lm.assets import ASSETS_DIR, verify_assets

DEFAULT_MODEL_NAME = "vsae-gelu-2l"  # the lm_name recorded in configs for the embedded model
DEFAULT_ALIASES = ("default", DEFAULT_MODEL_NAME)
TL_NAMES = ("gelu-1l", "gelu-2l", "solu-1l")  # TransformerLens-hosted models with no HF class
# Where the decoder-block list lives in common HF causal LMs.
BLOCK_PATHS = ("gpt_neox.layers", "transformer.h", "model.layers", "model.decoder.layers", "transformer.blocks")
# HF-only forward flags that dictionary_learning passes (evaluate/loss_recovered); meaningless for TL.
_HF_ONLY_FLAGS = {"use_cache", "output_attentions", "output_hidden_states", "return_dict"}
_TL_ACT = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu", "gelu_fast": "gelu_fast"}


@dataclass
class LoadedModel:
    name: str  # lm_name recorded in configs
    model: LanguageModel
    submodule: Any  # envoy whose output (or output[0]) is the residual stream after block `layer`
    layer: int
    d_model: int
    n_layers: int
    hook_name: str  # TransformerLens hook name of the same activations
    _make_tl: Callable[[], HookedTransformer] | None = field(repr=False, compare=False, default=None)

    def hooked_transformer(self) -> HookedTransformer:
        """The same weights as a HookedTransformer (no weight processing), for SAEBench."""
        if self._make_tl is None:
            raise ConfigError(f"no TransformerLens conversion is known for {self.name!r}")
        return self._make_tl()


class TLForNNsight(torch.nn.Module):
    """Gives a HookedTransformer the HF calling convention nnsight and dictionary_learning use:
    `forward(input_ids, attention_mask, **hf_flags) -> logits`."""

    def __init__(self, tl: HookedTransformer):
        super().__init__()
        self.tl = tl

    @property
    def dtype(self) -> torch.dtype:  # ActivationBuffer reads model.dtype
        return self.tl.cfg.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        unknown = set(kwargs) - _HF_ONLY_FLAGS
        if unknown:
            raise TypeError(f"unsupported forward arguments for a TransformerLens model: {sorted(unknown)}")
        return self.tl(input_ids, attention_mask=attention_mask, return_type="logits")


def _check_layer(name: str, layer: int | None, n_layers: int) -> int:
    if layer is None:
        return n_layers // 2  # 0 for 1-layer models, 3 for pythia-70m (the usual choice)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} is out of range for {name!r}: valid layers are 0..{n_layers - 1}")
    return layer


def _resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def gpt2_hooked_transformer(hf: PreTrainedModel, tokenizer: Any, name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    """HookedTransformer with the exact weights of a HF GPT-2 model (no folding/centering)."""
    c = hf.config
    if c.activation_function not in _TL_ACT:
        raise ConfigError(f"activation {c.activation_function!r} has no TransformerLens equivalent")
    cfg = HookedTransformerConfig(
        model_name=name, n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head,
        d_head=c.n_embd // c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size,
        act_fn=_TL_ACT[c.activation_function], normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True, device=device, dtype=dtype,
    )
    tl = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    tl.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return tl.to(device)


def _find_blocks(lm: LanguageModel) -> tuple[str, int]:
    for path in BLOCK_PATHS:
        mod: Any = lm._model
        for attr in path.split("."):
            mod = getattr(mod, attr, None)
        if isinstance(mod, torch.nn.ModuleList):
            return path, len(mod)
    raise ConfigError(f"cannot find the decoder blocks of {type(lm._model).__name__}; looked for {BLOCK_PATHS}")


def _envoy(lm: LanguageModel, path: str) -> Any:
    obj: Any = lm
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def _wrap_hf(name: str, hf: PreTrainedModel, tok: Any, layer: int | None,
             make_tl: Callable[[], HookedTransformer]) -> LoadedModel:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Right padding: real tokens keep their positions, and ActivationBuffer drops pads by mask.
    tok.padding_side = "right"
    hf.eval()
    lm = LanguageModel(hf, tokenizer=tok)
    path, n_layers = _find_blocks(lm)
    layer = _check_layer(name, layer, n_layers)
    return LoadedModel(name=name, model=lm, submodule=_envoy(lm, path)[layer], layer=layer,
                       d_model=hf.config.hidden_size, n_layers=n_layers, hook_name=_resid_hook(layer),
                       _make_tl=make_tl)


def _load_default(layer: int | None, device: str, dtype: torch.dtype) -> LoadedModel:
    verify_assets(ASSETS_DIR)
    hf = AutoModelForCausalLM.from_pretrained(ASSETS_DIR, dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(ASSETS_DIR)
    return _wrap_hf(DEFAULT_MODEL_NAME, hf, tok, layer,
                    lambda: gpt2_hooked_transformer(hf, tok, DEFAULT_MODEL_NAME, device, dtype))


def _load_tl(name: str, layer: int | None, device: str, dtype: torch.dtype) -> LoadedModel:
    # No weight processing: SAEBench evaluates on from_pretrained_no_processing activations, and
    # centering writing weights would change hook_resid_post.
    tl = HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
    tl.eval()
    n_layers = tl.cfg.n_layers
    layer = _check_layer(name, layer, n_layers)
    tl.tokenizer.padding_side = "right"
    lm = LanguageModel(TLForNNsight(tl), tokenizer=tl.tokenizer)
    return LoadedModel(name=name, model=lm, submodule=lm.tl.blocks[layer].hook_resid_post, layer=layer,
                       d_model=tl.cfg.d_model, n_layers=n_layers, hook_name=_resid_hook(layer),
                       _make_tl=lambda: tl)


def _hub_hooked_transformer(name: str, hf: PreTrainedModel, tok: Any, device: str, dtype: torch.dtype) -> HookedTransformer:
    if hf.config.model_type == "gpt2":
        return gpt2_hooked_transformer(hf, tok, name, device, dtype)
    if Path(name).exists():
        raise ConfigError(f"TransformerLens cannot load {hf.config.model_type!r} models from a local path ({name}); "
                         "use the hub id, or a GPT-2-architecture model")
    # hf_model reuses the weights already loaded; TransformerLens still needs the name for its config.
    return HookedTransformer.from_pretrained_no_processing(name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)


def first_line(err: BaseException) -> str:
    """A library error's first line (the rest is usually advice about another setup)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_hub(name: str, layer: int | None, device: str, dtype: torch.dtype) -> LoadedModel:
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"unknown model {name!r}: not one of {list(DEFAULT_ALIASES) + list(TL_NAMES)}, not a local model "
            f"directory, and not loadable as a Hugging Face hub id here ({type(e).__name__}: {first_line(e)}). "
            "To use a hub model pass its id, e.g. 'EleutherAI/pythia-70m-deduped', on a machine with "
            "internet access or with the model in the local HF cache."
        ) from e
    hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(name)
    return _wrap_hf(name, hf, tok, layer, lambda: _hub_hooked_transformer(name, hf, tok, device, dtype))


def load_model(name: str, layer: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `name` for SAE training (nnsight) and evaluation (TransformerLens); see module docstring.

    `layer=None` picks n_layers // 2 (layer 0 for one-layer models).
    """
    if name in DEFAULT_ALIASES:
        return _load_default(layer, device, dtype)
    if name in TL_NAMES:
        return _load_tl(name, layer, device, dtype)
    return _load_hub(name, layer, device, dtype)
