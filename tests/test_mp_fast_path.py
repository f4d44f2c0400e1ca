"""MP-SAE's Gram fast path (kernel="gram") against the unrolled reference (kernel="unrolled"):
same atoms, codes, residuals and gradients, in both selection modes; the same weights after several
training steps; the memory bound and the fallbacks."""

import copy

import pytest
import torch

from dictionary_learning_ext import ConfigError, MPSAEConfig, MPSAETrainer
from dictionary_learning_ext.latent_activity import LatentActivityTracker
from dictionary_learning_ext.mp_sae import MPSAE, PursuitCodes

SELECTS = ("relu", "abs")
BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0)


def random_mp(seed, D, F, k, select, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    ae = MPSAE(D, F, k=k, select=select, **kw).to(dtype)
    with torch.no_grad():
        ae.b_dec.normal_()
    return ae


def inputs(seed, B, D, ae, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=gen, dtype=torch.float64) * 2).to(dtype) + ae.b_dec.detach()


def assert_same_picks(fast, ref, negligible):
    """The same atom at every step whose coefficient is not negligible. Once a residual is (numerically)
    orthogonal to every atom, which atom takes a ~0 coefficient is decided by rounding: there the paths
    may differ (the unrolled one recomputes correlations of ~1e-17, the Gram one has exactly 0)."""
    meaningful = ref.coefs_BT.detach().abs() > negligible
    assert torch.equal(fast.indices_BT[meaningful], ref.indices_BT[meaningful]), "same atoms picked"


def grads_of(trace, x, ae, g_a, g_r, g_f):
    """Gradients of a loss that reads the coefficients, the final residual and the dense codes."""
    loss = (trace.coefs_BT * g_a).sum() + (trace.residual_BD * g_r).sum() + (trace.codes() * g_f).sum()
    return torch.autograd.grad(loss, [ae.decoder.weight, ae.b_dec, x])


CASES = [(16, 64, 40, 12), (24, 96, 33, 30), (8, 32, 50, 32), (32, 128, 64, 7)]  # (D, F, B, steps)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "D{}-F{}-B{}-T{}".format(*c))
def test_gram_path_equals_unrolled_values_and_gradients(select, dtype, case):
    D, F, B, T = case
    ae = random_mp(sum(case), D, F, T, select, dtype)
    x = inputs(T, B, D, ae, dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    xu, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, fast = ae.pursue_unrolled(xu, T), ae.pursue_gram(xg, T)
    assert (ref.kernel, fast.kernel) == ("unrolled", "gram")
    assert torch.equal(fast.indices_BT, ref.indices_BT), "same atoms picked"
    torch.testing.assert_close(fast.coefs_BT, ref.coefs_BT, **tol)
    torch.testing.assert_close(fast.residual_BD, ref.residual_BD, **tol)
    torch.testing.assert_close(fast.codes(), ref.codes(), **tol)
    torch.testing.assert_close(fast.residual_norms_BT1, ref.residual_norms_BT1, rtol=tol["rtol"], atol=10 * tol["atol"])
    gen = torch.Generator().manual_seed(1)
    g_a, g_r, g_f = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
                     for shape in ((B, T), (B, D), (B, F)))
    for name, g_ref, g_fast in zip(("W_dec", "b_dec", "x"), grads_of(ref, xu, ae, g_a, g_r, g_f),
                                   grads_of(fast, xg, ae, g_a, g_r, g_f)):
        scale = g_ref.abs().max()
        torch.testing.assert_close(g_fast / scale, g_ref / scale, **tol, msg=name)


