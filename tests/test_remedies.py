"""Mechanics of the dead-latent remedies of VSAETopKTrainer (issue 7), in both kernels."""

import pytest
import torch

from dictionary_learning_ext import ConfigError, VSAETopKTrainer
from dictionary_learning_ext.gaussian import kl_to_standard_normal
from dictionary_learning_ext.sparse_topk import TopKCodes
from dictionary_learning_ext.vsae_topk import PAPER_VARIANT

BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0, steps=100,
            kl_warmup_frac=0.0)
KERNELS = ["sparse", "dense"]


# The mechanics are checked one option at a time, from fixed unit variance and an unnormalised KL
# (the recommended default turns on learned variance and normalisation; tests here set them explicitly).
ISOLATED = dict(learned_var=False, kl_normalize=False)


def trainer(**kw):
    return VSAETopKTrainer(**{**BASE, **ISOLATED, "k": 8, **kw})


def data(n=64, seed=0):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def grads_of(term: torch.Tensor, t: VSAETopKTrainer) -> dict[str, torch.Tensor]:
    t.ae.zero_grad(set_to_none=True)
    term.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in t.ae.named_parameters()}


def codes(f) -> torch.Tensor:
    return f.to_dense() if isinstance(f, TopKCodes) else f.detach()


# --- auxK ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kl_scope", ["selected", "all"])
def test_auxk_gradient_only_on_dead_latents_and_residual_detached(kernel, kl_scope):
    t = trainer(kernel=kernel, kl_scope=kl_scope, auxk_alpha=1.0)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    t.activity.tokens_since_fired[dead] = t.cfg.dead_window_tokens
    _, _, _, terms = t.compute_loss(data(), step=0)
    assert terms["auxk_loss"] > 0
    g = grads_of(terms["auxk_loss"], t)
    # Alive latents: no gradient through their encoder rows, biases or decoder atoms -- the last
    # also shows the residual target is detached (it depends on every selected atom).
    assert (g["encoder.weight"][~dead] == 0).all() and (g["encoder.bias"][~dead] == 0).all()
    assert (g["decoder.weight"][:, ~dead] == 0).all()
    assert g["encoder.weight"][dead].abs().sum() > 0 and g["decoder.weight"][:, dead].abs().sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_auxk_is_zero_without_dead_latents(kernel):
    _, _, _, terms = trainer(kernel=kernel, auxk_alpha=1.0).compute_loss(data(), step=0)
    assert terms["auxk_loss"].item() == 0.0


# --- free bits -------------------------------------------------------------------------------
def per_latent_kl(t, x, kl_scope):
    mu, log_var = t.ae.posterior(x)
    kl = kl_to_standard_normal(mu, log_var)
    if kl_scope == "selected":
        f = t.ae.encode(x)  # select_on="mean": training selects the latents encode selects
        kl = torch.where(f != 0, kl, torch.zeros_like(kl))
    return kl.mean(dim=0).detach()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kl_scope", ["selected", "all"])
def test_free_bits_floors_the_per_latent_kl(kernel, kl_scope):
    x = data()
    probe = trainer(mean_activation="identity", select_on="mean", kl_scope=kl_scope)
    kl_F = per_latent_kl(probe, x, kl_scope)
    floor = kl_F[kl_F > 0].median().item()  # about half the used latents under the floor
    t = trainer(kernel=kernel, mean_activation="identity", select_on="mean", kl_scope=kl_scope, free_bits=floor,
                auxk_alpha=0.0)
    _, _, _, terms = t.compute_loss(x, step=0)
    torch.testing.assert_close(terms["kl_loss"], kl_F.clamp_min(floor).sum(), rtol=1e-5, atol=1e-5)
    g = grads_of(terms["kl_loss"], t)["encoder.bias"]
    under, over = kl_F < floor * 0.999, kl_F > floor * 1.001
    assert under.sum() > 5 and over.sum() > 5
    assert (g[under] == 0).all(), "latents under the floor get no KL gradient"
    assert (g[over] != 0).all(), "latents over the floor keep their KL gradient"


@pytest.mark.parametrize("kernel", KERNELS)
def test_free_bits_zero_is_the_plain_kl(kernel):
    x = data()
    plain = trainer(kernel=kernel, kl_scope="all").compute_loss(x, step=0)[3]["kl_loss"]
    zero = trainer(kernel=kernel, kl_scope="all", free_bits=0.0).compute_loss(x, step=0)[3]["kl_loss"]
    torch.testing.assert_close(zero, plain)
    floored = trainer(kernel=kernel, kl_scope="all", free_bits=1.0).compute_loss(x, step=0)[3]["kl_loss"]
    assert floored >= 128 * 1.0 - 1e-4 and floored > plain


