"""``vsae_topk:authors``: the authors' published VSAETopK as their paper runs configured it (issue 14).

The loss and one full update are checked against the formulas written out here in plain torch (not the
trainer's code paths): mu = relu(W_enc x + b_enc) in bfloat16 (no b_dec shift), top-k by |mu| keeping the
sign, x_hat = W_dec z + b_dec, loss = ||x - x_hat||^2 + beta(step) * 1/2 sum_all clamp(mu, -10, 10)^2,
then gradient clipping at 1, Adam on the bfloat16 weights at the LR of the authors' schedule, and no
decoder projection or renormalisation.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from dictionary_learning.training import trainSAE

from dictionary_learning_ext import ConfigError, get_architecture, load_dictionary
from dictionary_learning_ext.sparse_topk import TopKCodes
from saebench_adapters.saelens import build_saelens, to_saelens
from saebench_adapters.wrappers import wrap_dictionary

D, FS, K = 32, 128, 8
ARCH = get_architecture("vsae_topk")
COMMON = dict(activation_dim=D, dict_size=FS, k=K, layer=0, lm_name="test", device="cpu", seed=0)
PARAMS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")


def authors(steps=1500, **kw):
    return ARCH.trainer_class(**ARCH.config("authors", **{**COMMON, "steps": steps, **kw}).to_dict())


def data(n=64, seed=0, scale=3.0):
    return scale * torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) + 1.0


# --- the formulas, stated independently ----------------------------------------------------------
def expected_lr_factor(step: int, steps: int) -> float:
    """The authors' schedule: warm-up max(200, int(2%)), linear decay from int(80%) if after the warm-up."""
    warmup = max(200, int(0.02 * steps))
    decay = int(0.8 * steps)
    if step < warmup:
        return step / warmup
    if decay > warmup and step >= decay:
        return (steps - step) / (steps - decay)
    return 1.0


def expected_beta(step: int, steps: int) -> float:
    warm = int(0.1 * steps)
    return step / warm if step < warm else 1.0


def reference_loss(p: dict[str, torch.Tensor], x: torch.Tensor, beta: float, k: int = K):
    """(loss, recon, kl, codes) of the authors' forward with parameters ``p`` (bfloat16 leaves)."""
    x_b = x.to(torch.bfloat16)
    mu = torch.relu(F.linear(x_b, p["encoder.weight"], p["encoder.bias"]))  # no b_dec shift
    idx = mu.abs().topk(k, dim=-1).indices
    z = torch.zeros_like(mu).scatter(-1, idx, mu.gather(-1, idx))
    x_hat = F.linear(z, p["decoder.weight"]) + p["b_dec"]
    recon = (x.float() - x_hat.float()).pow(2).sum(dim=-1).mean()
    kl = (0.5 * mu.float().clamp(-10.0, 10.0).pow(2)).sum(dim=-1).mean().clamp(min=0.0)
    return recon + beta * kl, recon, kl, z


def leaves(t) -> dict[str, torch.Tensor]:
    named = dict(t.ae.named_parameters())
    return {n: named[n].detach().clone().requires_grad_(True) for n in PARAMS}


# --- the variant ----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, warmup, decay", [(1500, 200, 1200), (20_000, 400, 16_000), (240, 200, None)])
def test_variant_resolves_the_authors_schedule_from_steps(steps, warmup, decay):
    cfg = ARCH.config("authors", **COMMON, steps=steps)
    assert (cfg.warmup_steps, cfg.decay_start) == (warmup, decay)
    expected = dict(
        lr=8e-4, auxk_alpha=0.0, grad_clip_norm=1.0, beta=1.0, kl_warmup_frac=0.1, sampling=False,
        learned_var=False, mean_activation="relu", select_by="magnitude", kl_scope="all", kl_normalize=False,
        free_bits=0.0, kl_form="clamped_l2", center_input=False, unit_norm_decoder=False, b_dec_init="zero",
        decoder_init="gaussian", init_norm=0.1, weights_dtype="bfloat16", resample_steps=0, kernel="auto",
    )
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert ARCH.variant_keeps("authors") >= {"lr", "warmup_steps", "decay_start", "auxk_alpha"}
    # Explicit values still win over the variant (e.g. a --set override).
    assert ARCH.config("authors", **COMMON, steps=steps, lr=1e-3).lr == 1e-3


