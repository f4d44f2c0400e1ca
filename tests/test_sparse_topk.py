"""The k-sparse training step (kernel="sparse") against the dense reference (kernel="dense")."""

import copy

import pytest
import torch

from dictionary_learning_ext import VSAETopKTrainer
from dictionary_learning_ext.sparse_topk import TopKCodes, gather_dot, scatter_outer, sparse_rows_matmul

BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0, steps=100)
PARAMS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")


def distinct_indices(B, K, F, gen):
    return torch.stack([torch.randperm(F, generator=gen)[:K] for _ in range(B)])


@pytest.mark.parametrize("K", [1, 7, 64])
def test_kernels_match_dense_products(K):
    gen = torch.Generator().manual_seed(K)
    B, F, D = 33, 64, 16
    idx = distinct_indices(B, K, F, gen)
    vals, M, A = torch.randn(B, K, generator=gen), torch.randn(F, D, generator=gen), torch.randn(B, D, generator=gen)
    codes = torch.zeros(B, F).scatter(-1, idx, vals)
    torch.testing.assert_close(sparse_rows_matmul(idx, vals, M), codes @ M)
    torch.testing.assert_close(gather_dot(idx, A, M), (A @ M.T).gather(-1, idx))
    torch.testing.assert_close(scatter_outer(idx, vals, A, F), codes.T @ A)


def make_pair(**kw):
    """Two trainers, identical but for the kernel (same seed: same weights and noise stream)."""
    cfg = {**BASE, "kl_warmup_frac": 0.0, **kw}
    return VSAETopKTrainer(**cfg, kernel="dense"), VSAETopKTrainer(**cfg, kernel="sparse")


def data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, 32, generator=gen)) + 0.1 * torch.randn(n, 32, generator=gen)


def kill_half(trainer):
    """Mark every odd latent dead so auxK has work (window of one batch, odd latents 'silent')."""
    trainer.activity.tokens_since_fired[1::2] = trainer.cfg.dead_window_tokens


def loss_and_grads(trainer, x, autocast=False):
    trainer.ae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, f, terms = trainer.compute_loss(x, step=10)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.ae.named_parameters()}
    return loss.detach(), {k: torch.as_tensor(v).detach() for k, v in terms.items()}, grads, f


VARIANTS = [
    dict(select_on="mean", kl_scope="selected"),
    dict(select_on="sample", kl_scope="selected", select_by="magnitude", mean_activation="identity"),
    dict(select_on="sample", kl_scope="all", select_by="magnitude"),   # the paper variant's choices
    dict(select_on="mean", kl_scope="selected", learned_var=True, log_var_init=-1.0),
    dict(select_on="sample", kl_scope="all", learned_var=True, log_var_init=-1.0),
    dict(select_on="mean", kl_scope="selected", sampling=False),
    dict(select_on="sample", kl_scope="selected", sigma=0.5),
]


