"""The variational pieces checked against closed forms and torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dictionary_learning_ext import VSAETopKTrainer, VSAETrainer
from dictionary_learning_ext.gaussian import kl_to_standard_normal
from dictionary_learning_ext.schedules import linear_warmup


def _sampled_topk(trainer, mu, log_var):
    """The training-time (indices, sampled values) of the k selected latents."""
    idx, eps = trainer.select_latents(mu, log_var)
    return idx, trainer.sampled_values(mu.gather(-1, idx), log_var.gather(-1, idx), eps)

BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0)


def vsae(**kw):
    return VSAETrainer(**{**BASE, "steps": 100, **kw})


def vsae_topk(**kw):
    # Fixed unit variance and a plain KL sum unless a test asks otherwise (the closed forms below assume them).
    return VSAETopKTrainer(**{**BASE, "steps": 100, "k": 8, "learned_var": False, "kl_normalize": False, **kw})


def test_kl_matches_torch_distributions_fixed_and_learned_variance():
    torch.manual_seed(0)
    mu = torch.randn(64, 128)
    for log_var in (torch.zeros(64, 128), torch.full((64, 128), 2 * math.log(0.3)), torch.randn(64, 128)):
        ours = kl_to_standard_normal(mu, log_var)
        ref = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learned_var", [False, True])
def test_trainer_kl_term_is_the_closed_form(learned_var, sparse_data):
    trainer = vsae(learned_var=learned_var, log_var_init=-1.0, kl_warmup_frac=0.0, l1_penalty=0.0)
    x = sparse_data()
    _, _, _, terms = trainer.compute_loss(x, step=50)
    mu, log_var = trainer.ae.posterior(x)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(terms["kl_loss"], ref, rtol=1e-5, atol=1e-5)


def test_vsae_training_noise_is_really_sampled_with_variance_sigma_squared():
    trainer = vsae(sigma=0.5, code_activation="identity")
    x = torch.randn(2048, 32)
    mu, log_var = trainer.ae.posterior(x)
    from dictionary_learning_ext.gaussian import reparameterize

    z = reparameterize(mu, log_var, trainer.generator)
    noise = z - mu
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(0.25, rel=0.03)


def test_vsae_topk_noise_only_on_selected_latents_when_selecting_on_mean():
    trainer = vsae_topk(select_on="mean", sigma=0.5)
    x = torch.randn(4096, 32)
    mu, log_var = trainer.ae.posterior(x)
    idx, vals = _sampled_topk(trainer, mu, log_var)
    torch.testing.assert_close(idx, trainer.ae.top_k_indices(mu))  # same latents as at evaluation
    noise = vals - mu.gather(-1, idx)
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(0.25, rel=0.03)


def test_vsae_topk_select_on_sample_ranks_the_noisy_latents():
    trainer = vsae_topk(select_on="sample", select_by="magnitude", mean_activation="identity")
    x = torch.randn(16, 32)
    mu, log_var = trainer.ae.posterior(x)
    state = trainer.generator.get_state()
    idx, vals = _sampled_topk(trainer, mu, log_var)
    trainer.generator.set_state(state)
    z = mu + torch.randn(mu.shape, generator=trainer.generator)
    torch.testing.assert_close(vals, z.gather(-1, idx))
    kth = z.abs().topk(8, dim=-1).values[:, -1:]
    assert (vals.abs() >= kth - 1e-6).all()
    assert (vals < 0).any(), "magnitude selection keeps negative codes"


@pytest.mark.parametrize("make", [vsae, vsae_topk])
def test_encode_is_deterministic_and_noise_free_in_both_modes(make):
    trainer = make()
    x = torch.randn(32, 32)
    for mode in (True, False):
        trainer.ae.train(mode)
        f1, f2 = trainer.ae.encode(x), trainer.ae.encode(x)
        torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    mu = trainer.ae.mean(x)
    f = trainer.ae.encode(x)
    nz = f != 0
    torch.testing.assert_close(f[nz], mu[nz].relu() if make is vsae else mu[nz])


@pytest.mark.parametrize("make", [vsae, vsae_topk])
def test_gradients_reach_encoder_and_log_var_head_through_the_sample(make):
    trainer = make(learned_var=True, log_var_init=-1.0, kl_warmup_frac=0.0)
    loss, *_ = trainer.compute_loss(torch.randn(64, 32), step=10)
    loss.backward()
    ae = trainer.ae
    for name, p in (("W_enc", ae.encoder.weight), ("b_enc", ae.encoder.bias), ("log_var", ae.log_var_head.weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reconstruction_gradient_reaches_log_var_head_not_only_the_kl():
    # With beta = 0 the log-variance head learns only through the sampled reconstruction.
    trainer = vsae_topk(learned_var=True, log_var_init=-1.0, beta=0.0, auxk_alpha=0.0)
    loss, *_ = trainer.compute_loss(torch.randn(64, 32), step=10)
    loss.backward()
    assert trainer.ae.log_var_head.bias.grad.abs().sum() > 0


def test_kl_warmup_schedule_values():
    schedule = linear_warmup(2.0, 0.1, 1000)
    assert schedule(0) == 0.0
    assert schedule(50) == pytest.approx(1.0)
    assert schedule(100) == 2.0
    assert schedule(999) == 2.0
    assert linear_warmup(2.0, 0.0, 1000)(0) == 2.0  # 0 means no warm-up, not "default"
    assert linear_warmup(1.0, 1.0, 100)(50) == pytest.approx(0.5)


def test_trainer_uses_beta_schedule(sparse_data):
    trainer = vsae_topk(beta=1.0, kl_warmup_frac=0.5, steps=100)
    x = sparse_data()
    for step, expected in ((0, 0.0), (25, 0.5), (50, 1.0), (80, 1.0)):
        trainer.compute_loss(x, step=step)
        assert trainer.beta == pytest.approx(expected)


def test_kl_scope_selected_ignores_unselected_latents():
    trainer = vsae_topk(kl_scope="selected", select_on="mean", kl_warmup_frac=0.0, auxk_alpha=0.0)
    x = torch.randn(8, 32)
    torch.manual_seed(1)
    _, _, _, terms = trainer.compute_loss(x, step=0)
    mu, log_var = trainer.ae.posterior(x)
    idx = trainer.ae.top_k_indices(mu)
    expected = kl_to_standard_normal(mu.gather(-1, idx), log_var.gather(-1, idx)).sum(-1).mean()
    torch.testing.assert_close(terms["kl_loss"], expected)
    # Moving only unselected encoder rows leaves the KL unchanged.
    unselected = torch.ones(128, dtype=torch.bool)
    unselected[idx.flatten()] = False
    with torch.no_grad():
        trainer.ae.encoder.bias[unselected] -= 100.0
    _, _, _, terms2 = trainer.compute_loss(x, step=0)
    torch.testing.assert_close(terms2["kl_loss"], expected)


def test_kl_scope_all_counts_every_latent():
    trainer = vsae_topk(kl_scope="all", kl_warmup_frac=0.0, auxk_alpha=0.0)
    x = torch.randn(8, 32)
    _, _, _, terms = trainer.compute_loss(x, step=0)
    mu, log_var = trainer.ae.posterior(x)
    torch.testing.assert_close(terms["kl_loss"], kl_to_standard_normal(mu, log_var).sum(-1).mean())


@pytest.mark.parametrize("make", [vsae, vsae_topk])
def test_loss_is_float32_under_bf16_autocast(make, sparse_data):
    trainer = make(kl_warmup_frac=0.0)
    x = sparse_data()
    state = trainer.generator.get_state()
    ref, _, _, ref_terms = trainer.compute_loss(x, step=0)
    trainer.generator.set_state(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _, terms = trainer.compute_loss(x, step=0)
    assert loss.dtype == torch.float32 and terms["kl_loss"].dtype == torch.float32
    # bf16 matmuls move the codes a little; the float32 KL keeps the total close.
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