def test_variant_without_steps_and_too_short_runs():
    assert "warmup_steps" not in ARCH.variant_values("authors")  # parse_spec checks names without a run
    # Their schedule warms up for at least 200 steps: a shorter run cannot use it (their code asserts too).
    with pytest.raises(ConfigError, match="warmup_steps=200 must be < steps=150"):
        ARCH.config("authors", **COMMON, steps=150)


def test_lr_and_beta_schedules_follow_the_formulas():
    for steps in (1500, 20_000):
        t = authors(steps)
        factor = t.scheduler.lr_lambdas[0]
        for step in (0, 1, 100, 199, 200, 399, 400, 1199, 1200, 1300, 1499, 15_999, 16_000, 19_999):
            if step < steps:
                assert factor(step) == pytest.approx(expected_lr_factor(step, steps), abs=1e-12), (steps, step)
                assert t.beta_at(step) == pytest.approx(expected_beta(step, steps), abs=1e-12), (steps, step)


def test_initial_weights_are_the_authors_init():
    t = authors()
    W_dec, W_enc = t.ae.decoder.weight, t.ae.encoder.weight
    assert all(p.dtype == torch.bfloat16 for p in t.ae.parameters())
    torch.testing.assert_close(W_dec.float().norm(dim=0), torch.full((FS,), 0.1), atol=1e-3, rtol=0)
    assert torch.equal(W_enc, W_dec.T)
    assert (t.ae.encoder.bias == 0).all() and (t.ae.b_dec == 0).all()
    assert not t.ae.center_input and not t.ae.unit_norm_decoder
    # Isotropic (randn) directions: coordinates of the unit atoms have variance 1/D.
    assert (W_dec.float() / 0.1).var().item() == pytest.approx(1 / D, rel=0.1)