@pytest.mark.parametrize("k", [1, 8, 48])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_sparse_loss_and_gradients_equal_dense(k, variant):
    dense, sparse = make_pair(k=k, auxk_alpha=0.25, **variant)
    for t in (dense, sparse):
        kill_half(t)
    x = data()
    l_d, terms_d, g_d, f_d = loss_and_grads(dense, x)
    l_s, terms_s, g_s, f_s = loss_and_grads(sparse, x)
    assert terms_d["auxk_loss"] > 0, "auxK must be active in this test"
    torch.testing.assert_close(l_s, l_d, rtol=1e-5, atol=1e-5)
    for name in terms_d:
        torch.testing.assert_close(terms_s[name], terms_d[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(f_s, TopKCodes)
    torch.testing.assert_close(f_s.to_dense(), f_d.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [4, 32])
@pytest.mark.parametrize("variant", VARIANTS[:3], ids=["mean", "sample", "paper-like"])
def test_sparse_update_steps_give_the_dense_weights(k, variant):
    dense, sparse = make_pair(k=k, auxk_alpha=0.25, lr=1e-3, **variant)
    for t in (dense, sparse):
        kill_half(t)
    probe = copy.deepcopy(dense)
    assert probe.compute_loss(data(48), step=0)[3]["auxk_loss"] > 0, "auxK must be active in this test"
    for step in range(6):
        x = data(48, seed=step)
        dense.update(step, x)
        sparse.update(step, x)
    for name, p in dense.ae.state_dict().items():
        # Adam divides by sqrt(v): float-level gradient differences stay float-level after 6 steps.
        torch.testing.assert_close(sparse.ae.state_dict()[name], p, rtol=1e-4, atol=2e-5, msg=name)
    assert torch.equal(sparse.activity.tokens_since_fired, dense.activity.tokens_since_fired)
    assert torch.equal(sparse.activity.ever_fired, dense.activity.ever_fired)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=["mean", "sample", "paper-like"])
def test_sparse_matches_dense_under_bf16_autocast(variant):
    """Under bf16 autocast the dense kernel decodes and back-propagates in bfloat16 (8-bit
    mantissa: ~0.4% relative error per rounding) while the k-sparse ops run in float32; both
    share the bf16 encoder forward, so they select the same latents. Hence: loss within 2%,
    gradients with cosine similarity > 0.99 and norms within 5%."""
    dense, sparse = make_pair(k=8, auxk_alpha=0.25, **variant)
    for t in (dense, sparse):
        kill_half(t)
    x = data()
    l_d, _, g_d, f_d = loss_and_grads(dense, x, autocast=True)
    l_s, _, g_s, f_s = loss_and_grads(sparse, x, autocast=True)
    assert torch.equal((f_s.to_dense() != 0), (f_d != 0)), "same latents selected"
    assert l_s.item() == pytest.approx(l_d.item(), rel=0.02)
    for name in PARAMS:
        assert cosine(g_s[name], g_d[name]) > 0.99, name
        assert g_s[name].norm().item() == pytest.approx(g_d[name].norm().item(), rel=0.05), name
    # A few steps: the weights move alike (Adam's first steps are ~lr * sign(g), so compare the
    # weight changes as a whole, not elementwise).
    before = copy.deepcopy(dense.ae.state_dict())
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense.update(step + 1, data(48, seed=10 + step))
            sparse.update(step + 1, data(48, seed=10 + step))
    for name in PARAMS:
        d_delta = dense.ae.state_dict()[name] - before[name]
        s_delta = sparse.ae.state_dict()[name] - before[name]
        assert cosine(s_delta, d_delta) > 0.95, name


def test_sparse_path_does_not_build_dense_codes_or_backprop_densely():
    """With kl_scope="selected" no gradient reaches unselected encoder rows or decoder atoms and
    the training codes come back as (indices, values)."""
    _, sparse = make_pair(k=4, auxk_alpha=0.0, kl_scope="selected", select_on="mean")
    x = data(16)
    _, _, g, f = loss_and_grads(sparse, x)
    assert isinstance(f, TopKCodes) and f.idx_BK.shape == (16, 4)
    selected = torch.zeros(128, dtype=torch.bool)
    selected[f.idx_BK.flatten()] = True
    assert (g["encoder.weight"][~selected] == 0).all() and (g["decoder.weight"][:, ~selected] == 0).all()
    assert (g["encoder.weight"][selected] != 0).any()


def test_same_seed_same_weights_sparse():
    def run():
        trainer = VSAETopKTrainer(**BASE, k=8, select_on="sample")
        for step in range(5):
            trainer.update(step, data(32, seed=step))
        return trainer.ae.state_dict()

    a = run()
    torch.manual_seed(123)
    b = run()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_logging_loss_returns_dense_codes():
    _, sparse = make_pair(k=8)
    log = sparse.loss(data(16), step=0, logging=True)
    assert isinstance(log.f, torch.Tensor) and log.f.shape == (16, 128)
    assert ((log.f != 0).sum(-1) <= 8).all()


def test_kernel_option_is_validated():
    from dictionary_learning_ext import ConfigError

    with pytest.raises(ConfigError, match="kernel='csr' must be one of"):
        VSAETopKTrainer(**BASE, k=8, kernel="csr")
    with pytest.raises(ConfigError, match="sampling must be a bool"):
        VSAETopKTrainer(**BASE, k=8, sampling=0)


def test_decoder_grad_projection_equals_dictionary_learnings():
    from dictionary_learning.trainers.trainer import remove_gradient_parallel_to_decoder_directions

    from dictionary_learning_ext.trainer_base import remove_parallel_decoder_grad_

    gen = torch.Generator().manual_seed(0)
    W, G = torch.randn(16, 40, generator=gen), torch.randn(16, 40, generator=gen)
    ours = remove_parallel_decoder_grad_(W, G.clone())
    torch.testing.assert_close(ours, remove_gradient_parallel_to_decoder_directions(W, G.clone(), 16, 40))
    # What is left is orthogonal to every atom.
    assert ((ours * W).sum(0)).abs().max() < 1e-5


def test_activity_from_topk_equals_activity_from_dense_codes():
    from dictionary_learning_ext.latent_activity import LatentActivityTracker

    gen = torch.Generator().manual_seed(3)
    idx = distinct_indices(20, 5, 30, gen)
    vals = torch.randn(20, 5, generator=gen)
    vals[vals.abs() < 0.5] = 0.0  # selected but zero (ReLU zeros ranked into the top-k): not fired
    dense, sparse = LatentActivityTracker(30, 100), LatentActivityTracker(30, 100)
    dense.update_from_codes(torch.zeros(20, 30).scatter(-1, idx, vals))
    sparse.update_from_codes(TopKCodes(idx, vals, 30))
    assert torch.equal(dense.ever_fired, sparse.ever_fired)
    assert torch.equal(dense.tokens_since_fired, sparse.tokens_since_fired)
    assert not dense.ever_fired.all() and dense.ever_fired.any()


# --- auxK on a few dead latents: the column path of auxk_select ---------------------------------------
def masked_topk_reference(scores_BF, dead_F, k_aux):
    """auxK's selection as dictionary_learning writes it: a top-k over the scores, live latents at -inf."""
    masked = torch.where(dead_F[None], scores_BF, torch.full_like(scores_BF, -torch.inf))
    return masked.topk(min(k_aux, int(dead_F.sum())), dim=-1, sorted=False).indices


@pytest.mark.parametrize("num_dead", [1, 5, 16, 19, 63, 64, 100, 128])
def test_auxk_select_picks_the_masked_topk_set(num_dead):
    from dictionary_learning_ext.auxk import auxk_select

    gen = torch.Generator().manual_seed(num_dead)
    scores = torch.randn(40, 128, generator=gen)  # continuous: no ties, so the set is unique
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128, generator=gen)[:num_dead]] = True
    ours = auxk_select(scores, dead, 16)
    ref = masked_topk_reference(scores, dead, 16)
    assert ours.shape == ref.shape == (40, min(16, num_dead))
    assert torch.equal(ours.sort(dim=-1).values, ref.sort(dim=-1).values)
    assert auxk_select(scores, torch.zeros(128, dtype=torch.bool), 16) is None


