"""saebench_adapters.wrappers: one registry-driven BaseSAE for every architecture."""

import dataclasses

import pytest
import torch
from sae_bench.custom_saes.base_sae import BaseSAE

import dictionary_learning_ext as dle
from saebench_adapters.wrappers import DictionarySAE, WrapperError, wrap_dictionary

D, F, K = 16, 64, 4


def make_trainer(arch_name: str, **overrides):
    """A trainer of any registered architecture with small sizes (its dictionary is ``.ae``)."""
    arch = dle.ARCHITECTURES[arch_name]
    names = {f.name for f in dataclasses.fields(arch.config_class)}
    values = dict(steps=5000, activation_dim=D, dict_size=F, layer=0, lm_name="tiny-lm")
    if "k" in names:
        values["k"] = K
    for key, value in (("seed", 0), ("device", "cpu")):
        if key in names:
            values[key] = value
    values.update(overrides)
    cfg = arch.trainer_config(**values)
    trainer_class = cfg.pop("trainer")
    torch.manual_seed(0)
    return trainer_class(**cfg)


@torch.no_grad()
def perturb(dictionary, seed: int = 0) -> None:
    """Move a fresh dictionary away from its tied init (random biases, encoder noise), keeping the
    decoder's column norms as they are."""
    gen = torch.Generator().manual_seed(seed)
    enc = getattr(dictionary, "encoder", None)  # tied architectures (MP-SAE) have none
    if enc is not None:
        enc.weight.add_(0.3 * torch.randn(enc.weight.shape, generator=gen))
        enc.bias.copy_(0.2 * torch.randn(enc.bias.shape, generator=gen))
    for name in ("b_dec", "bias"):
        p = getattr(dictionary, name, None)
        if isinstance(p, torch.nn.Parameter) and p.shape == (D,):
            p.copy_(0.5 * torch.randn(D, generator=gen))
    if hasattr(dictionary, "threshold"):
        dictionary.threshold.fill_(0.05)


@pytest.mark.parametrize("arch_name", sorted(dle.ARCHITECTURES))
def test_wrapper_matches_dictionary_for_every_registered_architecture(arch_name):
    trainer = make_trainer(arch_name)
    dictionary = trainer.ae.eval()
    perturb(dictionary)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        f_ref = dictionary.encode(x.reshape(-1, D))
        x_hat_ref = dictionary.decode(f_ref)
        norms = dictionary.decoder.weight.norm(dim=0)  # (F,); != 1 only for a fresh AutoEncoder

    sae = wrap_dictionary(dictionary, trainer.config)
    assert isinstance(sae, BaseSAE)
    assert sae.check_decoder_norms()
    cfg = sae.cfg
    assert (cfg.model_name, cfg.d_in, cfg.d_sae, cfg.hook_layer) == ("tiny-lm", D, F, 0)
    assert cfg.hook_name == "blocks.0.hook_resid_post"
    assert cfg.architecture == arch_name and cfg.dtype == "float32"
    with torch.no_grad():
        f_2d = sae.encode(x.reshape(-1, D))
        f_3d = sae.encode(x)
        assert isinstance(f_3d, torch.Tensor) and f_3d.shape == (2, 5, F)
        torch.testing.assert_close(f_3d.reshape(-1, F), f_2d)
        # Codes equal the dictionary's up to the folded decoder norms (1 for unit-norm decoders).
        torch.testing.assert_close(f_2d, f_ref * norms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f_2d), x_hat_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x.reshape(-1, D)), x_hat_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), f_3d)  # deterministic
    assert (f_2d != 0).any()