# --- KL on the selected latents --------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_kl_on_selected_latents_has_no_gradient_on_unselected_mu(kernel):
    t = trainer(kernel=kernel, mean_activation="identity", select_on="mean", kl_scope="selected", auxk_alpha=0.0)
    for seed in range(3):
        x = data(1, seed=seed)  # one token: b_enc's gradient is d KL / d mu for that token
        _, _, f, terms = t.compute_loss(x, step=0)
        selected = codes(f)[0] != 0
        g = grads_of(terms["kl_loss"], t)["encoder.bias"]
        assert (g[~selected] == 0).all()
        mu = t.ae.mean(x)[0]
        torch.testing.assert_close(g[selected], mu[selected].detach(), rtol=1e-5, atol=1e-6)  # d(mu^2/2)/d mu


@pytest.mark.parametrize("kernel", KERNELS)
def test_kl_on_all_latents_reaches_unselected_mu(kernel):
    t = trainer(kernel=kernel, mean_activation="identity", select_on="mean", kl_scope="all", auxk_alpha=0.0)
    x = data(1)
    _, _, _, terms = t.compute_loss(x, step=0)
    g = grads_of(terms["kl_loss"], t)["encoder.bias"]
    torch.testing.assert_close(g, t.ae.mean(x)[0].detach(), rtol=1e-5, atol=1e-6)


# --- noise on the selected latents only ------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_noise_only_on_selected_latents_when_chosen_on_mu(kernel):
    t = trainer(kernel=kernel, select_on="mean", sigma=0.5, auxk_alpha=0.0)
    x = data(4096)
    _, _, f, _ = t.compute_loss(x, step=0)
    f_BF = codes(f)
    mu = t.ae.mean(x).detach()
    chosen = torch.zeros_like(f_BF, dtype=torch.bool).scatter(-1, t.ae.top_k_indices(mu), True)
    assert not ((f_BF != 0) & ~chosen).any(), "codes only on the latents evaluation would select"
    assert (f_BF[~chosen] == 0).all()
    noise = (f_BF - mu)[chosen]
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(0.25, rel=0.03)


# --- KL normalisation ------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kl_scope,divisor", [("all", 128), ("selected", 8)])
@pytest.mark.parametrize("free_bits", [0.0, 0.05])
def test_kl_normalize_divides_by_the_latents_summed_over(kernel, kl_scope, divisor, free_bits):
    x = data()
    common = dict(kernel=kernel, kl_scope=kl_scope, free_bits=free_bits, select_on="mean", auxk_alpha=0.0)
    raw = trainer(**common).compute_loss(x, step=0)[3]["kl_loss"]
    normed_trainer = trainer(**common, kl_normalize=True)
    loss, _, _, terms = normed_trainer.compute_loss(x, step=0)
    torch.testing.assert_close(terms["kl_loss"] * divisor, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, terms["l2_loss"] + terms["kl_loss"], rtol=1e-6, atol=1e-5)


def test_kl_normalize_makes_beta_size_independent_for_all_latents():
    """Same per-latent KL at two dictionary sizes: normalised KL terms agree, raw ones scale by size."""
    x = data()
    kls = {}
    for F in (64, 256):
        t = VSAETopKTrainer(**{**BASE, "dict_size": F}, k=8, kl_scope="all", kl_normalize=True, sigma=0.5,
                            mean_activation="identity")
        with torch.no_grad():
            t.ae.encoder.weight.zero_()  # mu = b_enc = 0: every latent's KL is KL(N(0, 0.25) || N(0, 1))
            t.ae.encoder.bias.zero_()
        kls[F] = t.compute_loss(x, step=0)[3]["kl_loss"]
    torch.testing.assert_close(kls[64], kls[256])


# --- variants and validation ------------------------------------------------------------------
def test_paper_variant_has_every_remedy_off():
    assert PAPER_VARIANT["auxk_alpha"] == 0.0
    assert PAPER_VARIANT["kl_scope"] == "all"
    assert PAPER_VARIANT["select_on"] == "sample"
    assert PAPER_VARIANT["learned_var"] is False
    assert PAPER_VARIANT["free_bits"] == 0.0
    assert PAPER_VARIANT["kl_normalize"] is False


