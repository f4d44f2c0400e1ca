"""MP-SAE: pursuit invariants, exact recovery, gradients, memory, inference modes, registry,
SAEBench adapter, save/load, training and config validation."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from dictionary_learning.training import trainSAE

from dictionary_learning_ext import (
    ARCHITECTURES,
    MPSAE,
    ConfigError,
    MPSAEConfig,
    MPSAETrainer,
    get_architecture,
    load_dictionary,
)
from saebench_adapters.wrappers import TiedDictionarySAE, WrapperError, wrap_dictionary

BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0)
SELECTS = ("relu", "abs")


def stream(batch_fn, n=64):
    while True:
        yield batch_fn(n)


def random_mp(seed: int, D: int, Fsize: int, k: int, select: str) -> MPSAE:
    """A random unit-norm dictionary with a random b_dec."""
    torch.manual_seed(seed)
    ae = MPSAE(D, Fsize, k=k, select=select)
    with torch.no_grad():
        ae.b_dec.normal_()
    return ae


def reference_codes(ae: MPSAE, x_BD: torch.Tensor, steps: int) -> torch.Tensor:
    """Matching pursuit written the direct way: dense correlations with gradient, dense one-hot
    code updates every step. Independent of MPSAE.pursue's index/scatter bookkeeping."""
    W_DF = ae.decoder.weight
    r_BD = x_BD - ae.b_dec
    f_BF = torch.zeros(x_BD.shape[0], ae.dict_size)
    for _ in range(steps):
        c_BF = r_BD @ W_DF
        j_B = (c_BF.relu() if ae.select == "relu" else c_BF.abs()).argmax(-1)
        a_B = c_BF.gather(-1, j_B[:, None]).squeeze(-1)
        if ae.select == "relu":
            a_B = a_B.relu()
        f_BF = f_BF + F.one_hot(j_B, ae.dict_size) * a_B[:, None]
        r_BD = r_BD - a_B[:, None] * W_DF.T[j_B]
    return f_BF