def test_encode_reads_the_w_enc_parameter_saebench_reads():
    trainer = make_trainer("vsae_topk")
    perturb(trainer.ae)
    sae = wrap_dictionary(trainer.ae, trainer.config)
    x = torch.randn(8, D)
    with torch.no_grad():
        before = sae.encode(x)
        sae.W_enc.mul_(-1.0)
        after_inplace = sae.encode(x)
        sae.W_enc.data = torch.zeros(D, F)
        sae.b_enc.data = torch.ones(F)
        after_replace = sae.encode(x)
    assert not torch.allclose(before, after_inplace)
    # All pre-activations equal 1: every selected code is exactly 1.
    assert torch.equal(after_replace.sum(-1), torch.full((8,), float(K)))
    # The dictionary holds no stale copy of the four SAEBench parameters.
    names = dict(sae.dictionary.named_parameters())
    assert "encoder.weight" not in names and "decoder.weight" not in names
    assert {n for n, _ in sae.named_parameters()} >= {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_extra_dictionary_state_is_kept_and_dtype_moves_follow():
    """VSAE with a learned log-variance head: the head is not used at eval and needs no mapping."""
    trainer = make_trainer("vsae", learned_var=True)
    perturb(trainer.ae)
    x = torch.randn(8, D)
    with torch.no_grad():
        ref = trainer.ae.encode(x)
    sae = wrap_dictionary(trainer.ae, trainer.config)
    assert hasattr(sae.dictionary, "log_var_head")
    torch.testing.assert_close(sae.encode(x), ref)
    sae = sae.to(dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64 and sae.dtype == torch.float64
    torch.testing.assert_close(sae.encode(x.double()).float(), ref, rtol=1e-5, atol=1e-5)


def test_topk_decoder_that_is_not_unit_norm_is_refused():
    trainer = make_trainer("top_k")
    with torch.no_grad():
        trainer.ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, F))
    with pytest.raises(WrapperError, match="unit norm"):
        wrap_dictionary(trainer.ae, trainer.config)


def test_config_that_does_not_match_the_dictionary_is_refused():
    trainer = make_trainer("vsae_topk")
    with pytest.raises(WrapperError, match="dict_size"):
        wrap_dictionary(trainer.ae, {**trainer.config, "dict_size": F * 2})
    other = make_trainer("top_k")
    with pytest.raises(WrapperError, match="TopKTrainer"):
        wrap_dictionary(trainer.ae, other.config)
    with pytest.raises(WrapperError, match="lm_name"):
        wrap_dictionary(trainer.ae, {k: v for k, v in trainer.config.items() if k != "lm_name"})
    assert isinstance(wrap_dictionary(trainer.ae, trainer.config), DictionarySAE)


# --- decoder norms: unit, folded, or free (declared by the dictionary) ------------------------------------
def test_cfg_records_unit_and_folded_decoder_norms():
    unit = wrap_dictionary(make_trainer("vsae_topk").ae, make_trainer("vsae_topk").config)
    assert unit.cfg.decoder_norms == "unit" and unit.cfg.to_dict()["decoder_norms"] == "unit"
    assert unit.cfg.apply_b_dec_to_input is True
    trainer = make_trainer("vsae")  # ReLU codes: scaling a latent's code does not change the others
    perturb(trainer.ae)
    with torch.no_grad():
        trainer.ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, F))
        x = torch.randn(8, D)
        ref = trainer.ae(x)
    folded = wrap_dictionary(trainer.ae, trainer.config)
    assert folded.cfg.decoder_norms == "folded" and folded.check_decoder_norms()
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_vsae_topk_claiming_unit_norm_with_other_norms_is_still_refused():
    trainer = make_trainer("vsae_topk")
    with torch.no_grad():
        trainer.ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, F))
    with pytest.raises(WrapperError, match="unit_norm_decoder = False"):
        wrap_dictionary(trainer.ae, trainer.config)


def test_declared_free_decoder_is_presented_unchanged():
    trainer = make_trainer("vsae_topk", unit_norm_decoder=False, center_input=False)
    perturb(trainer.ae)
    with torch.no_grad():
        trainer.ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, F))  # TopK: folding would change the winners
        x = torch.randn(16, D)
        f_ref = trainer.ae.encode(x)
        x_hat_ref = trainer.ae(x)
        W_dec_ref = trainer.ae.decoder.weight.T.clone()
    sae = wrap_dictionary(trainer.ae, trainer.config)
    assert sae.cfg.decoder_norms == "free" and sae.cfg.apply_b_dec_to_input is False
    assert torch.equal(sae.W_dec.detach(), W_dec_ref)  # nothing folded
    with torch.no_grad():
        assert torch.equal(sae.encode(x), f_ref)
        assert torch.equal(sae(x), x_hat_ref)