def kill(trainer, latents):
    trainer.activity.tokens_since_fired[latents] = trainer.cfg.dead_window_tokens


@pytest.mark.parametrize("num_dead", [3, 40], ids=["fewer-than-k_aux", "fewer-than-half"])
@pytest.mark.parametrize("variant", VARIANTS[:3], ids=["mean", "sample", "paper-like"])
def test_auxk_on_few_dead_latents_sparse_equals_dense_equals_masked_reference(num_dead, variant, monkeypatch):
    """The column path changes neither kernel's loss nor gradients: both kernels agree with each other, and
    the dense kernel agrees with itself run on the masked (B, F) top-k of the reference selection."""
    import dictionary_learning_ext.auxk as auxk

    dense, sparse = make_pair(k=8, auxk_alpha=0.25, **variant)
    latents = torch.arange(1, 128, 3)[:num_dead]
    for t in (dense, sparse):
        kill(t, latents)
    reference = copy.deepcopy(dense)  # before any step: the same noise generator state
    x = data()
    l_d, terms_d, g_d, _ = loss_and_grads(dense, x)
    l_s, terms_s, g_s, _ = loss_and_grads(sparse, x)
    assert terms_d["auxk_loss"] > 0
    torch.testing.assert_close(l_s, l_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms_s["auxk_loss"], terms_d["auxk_loss"], rtol=1e-5, atol=1e-6)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    monkeypatch.setattr(auxk, "auxk_select", lambda s, d, k: masked_topk_reference(s, d, k) if d.any() else None)
    l_r, terms_r, g_r, _ = loss_and_grads(reference, x)
    torch.testing.assert_close(l_d, l_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms_d["auxk_loss"], terms_r["auxk_loss"], rtol=1e-6, atol=1e-7)
    for name in g_r:
        torch.testing.assert_close(g_d[name], g_r[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("k", [8, 32], ids=["bag-scatter", "dense-scatter"])
def test_sparse_gradients_on_both_sides_of_the_dense_scatter_threshold(k):
    """scatter_outer switches to a dense product from DENSE_SCATTER_DENSITY (k / F) on: same gradients."""
    from dictionary_learning_ext.sparse_topk import DENSE_SCATTER_DENSITY

    assert (k / 128 >= DENSE_SCATTER_DENSITY) == (k == 32)
    dense, sparse = make_pair(k=k, auxk_alpha=0.25)
    for t in (dense, sparse):
        kill_half(t)
    x = data()
    _, _, g_d, _ = loss_and_grads(dense, x)
    _, _, g_s, _ = loss_and_grads(sparse, x)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