# --- the pursuit ---------------------------------------------------------------------------
@pytest.mark.parametrize("select", SELECTS)
def test_residual_norm_never_increases_and_drops_by_coef_squared(select):
    """Property test over 60 random dictionaries/inputs: ||r_t|| is non-increasing, each step removes
    exactly a_t^2 of the squared norm (projection on a unit atom), and x_hat = x - r_T."""
    for seed in range(60):
        gen = torch.Generator().manual_seed(1000 + seed)
        D = int(torch.randint(2, 24, (), generator=gen))
        Fsize = int(torch.randint(D, 4 * D + 2, (), generator=gen))
        k = int(torch.randint(1, Fsize + 1, (), generator=gen))
        ae = random_mp(seed, D, Fsize, k, select)
        x_BD = torch.randn(16, D, generator=gen) * float(torch.rand((), generator=gen) * 10 + 0.1) + ae.b_dec
        with torch.no_grad():
            trace = ae.pursue(x_BD, k)
        norms = trace.residual_norms_BT1.double()
        assert norms.shape == (16, k + 1)
        scale = norms[:, :1].clamp_min(1e-6)
        assert (norms[:, 1:] <= norms[:, :-1] + 1e-5 * scale).all(), f"seed {seed}: residual grew"
        drop = norms[:, :-1].square() - norms[:, 1:].square()
        torch.testing.assert_close(drop, trace.coefs_BT.double().square(), atol=1e-4 * float(scale.max()) ** 2, rtol=1e-4)
        if select == "relu":
            assert (trace.coefs_BT >= 0).all()
        with torch.no_grad():
            torch.testing.assert_close(ae.decode(trace.codes()), x_BD - trace.residual_BD, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("select", SELECTS)
def test_codes_match_a_direct_dense_implementation_values_and_gradients(select):
    ae = random_mp(3, 12, 40, k=7, select=select)
    x_BD = torch.randn(24, 12) * 2
    f_ours = ae.encode(x_BD)
    f_ref = reference_codes(ae, x_BD, 7)
    torch.testing.assert_close(f_ours, f_ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(24, 40)
    grads_ours = torch.autograd.grad((f_ours * weights).sum(), [ae.decoder.weight, ae.b_dec])
    grads_ref = torch.autograd.grad((f_ref * weights).sum(), [ae.decoder.weight, ae.b_dec])
    for g_ours, g_ref in zip(grads_ours, grads_ref):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("select", SELECTS)
def test_orthonormal_dictionary_recovers_exact_codes(select):
    """Orthonormal atoms: each step picks one true atom and takes its whole coefficient; with
    k >= number of active atoms the codes are recovered exactly (extra steps add nothing)."""
    D = Fsize = 24
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        Q_DD, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
        ae = MPSAE(D, Fsize, k=8, select=select)
        with torch.no_grad():
            ae.decoder.weight.copy_(Q_DD)
            ae.b_dec.copy_(torch.randn(D, generator=gen))
        z_BF = torch.zeros(32, Fsize)
        for b in range(32):
            support = torch.randperm(Fsize, generator=gen)[:5]
            magnitude = torch.rand(5, generator=gen) + 0.5
            sign = torch.ones(5) if select == "relu" else torch.where(torch.rand(5, generator=gen) < 0.5, -1.0, 1.0)
            z_BF[b, support] = magnitude * sign
        x_BD = ae.decode(z_BF).detach()
        with torch.no_grad():
            for k in (5, 8, 24):
                torch.testing.assert_close(ae.encode(x_BD, k=k), z_BF, atol=1e-5, rtol=0)
            # Fewer steps than active atoms cannot recover them.
            assert ((ae.encode(x_BD, k=4) != 0).sum(-1) <= 4).all()


@pytest.mark.parametrize("select", SELECTS)
def test_inference_k_monotone_and_threshold_mode_stops_at_threshold(select):
    ae = random_mp(5, 16, 64, k=4, select=select)
    x_BD = torch.randn(50, 16) + ae.b_dec
    with torch.no_grad():
        errs = [(x_BD - ae.decode(ae.encode(x_BD, k=k))).norm(dim=-1) for k in range(1, 9)]
        for before, after in zip(errs, errs[1:]):
            assert (after <= before + 1e-5).all()
        assert errs[-1].mean() < errs[0].mean()
        torch.testing.assert_close(ae.encode(x_BD), ae.encode(x_BD, k=4), rtol=0, atol=0)

        x_BD[:5] = ae.b_dec + 0.01 * torch.randn(5, 16)  # already within the threshold: no step at all
        start = (x_BD - ae.b_dec).norm(dim=-1)
        threshold = float(start.median() * 0.5)
        trace = ae.pursue(x_BD, 6, threshold=threshold)
        norms = trace.residual_norms_BT1
        steps_used = (trace.coefs_BT != 0).sum(-1)
        f_thr = ae.encode(x_BD, threshold=threshold, max_steps=6)
        final = (x_BD - ae.decode(f_thr)).norm(dim=-1)
    reached = norms[:, -1] <= threshold
    assert reached.sum() > 5 and (~reached).any()  # both ways of stopping are exercised
    for b in range(50):
        n = int(steps_used[b])
        if float(norms[b, -1]) > threshold:  # did not reach it within max_steps: ran every step
            assert n == trace.coefs_BT.shape[1]
            continue
        # stopped at the first step that reached the threshold, never earlier, and added nothing after
        first_below = int((norms[b] <= threshold).nonzero()[0])
        assert n == first_below, (b, n, first_below)
        assert float(final[b]) <= threshold + 1e-4
    assert (steps_used[:5] == 0).all()
    # a cap on the steps is honoured
    with torch.no_grad():
        assert ((ae.encode(x_BD, threshold=0.0, max_steps=3) != 0).sum(-1) <= 3).all()


def test_encode_and_forward_accept_leading_dims():
    """dictionary_learning's evaluate runs the dictionary on (batch, ctx, D) activations."""
    ae = random_mp(2, 8, 24, k=3, select="relu")
    x_BLD = torch.randn(4, 5, 8)
    with torch.no_grad():
        f_BLF = ae.encode(x_BLD)
        assert f_BLF.shape == (4, 5, 24)
        torch.testing.assert_close(f_BLF.reshape(20, 24), ae.encode(x_BLD.reshape(20, 8)), rtol=0, atol=0)
        x_hat, f = ae(x_BLD, output_features=True)
        assert x_hat.shape == (4, 5, 8) and torch.equal(f, f_BLF)


def test_encode_argument_errors_name_the_fix():
    ae = random_mp(0, 8, 16, k=2, select="relu")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="either k"):
        ae.encode(x, k=3, threshold=0.1)
    with pytest.raises(ValueError, match="max_steps only applies"):
        ae.encode(x, max_steps=4)
    with pytest.raises(ValueError, match="threshold"):
        ae.encode(x, threshold=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ae.encode(x, k=-1)
    with pytest.raises(ValueError, match="select"):
        MPSAE(8, 16, k=2, select="max")


def test_autograd_memory_does_not_grow_like_k_dense_codes():
    """Bytes autograd keeps for backward: one extra pursuit step may add O(B*D), not a (B, F) copy."""
    B, D, Fsize = 64, 16, 4096

    def saved_bytes(k: int) -> int:
        ae = random_mp(0, D, Fsize, k=k, select="relu")
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(B, D)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x_hat = ae.decode(ae.encode(x))
            (x - x_hat).square().sum()
        return total

    per_step = (saved_bytes(33) - saved_bytes(1)) / 32
    dense_code_bytes = B * Fsize * 4
    assert per_step < dense_code_bytes / 20, per_step


def test_gradients_reach_decoder_and_b_dec(sparse_data):
    trainer = MPSAETrainer(**BASE, steps=10, k=8)
    x = sparse_data(64)
    loss = trainer.loss(x)
    loss.backward()
    assert trainer.ae.decoder.weight.grad is not None and trainer.ae.decoder.weight.grad.abs().sum() > 0
    assert trainer.ae.b_dec.grad is not None and trainer.ae.b_dec.grad.abs().sum() > 0
    assert {n for n, _ in trainer.ae.named_parameters()} == {"decoder.weight", "b_dec"}


def test_scale_biases_folds_activation_scale_exactly():
    ae = random_mp(1, 10, 30, k=5, select="abs")
    x = torch.randn(20, 10) + ae.b_dec
    scaled = copy.deepcopy(ae)
    scaled.scale_biases(7.5)
    with torch.no_grad():
        torch.testing.assert_close(scaled.encode(7.5 * x), 7.5 * ae.encode(x), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(scaled(7.5 * x), 7.5 * ae(x), atol=1e-4, rtol=1e-5)


# --- trainer, registry, save/load ----------------------------------------------------------------
def test_registry_entry_and_config_validation():
    arch = get_architecture("mp_sae")
    assert arch.trainer_class is MPSAETrainer and arch.dict_class is MPSAE and arch.saebench_tied_encoder
    assert {"k", "select"} <= arch.field_names
    common = dict(steps=10, activation_dim=8, dict_size=16, layer=0, lm_name="t", k=4)
    cfg = arch.config(**{**common, "k": 16}, select="abs", warmup_steps=0, seed=0)
    assert (cfg.k, cfg.select, cfg.warmup_steps, cfg.seed) == (16, "abs", 0, 0)  # 0 is a value
    for bad, match in (
        ({"k": 0}, "k=0 must be >= 1"),
        ({"k": 17}, "must be <= dict_size=16"),
        ({"k": 2.0}, "k must be an int"),
        ({"select": "max"}, "select='max' must be one of"),
        ({"topk": 3}, r"unknown key\(s\) \['topk'\]"),
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            arch.config(**{**common, **bad})
    with pytest.raises(ConfigError, match="trains MPSAE"):
        MPSAETrainer(**common, dict_class="AutoEncoder")
    assert isinstance(MPSAEConfig.from_dict(common), MPSAEConfig)


def test_same_seed_same_weights(sparse_data):
    data = [sparse_data() for _ in range(8)]

    def run():
        trainer = MPSAETrainer(**BASE, steps=8, k=6)
        for step, x in enumerate(data):
            trainer.update(step, x)
        return trainer.ae.state_dict()

    a = run()
    torch.manual_seed(123)
    b = run()
    assert all(torch.equal(a[key], b[key]) for key in a)
    c = MPSAETrainer(**{**BASE, "seed": 1}, steps=8, k=6).ae.state_dict()
    assert not torch.equal(a["decoder.weight"], c["decoder.weight"])


@pytest.mark.parametrize("select", SELECTS)
def test_trainsae_reduces_loss_keeps_unit_atoms_and_round_trips(tmp_path, sparse_data, select):
    steps = 300
    cfg = ARCHITECTURES["mp_sae"].trainer_config(**BASE, steps=steps, k=8, lr=1e-2, select=select)
    probe = MPSAETrainer(**{k: v for k, v in cfg.items() if k != "trainer"})
    x_eval = sparse_data(512)
    first = probe.loss(x_eval, step=0, logging=True).losses["l2_loss"]
    trainSAE(stream(sparse_data), [cfg], steps=steps, save_dir=str(tmp_path), device="cpu")
    trainer_dir = tmp_path / "trainer_0"
    saved = json.loads((trainer_dir / "config.json").read_text())["trainer"]
    assert (saved["trainer_class"], saved["dict_class"], saved["k"], saved["select"]) == ("MPSAETrainer", "MPSAE", 8, select)
    ae, config = load_dictionary(trainer_dir)
    assert isinstance(ae, MPSAE) and int(ae.k) == 8 and ae.select == select
    state = torch.load(trainer_dir / "ae.pt", weights_only=True)
    assert set(state) == set(ae.state_dict())
    assert all(torch.equal(ae.state_dict()[key], value) for key, value in state.items())
    norms = ae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    with torch.no_grad():
        last = (x_eval - ae(x_eval)).square().sum(-1).mean().item()
    # A random unit dictionary already explains ~70% of the variance with 8 pursuit steps; training
    # must remove most of what is left.
    assert last < 0.4 * first, (first, last)
    fve = 1 - ((x_eval - ae(x_eval)).var(0).sum() / x_eval.var(0).sum()).item()
    assert fve > 0.85, fve


def test_trainsae_with_normalized_activations_folds_the_scale(tmp_path, sparse_data):
    """trainSAE trains on x / n (n ~ 130 here) and calls scale_biases(n) before saving: the saved
    dictionary must work on raw activations, with b_dec in raw units (unfolded it would be ~n times too small)."""
    cfg = ARCHITECTURES["mp_sae"].trainer_config(**BASE, steps=60, k=8, lr=3e-3)
    raw = lambda n=64: 40.0 * sparse_data(n)  # noqa: E731  (far from unit norm)
    trainSAE(stream(raw), [cfg], steps=60, save_dir=str(tmp_path), device="cpu", normalize_activations=True)
    ae, _ = load_dictionary(tmp_path / "trainer_0")
    x = raw(512)
    with torch.no_grad():
        rel_err = ((x - ae(x)).square().sum() / x.square().sum()).item()
    centre_norm = x.median(dim=0).values.norm().item()
    assert 0.2 < ae.b_dec.norm().item() / centre_norm < 5, (ae.b_dec.norm().item(), centre_norm)
    assert rel_err < 0.2, rel_err


def test_cli_builds_mp_sae_configs_with_k():
    from experiments import train
    from experiments.training.plan import plan_trainers, trainer_configs

    config = train.parse_args(["--architectures", "mp_sae", "top_k", "--k", "8", "16", "--steps", "50",
                               "--set", "mp_sae.select=abs", "--save-dir", "unused"]).config
    configs = trainer_configs(config, plan_trainers(config), d_model=32, lm_name="test")
    mp = [c for c in configs if c["trainer"] is MPSAETrainer]
    assert [(c["k"], c["select"]) for c in mp] == [(8, "abs"), (16, "abs")]


# --- SAEBench adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("select", SELECTS)
def test_saebench_adapter_agrees_with_encode_decode(select):
    trainer = MPSAETrainer(**BASE, steps=10, k=6, select=select)
    with torch.no_grad():
        trainer.ae.b_dec.normal_()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        f_ref = trainer.ae.encode(x.reshape(-1, 32))
        x_hat_ref = trainer.ae.decode(f_ref)
    sae = wrap_dictionary(trainer.ae, trainer.config)
    assert isinstance(sae, TiedDictionarySAE) and sae.check_decoder_norms()
    assert sae.cfg.architecture == "mp_sae"
    assert {n for n, _ in sae.named_parameters()} == {"W_dec", "b_dec"}
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (3, 7, 128)
        torch.testing.assert_close(f.reshape(-1, 128), f_ref, rtol=0, atol=0)
        torch.testing.assert_close(sae.decode(f).reshape(-1, 32), x_hat_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae(x.reshape(-1, 32)), x_hat_ref, rtol=1e-6, atol=1e-6)
        # W_enc is W_dec^T (what the first pursuit step correlates with) and b_enc is 0 ...
        torch.testing.assert_close(sae.W_enc, sae.W_dec.T, rtol=0, atol=0)
        assert sae.W_enc.shape == (32, 128) and torch.equal(sae.b_enc, torch.zeros(128))
        # ... and stays so: the wrapper's W_dec is the one encode reads.
        sae.W_dec.mul_(-1.0)
        torch.testing.assert_close(sae.W_enc, sae.W_dec.T, rtol=0, atol=0)
        assert not torch.equal(sae.encode(x), f)


def test_saebench_adapter_refuses_non_unit_decoder():
    trainer = MPSAETrainer(**BASE, steps=10, k=6)
    with torch.no_grad():
        trainer.ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, 128))
    with pytest.raises(WrapperError, match="unit norm"):
        wrap_dictionary(trainer.ae, trainer.config)


def test_export_to_saelens_matching_pursuit_reproduces_relu_mode_only():
    from saebench_adapters.saelens import ExportError, build_saelens, to_saelens
    from saebench_adapters.wrappers import probe_inputs

    trainer = MPSAETrainer(**BASE, steps=10, k=6)
    with torch.no_grad():
        trainer.ae.b_dec.normal_()
    sae = wrap_dictionary(trainer.ae, trainer.config)
    copy_ = to_saelens(sae, trainer.config)
    assert copy_.architecture == "matching_pursuit" and set(copy_.state_dict) == {"W_dec", "b_dec"}
    theirs = build_saelens(copy_.cfg, copy_.state_dict)
    x = probe_inputs(sae)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    signed = MPSAETrainer(**BASE, steps=10, k=6, select="abs")
    with pytest.raises(ExportError, match="no SAELens equivalent"):
        to_saelens(wrap_dictionary(signed.ae, signed.config), signed.config)
