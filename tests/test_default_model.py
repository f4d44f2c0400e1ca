"""The embedded offline default model: loads, predicts held-out text, matches TransformerLens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import shutil
from itertools import islice

import pytest
import torch
from dictionary_learning import ActivationBuffer
from sae_bench.evals.absorption.vocab import get_alpha_tokens

from experiments.lm import corpus, models
from experiments.lm.default_lm import REQUIRED_SINGLE_TOKENS, first_letter_accuracy

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return models.load_model("default")


@pytest.fixture(scope="module")
def tl(loaded):
    return loaded.hooked_transformer()


def test_metadata(loaded):
    assert models.load_model(models.DEFAULT_MODEL_NAME).name == models.DEFAULT_MODEL_NAME
    assert (loaded.name, loaded.layer, loaded.n_layers) == ("vsae-gelu-1l", 0, 1)
    assert loaded.d_model == loaded.model._model.config.n_embd == 256
    assert loaded.hook_name == "blocks.0.hook_resid_post"
    size = (models.ASSETS_DIR / "model.safetensors").stat().st_size
    assert size < 8e6


def test_tokenizer_single_tokens(loaded):
    tok = loaded.model.tokenizer
    for s in REQUIRED_SINGLE_TOKENS:
        assert len(tok.encode(s)) == 1, s
    batch = tok(["a", "def f(x):\n    return x"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_heldout_loss_well_below_uniform(loaded):
    hf, tok = loaded.model._model, loaded.model.tokenizer
    code = [p for p in islice(corpus.local_corpus("heldout", seed=0), 40) if "has the first letter:" not in p][:8]
    enc = tok([tok.bos_token + p for p in code], return_tensors="pt", padding=True, truncation=True, max_length=128)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = hf(**enc, labels=labels)
    assert torch.isfinite(out.logits).all()
    uniform = math.log(len(tok))
    assert out.loss.item() < uniform - 3.0, (out.loss.item(), uniform)
    info = json.loads((models.ASSETS_DIR / "training_info.json").read_text())
    assert info["heldout_loss_nats_per_token"] < uniform - 3.0


def test_learned_first_letters(loaded):
    hf, tok = loaded.model._model, loaded.model.tokenizer
    # Words never spelled in training (chance is 1/26).
    held = list(corpus.spelling_words("heldout"))[::4]
    assert first_letter_accuracy(hf, tok, held, list(corpus.spelling_words("train"))) > 0.3
    # What SAEBench absorption spells: alphabetic vocabulary tokens.
    alpha = sorted(get_alpha_tokens(tok))
    assert first_letter_accuracy(hf, tok, alpha[::20], alpha) > 0.6


def test_transformer_lens_matches_hf_and_nnsight(loaded, tl):
    tok = loaded.model.tokenizer
    text = "\nimport os has the first letter: I\n cat has the first letter:"
    tokens = tl.to_tokens(text)  # TransformerLens prepends BOS, like SAEBench does
    assert tokens[0, 0].item() == tok.bos_token_id and tokens[0, 1].item() != tok.bos_token_id
    assert tokens[0, 1:].tolist() == tok(text)["input_ids"]
    tl_logits, cache = tl.run_with_cache(tokens)
    with torch.no_grad():
        hf_logits = loaded.model._model(tokens).logits
    with loaded.model.trace(tokens):
        resid = loaded.submodule.output[0].save()
    assert torch.allclose(tl_logits, hf_logits, atol=1e-4)
    assert torch.allclose(cache[loaded.hook_name], resid.value, atol=1e-5)
    assert tl.cfg.model_name == models.DEFAULT_MODEL_NAME and tl.cfg.act_fn == "gelu"


def test_activation_buffer_shapes(loaded):
    buf = ActivationBuffer(corpus.local_corpus("train"), loaded.model, loaded.submodule, d_submodule=loaded.d_model,
                           n_ctxs=8, ctx_len=128, refresh_batch_size=4, out_batch_size=64)
    acts = next(buf)
    assert acts.shape == (64, 256) and torch.isfinite(acts).all()
    assert acts.std() > 0


def test_corrupt_assets_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "default_lm"
    shutil.copytree(models.ASSETS_DIR, bad)
    models.verify_assets(bad)  # an intact copy passes
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(models, "ASSETS_DIR", bad)
    with pytest.raises(RuntimeError, match="model.safetensors"):
        models.load_model("default")