@pytest.mark.parametrize(
    "override,match",
    [
        ({"free_bits": -0.1}, "free_bits=-0.1 must be >= 0"),
        ({"free_bits": float("inf")}, "free_bits must be finite"),
        ({"kl_normalize": 1}, "kl_normalize must be a bool"),
        ({"auxk_alpha": -1.0}, "auxk_alpha=-1.0 must be >= 0"),
    ],
)
def test_remedy_options_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        trainer(**override)


# --- dead-latent resampling ------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_resampling_reinitialises_only_dead_latents(kernel):
    t = trainer(kernel=kernel, resample_steps=3, lr=1e-3)
    for step in range(3):
        t.update(step, data(64, seed=step))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[5:20] = True
    t.activity.tokens_since_fired[dead] = t.cfg.dead_window_tokens
    t.activity.tokens_since_fired[~dead] = 0
    before = {n: p.detach().clone() for n, p in t.ae.named_parameters()}
    x = data(64, seed=3)
    assert t.resample_dead_latents(x) == 15
    W_dec, W_enc = t.ae.decoder.weight.detach(), t.ae.encoder.weight.detach()
    assert torch.equal(W_dec[:, ~dead], before["decoder.weight"][:, ~dead])
    assert torch.equal(W_enc[~dead], before["encoder.weight"][~dead])
    assert torch.equal(t.ae.encoder.bias[~dead], before["encoder.bias"][~dead])
    assert not torch.allclose(W_dec[:, dead], before["decoder.weight"][:, dead])
    torch.testing.assert_close(W_dec.norm(dim=0), torch.ones(128), atol=1e-5, rtol=0)  # unit norm kept
    assert (t.ae.encoder.bias[dead] == 0).all()
    # Each new atom is the direction of an input of the batch (x - b_dec, normalised).
    dirs = x - t.ae.b_dec.detach()
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    assert ((W_dec[:, dead].T @ dirs.T).max(dim=-1).values > 1 - 1e-5).all()
    # Encoder rows point the same way, at 0.2 x the alive rows' mean norm.
    torch.testing.assert_close(W_enc[dead] / W_enc[dead].norm(dim=-1, keepdim=True), W_dec[:, dead].T)
    alive_norm = W_enc[~dead].norm(dim=-1).mean().item()
    torch.testing.assert_close(W_enc[dead].norm(dim=-1), torch.full((15,), 0.2 * alive_norm), rtol=1e-4, atol=1e-6)
    for param in (t.ae.encoder.weight, t.ae.encoder.bias):
        state = t.optimizer.state[param]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
        assert (state["exp_avg_sq"][~dead] != 0).any()
    dec_state = t.optimizer.state[t.ae.decoder.weight]
    assert (dec_state["exp_avg"][:, dead] == 0).all()
    assert (t.activity.tokens_since_fired[dead] == 0).all()
    assert t.resample_dead_latents(x) == 0, "nothing dead any more"


def test_resampling_prefers_badly_reconstructed_inputs():
    t = trainer(resample_steps=1)
    x = data(64) * 0.01
    x[7] = 50.0 * torch.randn(32, generator=torch.Generator().manual_seed(1))  # the one input it cannot fit
    t.activity.tokens_since_fired[:10] = t.cfg.dead_window_tokens
    assert t.resample_dead_latents(x) == 10
    target = (x[7] - t.ae.b_dec.detach()) / (x[7] - t.ae.b_dec.detach()).norm()
    cos = t.ae.decoder.weight[:, :10].detach().T @ target
    # Inputs are drawn without replacement (distinct directions); with loss^2 weights the outlier's
    # probability is ~1, so it is among the ten picks.
    assert (cos > 1 - 1e-5).sum() == 1


def test_resampling_is_off_when_zero_and_seeded():
    def run(resample_steps):
        t = trainer(resample_steps=resample_steps, dead_window_tokens=64)
        for step in range(6):
            t.update(step, data(64, seed=step))
        return t.ae.state_dict()

    a, b, off = run(2), run(2), run(0)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["decoder.weight"], off["decoder.weight"]), "with a 64-token window some latents die"
    with pytest.raises(ConfigError, match="resample_steps=-1 must be >= 0"):
        trainer(resample_steps=-1)
    assert PAPER_VARIANT["resample_steps"] == 0


