"""The embedded offline default model: loads, predicts held-out text, matches TransformerLens, and
lets SAEBench's ground-truth first-letter probe (the absorption eval's precondition) find the letters."""

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
from experiments.lm.default_lm import (
    MIN_GT_PROBE_F1, REQUIRED_SINGLE_TOKENS, first_letter_accuracy, saebench_first_letter_probe_f1,
)

torch.set_num_threads(2)
N_LAYERS = 2
SAE_LAYER = 0  # the site SAEBench's first-letter probe reads best (training_info.json's recommended_hook)
MIN_FEATS_FOR_EVAL = 20  # SAEBench's AbsorptionEvalConfig default


def training_info() -> dict:
    return json.loads((models.ASSETS_DIR / "training_info.json").read_text())


@pytest.fixture(scope="module")
def loaded() -> models.LoadedModel:
    return models.load_model("default")


@pytest.fixture(scope="module")
def tl(loaded):
    return loaded.hooked_transformer()


def test_metadata(loaded):
    assert models.load_model(models.DEFAULT_MODEL_NAME).name == models.DEFAULT_MODEL_NAME
    # load_model's default layer is n_layers // 2.
    assert (loaded.name, loaded.layer, loaded.n_layers) == ("vsae-gelu-2l", 1, N_LAYERS)
    assert loaded.d_model == loaded.model._model.config.n_embd == 256
    assert loaded.hook_name == "blocks.1.hook_resid_post"
    size = (models.ASSETS_DIR / "model.safetensors").stat().st_size
    assert size < 20e6
    probe = training_info()["saebench_first_letter_probe"]
    assert probe["recommended_hook"] == f"blocks.{SAE_LAYER}.hook_resid_post"
    assert all(n >= MIN_FEATS_FOR_EVAL for n in probe["layers"][probe["recommended_hook"]]["letters_above_min_f1_by_seed"])


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
    assert training_info()["heldout_loss_nats_per_token"] < uniform - 3.0


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
    assert tl.cfg.n_layers == N_LAYERS
    for layer in range(N_LAYERS):  # every layer's resid_post, not just the default one
        at = models.load_model("default", layer=layer)
        with at.model.trace(tokens):
            resid = at.submodule.output[0].save()
        assert at.hook_name == f"blocks.{layer}.hook_resid_post"
        assert torch.allclose(cache[at.hook_name], resid.value, atol=1e-5)


def test_saebench_first_letter_probe(tl):
    """SAEBench's own ground-truth first-letter probe (as the absorption eval trains it) on a fixed,
    seeded sample of the alphabetic tokens: absorption is evaluable only if at least
    MIN_FEATS_FOR_EVAL letters reach F1 > min_GT_probe_f1 at the SAE's layer."""
    f1 = saebench_first_letter_probe_f1(tl, SAE_LAYER, seed=0, n_words=2000)
    above = sorted(k for k, v in f1.items() if v > MIN_GT_PROBE_F1)
    assert len(above) >= MIN_FEATS_FOR_EVAL, {k: round(v, 2) for k, v in f1.items()}


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
