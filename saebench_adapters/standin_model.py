"""A tiny config-built, randomly initialised GPT-2-style HookedTransformer with a locally trained
byte-level BPE tokenizer: a stand-in for tests and smoke runs when no trained model (see
``saebench_adapters.models``) is available. It knows the stand-in datasets'
words and has single tokens for the absorption prompt (" A".." Z", " has", " the", " first",
" letter", ":"), but it never learned anything: absorption's first-letter probe fails on it.
"""

from __future__ import annotations

import string
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dictionary_learning_ext.errors import StandinError

from .standin_data import vocabulary_text

STANDIN_MODEL_NAME = "standin-gelu-1l"
EOS = "<|endoftext|>"
REQUIRED_SINGLE_TOKENS = [f" {c}" for c in string.ascii_uppercase] + [" has", " the", " first", " letter", ":"]


def standin_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = vocabulary_text()
    spelling = "\n".join(f"{w} has the first letter: {w[0].upper()}" for w in text.split() if w.isalpha())
    letters = " ".join(f"the first letter: {c} has" for c in string.ascii_uppercase * 20)
    tok.train_from_iterator([text, spelling, letters] * 3, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        padding_side="right", model_max_length=128,
    )
    for t in REQUIRED_SINGLE_TOKENS:
        if len(hf.encode(t)) != 1:
            raise StandinError(f"stand-in tokenizer splits {t!r}; raise vocab_size")
    # TransformerLens re-loads the tokenizer by name_or_path, so it must come from a folder.
    folder = tempfile.mkdtemp(prefix="standin-tokenizer-")
    hf.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def standin_model(d_model: int = 32, seed: int = 0, device: str = "cpu") -> HookedTransformer:
    """1-layer GELU transformer (n_ctx 128), random weights; hook ``blocks.0.hook_resid_post``."""
    tok = standin_tokenizer()
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        model_name=STANDIN_MODEL_NAME, n_layers=1, d_model=d_model, n_ctx=128, d_head=8, n_heads=d_model // 8,
        d_mlp=4 * d_model, d_vocab=len(tok), act_fn="gelu", normalization_type="LN",
        default_prepend_bos=True, device=device, seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    return model.eval()