# --- the loss and one update against the formulas ---------------------------------------------------
@pytest.mark.parametrize("step", [75, 400])
def test_loss_and_gradients_match_the_formulas(step):
    t = authors()
    x = data()
    loss, x_hat, f, terms = t.compute_loss(x, step=step)
    p = leaves(t)
    ref_loss, ref_recon, ref_kl, ref_z = reference_loss(p, x, expected_beta(step, 1500))
    assert t.beta == expected_beta(step, 1500)
    torch.testing.assert_close(terms["l2_loss"], ref_recon, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(terms["kl_loss"], ref_kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert isinstance(f, torch.Tensor) and torch.equal(f, ref_z)  # the dense step (bf16 weights)
    t.ae.zero_grad(set_to_none=True)
    loss.backward()
    ref_loss.backward()
    for name, param in t.ae.named_parameters():
        assert param.grad.dtype == torch.bfloat16
        torch.testing.assert_close(param.grad, p[name].grad, msg=name)


def test_one_update_is_clip_then_adam_on_bf16_weights_at_the_scheduled_lr():
    lr, steps, step = 0.05, 1500, 1300  # a large lr so the step stands well above bf16 rounding
    t = authors(steps, lr=lr)
    t.update(0, data(seed=10))  # lr factor 0 at step 0: moments move, weights do not
    assert (t.ae.b_dec == 0).all(), "no geometric-median init, and no step at lr 0"
    t.update(1, data(seed=11))
    for _ in range(step - 2):  # the schedule as after `step` updates
        t.scheduler.step()
    before = {n: p.detach().clone() for n, p in t.ae.named_parameters()}
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in t.optimizer.state[p].items()}
             for n, p in t.ae.named_parameters()}
    seen = {}
    original_step = t.optimizer.step

    def spy_step(*args, **kwargs):  # what the optimiser is handed: clipped gradients and the lr
        seen["lr"] = t.optimizer.param_groups[0]["lr"]
        seen["grads"] = {n: p.grad.clone() for n, p in t.ae.named_parameters()}
        return original_step(*args, **kwargs)

    t.optimizer.step = spy_step
    x = data(seed=12)
    t.update(step, x)

    # Gradients of the formula's loss, clipped to global norm 1.
    p = {n: before[n].clone().requires_grad_(True) for n in PARAMS}
    ref_loss, *_ = reference_loss(p, x, expected_beta(step, steps))
    ref_loss.backward()
    grads = {n: p[n].grad.float() for n in PARAMS}
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert total > 1.0, "the test needs a step where clipping acts"
    grads = {n: g * (1.0 / (total + 1e-6)) for n, g in grads.items()}
    for n in PARAMS:
        torch.testing.assert_close(seen["grads"][n].float(), grads[n], rtol=2e-2, atol=1e-4, msg=n)
    # No projection of the decoder gradient: the clipped gradient of the formula, parallel part included.
    W = before["decoder.weight"].float()
    parallel = (seen["grads"]["decoder.weight"].float() * W / W.norm(dim=0)).sum(dim=0)
    assert parallel.abs().max() > 1e-3

    lr_t = lr * expected_lr_factor(step, steps)
    assert seen["lr"] == pytest.approx(lr_t, rel=1e-12)

    # Adam (betas 0.9, 0.999, eps 1e-8), from the moments the previous steps left, onto bf16 weights.
    b1, b2, eps = 0.9, 0.999, 1e-8
    for n in PARAMS:
        s = state[n]
        n_step = float(s["step"]) + 1
        g = seen["grads"][n].float()
        m = b1 * s["exp_avg"].float() + (1 - b1) * g
        v = b2 * s["exp_avg_sq"].float() + (1 - b2) * g * g
        update = lr_t * (m / (1 - b1**n_step)) / ((v / (1 - b2**n_step)).sqrt() + eps)
        expected = (before[n].float() - update).to(torch.bfloat16)
        param = dict(t.ae.named_parameters())[n]
        after = param.detach()
        assert after.dtype == torch.bfloat16 and t.optimizer.state[param]["exp_avg"].dtype == torch.bfloat16
        # Within bf16 rounding (two ulps of the weight) and 3% of the step; a missing or mis-scaled step
        # (e.g. the wrong lr) is many times that.
        ulp = before[n].float().abs().clamp_min(1e-3) * 2**-7
        err = (after.float() - expected.float()).abs()
        assert (err <= 2 * ulp + 0.03 * lr_t).all(), (n, float((err - 2 * ulp).max()))
        assert (after.float() - before[n].float()).abs().max() > 0.5 * lr_t, n
    # Not renormalised after the step.
    norms = t.ae.decoder.weight.float().norm(dim=0)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.1)


def test_no_noise_is_drawn_and_b_dec_is_not_initialised():
    t = authors()
    gen_state, rng_state = t.generator.get_state(), torch.get_rng_state()
    for step in range(3):
        t.update(step, data(seed=step))
    assert torch.equal(t.generator.get_state(), gen_state), "the trainer's noise generator was never used"
    assert torch.equal(torch.get_rng_state(), rng_state), "nor the global one"
    # Training codes are deterministic: two evaluations of the loss agree exactly.
    a, b = t.compute_loss(data(seed=5), step=3), t.compute_loss(data(seed=5), step=3)
    assert torch.equal(a[0], b[0])


def test_b_dec_stays_zero_at_step_0_and_moves_later():
    t = authors(lr=1e-2)
    t.update(0, data(seed=1))
    assert (t.ae.b_dec == 0).all()
    for step in range(1, 4):
        t.update(step, data(seed=1 + step))
    assert (t.ae.b_dec != 0).any()
    # The other trainers still start from the geometric median (the default b_dec_init).
    default = ARCH.trainer_class(**ARCH.config("default", **COMMON, steps=10).to_dict())
    default.update(0, data(seed=1))
    assert (default.ae.b_dec != 0).all()


