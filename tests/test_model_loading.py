"""The hub paths of load_model, exercised offline with local stand-ins."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import pytest
import torch
from dictionary_learning import AutoEncoder, ActivationBuffer
from dictionary_learning.evaluation import evaluate
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from experiments.lm import models
from experiments.lm.corpus import local_corpus

torch.set_num_threads(2)
D = 32


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models.ASSETS_DIR)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, tok) -> Path:
    """A tiny random pythia-like (GPTNeoX) model saved like a hub snapshot."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("pythia-standin")
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_gelu_1l(monkeypatch, tok) -> HookedTransformer:
    """Stand-in for HookedTransformer.from_pretrained_no_processing('gelu-1l')."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_model=D, n_ctx=64, d_head=8, n_heads=4, d_mlp=128,
                                  d_vocab=len(tok), act_fn="gelu", normalization_type="LN", model_name="gelu-1l")
    tiny = HookedTransformer(cfg, tokenizer=tok)
    calls = []
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing",
                        lambda name, **kw: calls.append(name) or tiny)
    tiny.calls = calls
    return tiny


def _buffer(loaded: models.LoadedModel, ctx_len: int = 32) -> ActivationBuffer:
    return ActivationBuffer(local_corpus("heldout"), loaded.model, loaded.submodule, d_submodule=loaded.d_model,
                            n_ctxs=8, ctx_len=ctx_len, refresh_batch_size=4, out_batch_size=16)


def _check_buffer_and_evaluate(loaded: models.LoadedModel) -> None:
    buf = _buffer(loaded)
    acts = next(buf)
    assert acts.shape == (16, loaded.d_model) and torch.isfinite(acts).all()
    torch.manual_seed(0)
    ae = AutoEncoder(loaded.d_model, 2 * loaded.d_model)
    out = evaluate(ae, buf, max_len=32, batch_size=4, n_batches=1)
    for key in ("l2_loss", "frac_variance_explained", "loss_original", "loss_reconstructed", "loss_zero", "frac_recovered"):
        assert math.isfinite(out[key]), (key, out)
    # A random model is near the uniform baseline; the zero-ablation must change the loss.
    assert out["loss_original"] != out["loss_zero"]


def test_pythia_like_local_dir(neox_dir):
    loaded = models.load_model(str(neox_dir), layer=1)
    assert (loaded.name, loaded.layer, loaded.n_layers, loaded.d_model) == (str(neox_dir), 1, 2, D)
    assert loaded.hook_name == "blocks.1.hook_resid_post"
    assert loaded.model.tokenizer.padding_side == "right"
    # The envoy is the second GPTNeoX layer; its output[0] is the residual stream after it.
    hf = loaded.model._model
    enc = loaded.model.tokenizer(["import os\nprint(os.sep)"], return_tensors="pt")
    with loaded.model.trace(enc["input_ids"]):
        out = loaded.submodule.output.save()
    acts = out.value[0] if isinstance(out.value, tuple) else out.value
    ref = hf(**enc, output_hidden_states=True).hidden_states  # hidden_states[2] is after layer 1 + final LN
    assert acts.shape == (1, enc["input_ids"].shape[1], D)
    assert torch.allclose(hf.gpt_neox.final_layer_norm(acts), ref[2], atol=1e-5)
    _check_buffer_and_evaluate(loaded)


def test_default_layer_is_middle(neox_dir):
    assert models.load_model(str(neox_dir)).layer == 1


@pytest.mark.parametrize("layer", [2, -1, 7])
def test_layer_out_of_range(neox_dir, layer):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        models.load_model(str(neox_dir), layer=layer)


def test_gelu_1l_via_transformer_lens(tiny_gelu_1l):
    loaded = models.load_model("gelu-1l")
    assert tiny_gelu_1l.calls == ["gelu-1l"]
    assert (loaded.name, loaded.layer, loaded.n_layers, loaded.d_model) == ("gelu-1l", 0, 1, D)
    assert loaded.hook_name == "blocks.0.hook_resid_post"
    assert loaded.hooked_transformer() is tiny_gelu_1l
    tokens = torch.tensor([[0, 5, 17, 300, 42, 9]])
    with loaded.model.trace(tokens):
        acts = loaded.submodule.output.save()
        logits = loaded.model.output.save()
    _, cache = tiny_gelu_1l.run_with_cache(tokens)
    assert torch.allclose(acts.value, cache["blocks.0.hook_resid_post"], atol=1e-6)
    assert torch.allclose(logits.value, tiny_gelu_1l(tokens), atol=1e-6)
    _check_buffer_and_evaluate(loaded)
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.0"):
        models.load_model("gelu-1l", layer=1)


def test_tl_wrapper_rejects_unknown_kwargs(tiny_gelu_1l):
    wrapper = models.TLForNNsight(tiny_gelu_1l)
    ids = torch.tensor([[1, 2, 3]])
    assert wrapper(input_ids=ids, use_cache=False, output_attentions=False).shape == (1, 3, len(tiny_gelu_1l.tokenizer))
    with pytest.raises(TypeError, match="labels"):
        wrapper(input_ids=ids, labels=ids)


@pytest.mark.parametrize("name", ["no-such-model", "nobody/not-a-model-xyz", "./missing-dir"])
def test_unknown_model_name(name):
    with pytest.raises(ValueError) as e:
        models.load_model(name)
    msg = str(e.value)
    assert "vsae-gelu-2l" in msg and "gelu-1l" in msg and "EleutherAI/pythia-70m-deduped" in msg