def test_resampling_resets_the_learned_variance_of_dead_latents():
    t = trainer(resample_steps=1, learned_var=True, log_var_init=-1.0)
    with torch.no_grad():
        t.ae.log_var_head.bias.fill_(0.5)
        t.ae.log_var_head.weight.fill_(0.01)
    t.activity.tokens_since_fired[:4] = t.cfg.dead_window_tokens
    assert t.resample_dead_latents(data()) == 4
    assert (t.ae.log_var_head.bias[:4] == -1.0).all() and (t.ae.log_var_head.weight[:4] == 0).all()
    assert (t.ae.log_var_head.bias[4:] == 0.5).all()


def test_recommended_default_and_paper_variant_differ_only_by_intent():
    from dictionary_learning_ext import get_architecture

    arch = get_architecture("vsae_topk")
    common = dict(activation_dim=32, dict_size=128, layer=0, lm_name="t", steps=10, k=8)
    default, paper = arch.config("default", **common), arch.config("paper", **common)
    assert (default.learned_var, default.kl_normalize, default.kl_scope, default.select_on) == (True, True, "selected", "mean")
    assert default.auxk_alpha > 0 and default.dead_window_tokens == 20_000
    assert (paper.learned_var, paper.kl_normalize, paper.auxk_alpha, paper.free_bits, paper.resample_steps) == (
        False, False, 0.0, 0.0, 0)
    for remedy in ("auxk", "kl_selected", "free_bits", "learned_var", "select_mean", "kl_per_dim", "resample"):
        stacked = arch.config(f"paper+{remedy}", **common)
        changed = {f for f in default.to_dict() if getattr(stacked, f) != getattr(paper, f)}
        assert changed and changed <= {"auxk_alpha", "dead_window_tokens", "kl_scope", "free_bits", "learned_var",
                                       "select_on", "kl_normalize", "resample_steps"}, (remedy, changed)


@pytest.mark.parametrize("batch, options, expected", [(64, {}, "sparse"), (1024, {}, "sparse"),
                                                      (64, {"center_input": False, "kl_form": "clamped_l2",
                                                            "weights_dtype": "bfloat16", "learned_var": False}, "dense")])
def test_auto_kernel_picks_the_sparse_step_where_it_implements_the_settings(batch, options, expected, monkeypatch):
    t = trainer(kernel="auto", **options)
    called = []
    for kind in ("dense", "sparse"):
        original = getattr(t, f"{kind}_step")
        monkeypatch.setattr(t, f"{kind}_step", lambda x, kind=kind, original=original: (called.append(kind), original(x))[1])
    t.compute_loss(data(batch), 0)
    assert called == [expected]


# --- the authors' replica beside the paper's setting (issue 14) -------------------------------------------
NEW_OPTIONS_TODAY = dict(center_input=True, unit_norm_decoder=True, decoder_init="kaiming_uniform", init_norm=1.0,
                         b_dec_init="geometric_median", kl_form="gaussian", weights_dtype="float32")


@pytest.mark.parametrize("variant", ["default", "paper", "paper+auxk", "paper+no_sampling"])
def test_default_and_paper_keep_todays_behaviour_for_the_replica_options(variant):
    from dictionary_learning_ext import get_architecture

    arch = get_architecture("vsae_topk")
    cfg = arch.config(variant, activation_dim=32, dict_size=128, layer=0, lm_name="t", steps=10, k=8)
    assert {key: getattr(cfg, key) for key in NEW_OPTIONS_TODAY} == NEW_OPTIONS_TODAY
    # only the auxK remedy departs from a study's protocol (its stronger auxK is the remedy)
    assert arch.variant_keeps(variant) == (frozenset({"auxk_alpha"}) if "auxk" in variant else frozenset())
    t = trainer(**{k: v for k, v in cfg.to_dict().items() if k in ("select_on", "kl_scope")})
    assert t.ae.center_input and t.ae.unit_norm_decoder
    assert all(p.dtype == torch.float32 for p in t.ae.parameters())


def test_remedies_stack_on_the_authors_variant():
    from dictionary_learning_ext import get_architecture

    arch = get_architecture("vsae_topk")
    common = dict(activation_dim=32, dict_size=128, layer=0, lm_name="t", steps=1000, k=8)
    base = arch.config("authors", **common)
    stacked = arch.config("authors+auxk", **common)
    assert (stacked.auxk_alpha, stacked.dead_window_tokens) == (1 / 2, 20_000)
    changed = {f for f in base.to_dict() if getattr(stacked, f) != getattr(base, f)}
    assert changed == {"auxk_alpha", "dead_window_tokens"}
    with pytest.raises(ConfigError, match="clamped_l2"):  # a learned variance needs the Gaussian KL
        arch.config("authors+learned_var", **common)