@pytest.mark.parametrize("select", SELECTS)
def test_gram_path_repeats_atoms_and_zero_rows_like_unrolled(select):
    """Many steps on a small dictionary: atoms are picked again (duplicate indices in a row), and in relu
    mode rows run out of positive correlations (atom 0 with coefficient 0, as relu(c).argmax())."""
    ae = random_mp(7, 6, 10, 10, select, torch.float64)
    with torch.no_grad():  # atoms in the positive orthant: an all-negative residual correlates negatively with all
        W = ae.decoder.weight
        W.copy_(W.abs() / W.abs().norm(dim=0, keepdim=True))
    x = inputs(3, 64, 6, ae, torch.float64)
    x[:4] = ae.b_dec.detach() - 3.0  # every correlation negative
    x[4:6] = ae.b_dec.detach()  # every correlation 0
    ref, fast = ae.pursue_unrolled(x, 25), ae.pursue_gram(x, 25)
    assert_same_picks(fast, ref, negligible=1e-9)
    torch.testing.assert_close(fast.coefs_BT, ref.coefs_BT, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.residual_BD, ref.residual_BD, rtol=1e-10, atol=1e-10)
    repeated = any(len(set(row.tolist())) < row.numel() for row in fast.indices_BT)
    assert repeated, "the test must exercise an atom picked twice"
    if select == "relu":
        stopped = (fast.coefs_BT == 0) & (fast.indices_BT == 0)
        assert stopped.any(), "the test must exercise rows with no positive correlation left"


@pytest.mark.parametrize("select", SELECTS)
def test_training_loss_and_gradients_equal_unrolled(select):
    """The trainer's loss on the fast path reads ||r_k||^2 (x_hat = x - r_k) instead of decoding dense codes:
    the same loss and the same gradients as the reference step."""
    ref = MPSAETrainer(**BASE, steps=10, k=8, select=select, kernel="unrolled")
    fast = MPSAETrainer(**BASE, steps=10, k=8, select=select, kernel="gram")
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(48, 32, generator=gen)) + 0.1 * torch.randn(48, 32, generator=gen)
    out = {}
    for name, trainer in (("ref", ref), ("fast", fast)):
        loss, x_hat, f, terms = trainer.compute_loss(x, step=0)
        loss.backward()
        f = f.to_dense() if isinstance(f, PursuitCodes) else f
        out[name] = (loss.detach(), x_hat.detach(), f.detach(),
                     {n: p.grad.clone() for n, p in trainer.ae.named_parameters()})
    (l_r, xh_r, f_r, g_r), (l_f, xh_f, f_f, g_f) = out["ref"], out["fast"]
    torch.testing.assert_close(l_f, l_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xh_f, xh_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_f, f_r, rtol=1e-5, atol=1e-5)
    for name in g_r:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("select", SELECTS)
def test_update_steps_give_the_unrolled_weights(select):
    ref = MPSAETrainer(**BASE, steps=20, k=6, select=select, kernel="unrolled", lr=1e-3)
    fast = MPSAETrainer(**BASE, steps=20, k=6, select=select, kernel="gram", lr=1e-3)
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        x = torch.relu(torch.randn(64, 32, generator=gen)) + 0.1 * torch.randn(64, 32, generator=gen)
        ref.update(step, x)
        fast.update(step, x)
    for name, p in ref.ae.state_dict().items():
        torch.testing.assert_close(fast.ae.state_dict()[name], p, rtol=1e-4, atol=2e-5, msg=name)
    assert torch.equal(fast.activity.tokens_since_fired, ref.activity.tokens_since_fired)
    assert torch.equal(fast.activity.ever_fired, ref.activity.ever_fired)