def test_decoder_is_free_across_steps():
    t = authors(lr=5e-2, warmup_steps=0, decay_start=None)
    for step in range(25):
        t.update(step, data(seed=step))
    norms = t.ae.decoder.weight.float().norm(dim=0)
    assert (norms - 0.1).abs().max() > 0.02, "atoms moved off their initial norm"
    assert (norms - 1.0).abs().max() > 0.1, "and were not renormalised to 1"
    # The same variant with the constraint on ends at unit norm (to bf16 precision: the norms are computed in bf16).
    c = authors(lr=5e-2, warmup_steps=0, decay_start=None, unit_norm_decoder=True)
    for step in range(3):
        c.update(step, data(seed=step))
    torch.testing.assert_close(c.ae.decoder.weight.float().norm(dim=0), torch.ones(FS), atol=3e-2, rtol=0)


# --- kernels ------------------------------------------------------------------------------------------
def test_sparse_kernel_refuses_bf16_weights_and_auto_picks_dense(monkeypatch):
    with pytest.raises(ConfigError, match="kernel='sparse' does not implement weights_dtype='bfloat16'"):
        authors(kernel="sparse")
    t = authors()
    assert not t.uses_sparse_step(4096)
    called = []
    monkeypatch.setattr(t, "sparse_step", lambda x: called.append("sparse"))
    _, _, f, _ = t.compute_loss(data(1024), step=10)  # at or above AUTO_SPARSE_MIN_BATCH
    assert called == [] and isinstance(f, torch.Tensor)
    # In float32 the same settings may use the sparse step.
    assert authors(weights_dtype="float32").uses_sparse_step(4096)


@pytest.mark.parametrize("kl_scope", ["all", "selected"])
@pytest.mark.parametrize("sampling", [False, True])
def test_sparse_step_without_input_centring_equals_dense(kl_scope, sampling):
    """center_input=False (and the clamped-L2 KL) in float32: the k-sparse step computes the dense loss."""
    kw = dict(weights_dtype="float32", kl_scope=kl_scope, sampling=sampling, select_on="mean", auxk_alpha=0.25,
              dead_window_tokens=64, warmup_steps=0, decay_start=None)
    pair = [authors(kernel=kernel, **kw) for kernel in ("dense", "sparse")]
    gen = torch.Generator().manual_seed(3)
    for t in pair:
        with torch.no_grad():
            t.ae.b_dec.copy_(torch.randn(D, generator=gen))  # a non-zero b_dec the encoder must not read
            t.ae.encoder.bias.copy_(0.1 * torch.randn(FS, generator=gen))
        t.activity.tokens_since_fired[::4] = 64  # some dead latents for auxK
        gen = torch.Generator().manual_seed(3)
    x = data(256)
    out = [t.compute_loss(x, step=200) for t in pair]
    assert isinstance(out[1][2], TopKCodes)
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for key in ("l2_loss", "kl_loss", "auxk_loss"):
        torch.testing.assert_close(out[1][3][key], out[0][3][key], rtol=1e-5, atol=1e-5)
    grads = []
    for t, o in zip(pair, out):
        t.ae.zero_grad(set_to_none=True)
        o[0].backward()
        grads.append({n: p.grad for n, p in t.ae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    # b_dec's gradient is the reconstruction's only: -2 mean(residual) -- none from the encoder.
    mean_residual = (x - out[0][1].detach()).mean(dim=0)
    torch.testing.assert_close(grads[0]["b_dec"], -2 * mean_residual, rtol=1e-4, atol=1e-5)


def test_option_validation():
    with pytest.raises(ConfigError, match="clamped_l2.*learned_var"):
        authors(learned_var=True)
    with pytest.raises(ConfigError, match="init_norm=0.0 must be > 0"):
        authors(init_norm=0.0)
    with pytest.raises(ConfigError, match="weights_dtype='float16' must be one of"):
        authors(weights_dtype="float16")
    with pytest.raises(ConfigError, match="b_dec_init='mean' must be one of"):
        authors(b_dec_init="mean")


# --- saving, loading, evaluation -----------------------------------------------------------------------
def trained(steps=6, **kw):
    t = authors(lr=1e-2, warmup_steps=0, decay_start=None, **kw)
    for step in range(steps):
        t.update(step, data(seed=step))
    return t


def test_round_trip_through_load_dictionary(tmp_path):
    t = trained()
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(t.ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {**t.config, "architecture": "vsae_topk",
                                                                "variant": "authors"}}))
    ae, config = load_dictionary(folder)
    assert type(ae) is type(t.ae) and config["trainer"]["variant"] == "authors"
    assert (ae.center_input, ae.unit_norm_decoder) == (False, False)
    saved = t.ae.state_dict()
    assert saved.keys() == ae.state_dict().keys()
    for key, value in ae.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
    x = data(32, seed=99)
    with torch.no_grad():
        assert torch.equal(ae.encode(x), t.ae.encode(x))
        assert torch.equal(ae(x), t.ae(x))


def test_trains_in_dictionary_learning_trainsae_with_normalised_activations(tmp_path):
    cfg = ARCH.trainer_config("authors", **COMMON, steps=205)
    batches = iter([data(64, seed=s) for s in range(400)])
    trainSAE(batches, [cfg], steps=205, save_dir=str(tmp_path), device="cpu", normalize_activations=True)
    ae, config = load_dictionary(tmp_path / "trainer_0")
    assert ae.decoder.weight.dtype == torch.bfloat16 and not ae.unit_norm_decoder
    x = data(256, seed=1000)
    with torch.no_grad():
        x_hat = ae(x).float()
    assert torch.isfinite(x_hat).all()
    assert ((x - x_hat).pow(2).sum() < x.pow(2).sum()).item()  # raw-scale inputs (biases rescaled back)


def test_saebench_wrapper_evaluates_the_free_decoder_as_trained():
    t = trained()
    reference = ARCH.trainer_class(**ARCH.config("authors", **COMMON, steps=1500).to_dict()).ae
    reference.load_state_dict(t.ae.state_dict())
    norms = t.ae.decoder.weight.float().norm(dim=0)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.1)
    x = data(48, seed=7)
    with torch.no_grad():
        f_bf16, x_hat_bf16 = reference.encode(x), reference(x)
        ref32 = reference.float()
        f_ref, x_hat_ref = ref32.encode(x), ref32(x)
    sae16 = wrap_dictionary(trained().ae, t.config, dtype=torch.bfloat16)  # the same training again
    sae = wrap_dictionary(t.ae, t.config)  # float32, SAEBench's usual dtype: no refusal
    assert sae.cfg.decoder_norms == "free" and sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.to_dict()["decoder_norms"] == "free"  # what SAEBench writes into its results
    assert not sae.check_decoder_norms()  # SAEBench's own check says so; its evals only warn
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms)  # nothing folded
    with torch.no_grad():
        assert torch.equal(sae.encode(x), f_ref)
        assert torch.equal(sae.decode(f_ref), ref32.decode(f_ref))
        assert torch.equal(sae(x), x_hat_ref)
        # The same evaluation in bfloat16 is the dictionary as trained, bit for bit.
        assert torch.equal(sae16.encode(x), f_bf16) and torch.equal(sae16(x), x_hat_bf16)


def test_saelens_export_is_topk_without_input_shift():
    t = trained()
    sae = wrap_dictionary(t.ae, t.config)
    assert (sae.b_dec != 0).any()  # a trained output bias the encoder must not subtract
    copy = to_saelens(sae, t.config)
    assert copy.architecture == "topk" and copy.cfg["k"] == K
    assert copy.cfg["apply_b_dec_to_input"] is False and not copy.cfg.get("rescale_acts_by_decoder_norm", False)
    model = build_saelens(copy.cfg, copy.state_dict)
    x = data(64, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), sae(x), rtol=1e-5, atol=1e-5)


def test_trainer_state_resumes_exactly():
    """Weights, bf16 Adam moments and the schedule position come back from the trainer's state dict."""
    batches = [data(seed=s) for s in range(6)]
    straight = authors(lr=1e-2)
    for step, x in enumerate(batches):
        straight.update(step, x)
    first = authors(lr=1e-2)
    for step, x in enumerate(batches[:3]):
        first.update(step, x)
    state = first.state_dict()
    resumed = authors(lr=1e-2)
    resumed.load_state_dict(state)
    for step, x in enumerate(batches[3:], start=3):
        resumed.update(step, x)
    for key, value in straight.ae.state_dict().items():
        assert torch.equal(resumed.ae.state_dict()[key], value), key