def test_logging_loss_returns_dense_codes_summed_over_repeats():
    trainer = MPSAETrainer(**BASE, steps=10, k=40, kernel="gram")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen)
    log = trainer.loss(x, step=0, logging=True)
    assert isinstance(log.f, torch.Tensor) and log.f.shape == (16, 128)
    with torch.no_grad():
        torch.testing.assert_close(log.f, trainer.ae.pursue_unrolled(x, 40).codes(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(log.x_hat, trainer.ae.decode(log.f), rtol=1e-4, atol=1e-4)


def test_activity_from_pursuit_codes_equals_activity_from_dense_codes():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 30, (20, 9), generator=gen)  # repeats included
    vals = torch.rand(20, 9, generator=gen)
    vals[vals < 0.4] = 0.0  # relu coefficients: >= 0, some exactly 0
    codes = PursuitCodes(idx, vals, 30)
    dense, sparse = LatentActivityTracker(30, 100), LatentActivityTracker(30, 100)
    dense.update_from_codes(codes.to_dense())
    sparse.update_from_codes(codes.detach())
    assert torch.equal(dense.ever_fired, sparse.ever_fired)
    assert torch.equal(dense.tokens_since_fired, sparse.tokens_since_fired)
    assert codes.shape == (20, 30)


# --- which kernel runs ------------------------------------------------------------------------------
def test_kernel_choice_memory_bound_and_fallbacks():
    ae = random_mp(0, 16, 256, 8, "relu")
    x = torch.randn(64, 16)
    assert ae.gram_fits() and ae.uses_gram(64, 8)
    assert ae.pursue(x, 8).kernel == "gram"
    # auto: the Gram matrix (F^2 D) must cost less than the unrolled correlations (k B F D)
    assert not ae.uses_gram(batch_size=2, steps=8) and ae.pursue(x[:2], 8).kernel == "unrolled"
    # a threshold-stopped pursuit always runs unrolled
    assert ae.pursue(x, 8, threshold=0.5).kernel == "unrolled"
    # the memory bound: 256^2 x 4 bytes = 0.25 MB
    small = random_mp(0, 16, 256, 8, "relu", gram_max_mb=0.2)
    assert not small.gram_fits() and small.pursue(x, 8).kernel == "unrolled"
    forced = random_mp(0, 16, 256, 8, "relu", kernel="gram", gram_max_mb=0.2)
    assert forced.pursue(x, 8).kernel == "unrolled", "the memory bound wins over kernel='gram'"
    assert random_mp(0, 16, 256, 8, "relu", kernel="gram").pursue(x[:2], 8).kernel == "gram"
    assert random_mp(0, 16, 256, 8, "relu", kernel="unrolled").pursue(x, 8).kernel == "unrolled"
    assert random_mp(0, 16, 256, 8, "relu", gram_max_mb=0.25).gram_fits()
    with torch.no_grad():  # whichever kernel runs, encode gives the same codes
        torch.testing.assert_close(small.encode(x), ae.encode(x), rtol=1e-5, atol=1e-5)


def test_trainer_passes_kernel_options_and_validates_them():
    trainer = MPSAETrainer(**BASE, steps=10, k=4, kernel="unrolled", gram_max_mb=3.0)
    assert (trainer.ae.kernel, trainer.ae.gram_max_mb) == ("unrolled", 3.0)
    assert (trainer.config["kernel"], trainer.config["gram_max_mb"]) == ("unrolled", 3.0)
    common = dict(steps=10, activation_dim=8, dict_size=16, layer=0, lm_name="t", k=4)
    with pytest.raises(ConfigError, match="kernel='fast' must be one of"):
        MPSAEConfig.from_dict({**common, "kernel": "fast"})
    with pytest.raises(ConfigError, match="gram_max_mb"):
        MPSAEConfig.from_dict({**common, "gram_max_mb": -1.0})
    with pytest.raises(ValueError, match="kernel="):
        MPSAE(8, 16, k=2, kernel="fast")


def test_backward_memory_does_not_grow_with_steps_times_dict():
    """Bytes the fast path keeps for backward: one more step adds O(B) (index, coefficient, correlation),
    neither a (B, D) residual nor a (B, F) correlation."""
    B, D, F = 64, 16, 1024

    def saved_bytes(k: int) -> int:
        ae = random_mp(0, D, F, k, "relu", kernel="gram")
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(B, D)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ae.pursue(x, k).residual_BD.square().sum()
        return total

    per_step = (saved_bytes(33) - saved_bytes(1)) / 32
    assert per_step <= B * (8 + 4 + 4), per_step


def test_same_seed_same_weights_on_the_fast_path():
    def run():
        trainer = MPSAETrainer(**BASE, steps=6, k=6, kernel="gram")
        for step in range(6):
            gen = torch.Generator().manual_seed(step)
            trainer.update(step, torch.randn(32, 32, generator=gen))
        return copy.deepcopy(trainer.ae.state_dict())

    a, b = run(), run()
    assert all(torch.equal(a[key], b[key]) for key in a)
