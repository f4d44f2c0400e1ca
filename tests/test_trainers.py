"""Training mechanics, the registry, checkpoints and the three ways of using our trainers."""

import copy
import json

import pytest
import torch
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary as dl_load_dictionary

import dictionary_learning_ext as ext
from dictionary_learning_ext import (
    ARCHITECTURES,
    CheckpointError,
    ConfigError,
    NonFiniteError,
    VSAETopK,
    VSAETopKTrainer,
    VSAETrainer,
    get_architecture,
    load_dictionary,
)
from dictionary_learning_ext.latent_activity import LatentActivityTracker

BASE = dict(activation_dim=32, dict_size=128, layer=0, lm_name="test", device="cpu", seed=0)


def stream(batch_fn, n=64):
    while True:
        yield batch_fn(n)


def fve(ae, x):
    x_hat = ae(x)
    return (1 - (x - x_hat).var(0).sum() / x.var(0).sum()).item()


@pytest.mark.parametrize("trainer_class", [VSAETrainer, VSAETopKTrainer])
def test_decoder_rows_unit_norm_after_steps(trainer_class, sparse_data):
    extra = {"k": 8} if trainer_class is VSAETopKTrainer else {}
    trainer = trainer_class(**BASE, steps=20, lr=1e-2, **extra)
    for step in range(20):
        trainer.update(step, sparse_data())
    norms = trainer.ae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_latent_that_only_fires_negative_counts_as_alive():
    tracker = LatentActivityTracker(dict_size=4, window_tokens=1000)
    f = torch.tensor([[-0.5, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    tracker.update_from_codes(f)
    assert tracker.alive_mask().tolist() == [True, False, True, False]
    assert tracker.frac_alive() == 0.5
    # A latent silent for a whole window turns dead.
    tracker.update_from_codes(torch.tensor([[0.0, 0.0, 2.0, 0.0]] * 1000))
    assert tracker.alive_mask().tolist() == [False, False, True, False]


def test_vsae_topk_magnitude_codes_negative_latents_alive(sparse_data):
    trainer = VSAETopKTrainer(**BASE, steps=10, k=8, select_by="magnitude", mean_activation="identity")
    with torch.no_grad():
        trainer.ae.encoder.bias[0] = -1e4  # latent 0 is always the most negative: always chosen
    trainer.update(0, sparse_data())
    trainer.update(1, sparse_data())
    assert trainer.activity.alive_mask()[0]


def test_same_seed_same_weights(sparse_data):
    data = [sparse_data() for _ in range(15)]

    def run():
        trainer = VSAETopKTrainer(**BASE, steps=15, k=8)
        for step, x in enumerate(data):
            trainer.update(step, x)
        return trainer.ae.state_dict()

    a = run()
    torch.manual_seed(999)
    b = run()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["vsae", "vsae_topk"])
def test_short_run_reduces_loss_and_explains_variance(name, sparse_data):
    arch = get_architecture(name)
    extra = {"k": 8} if name == "vsae_topk" else {"l1_penalty": 0.01}
    trainer = arch.trainer_class(**{**BASE, "steps": 300, "lr": 3e-3, "sigma": 0.1, **extra})
    x_eval = sparse_data(512)
    first = trainer.loss(x_eval, step=299, logging=True).losses
    for step in range(300):
        trainer.update(step, sparse_data())
    last = trainer.loss(x_eval, step=299, logging=True).losses
    # With sigma fixed at 0.1 the KL is dominated by its constant -log sigma^2 part, so the
    # reconstruction term is the one that must fall.
    assert last["loss"] < first["loss"]
    assert last["l2_loss"] < 0.5 * first["l2_loss"]
    assert fve(trainer.ae, x_eval) > 0.7


def test_trainsae_with_trainer_class_entries_and_by_name(tmp_path, sparse_data):
    """Usage ways (a) {"trainer": Class, ...} in plain trainSAE, (b) by name via the registry."""
    by_class = {"trainer": VSAETopKTrainer, **BASE, "steps": 30, "k": 8}
    by_name = ARCHITECTURES["vsae"].trainer_config(**BASE, steps=30)
    dl_topk = ARCHITECTURES["top_k"].trainer_config(**BASE, steps=30, k=8, warmup_steps=5)
    originals = copy.deepcopy([by_name, dl_topk])
    trainSAE(stream(sparse_data), [by_class, by_name, dl_topk], steps=30, save_dir=str(tmp_path), device="cpu")
    for i, (cls_name, dict_name) in enumerate(
        [("VSAETopKTrainer", "VSAETopK"), ("VSAETrainer", "VSAE"), ("TopKTrainer", "AutoEncoderTopK")]
    ):
        cfg = json.loads((tmp_path / f"trainer_{i}" / "config.json").read_text())["trainer"]
        assert (cfg["trainer_class"], cfg["dict_class"]) == (cls_name, dict_name)
        ae, _ = load_dictionary(tmp_path / f"trainer_{i}")  # (c) ours and dictionary_learning's
        assert type(ae).__name__ == dict_name
    # trainSAE pops "trainer" from what it is given; the registry hands out fresh dicts.
    assert ARCHITECTURES["vsae"].trainer_config(**BASE, steps=30) == originals[0]


# Every registered architecture (written by dictionary_learning's own trainSAE, so loaded by trainer_class).
@pytest.mark.parametrize("name,extra", [(name, {}) for name in sorted(ARCHITECTURES)]
                         + [("vsae_topk", {"learned_var": False})])
def test_save_load_roundtrip_identical_outputs(tmp_path, sparse_data, name, extra):
    from experiments.training.plan import fitted_step_defaults

    arch = ARCHITECTURES[name]
    k = {"k": 8} if "k" in arch.field_names else {}
    cfg = arch.trainer_config(**BASE, steps=10, **fitted_step_defaults(arch, 10), **k, **extra)
    trainSAE(stream(sparse_data), [cfg], steps=10, save_dir=str(tmp_path), device="cpu")
    trainer_dir = tmp_path / "trainer_0"
    ae, config = load_dictionary(trainer_dir)
    state = torch.load(trainer_dir / "ae.pt", weights_only=True)
    rebuilt = ARCHITECTURES[name].load(str(trainer_dir / "ae.pt"), config["trainer"], "cpu")
    x = sparse_data(32)
    if name == "standard_new":
        # dictionary_learning's loader rescales the April-update decoder to unit norm: same function, new weights.
        saved = arch.dict_class(BASE["activation_dim"], BASE["dict_size"])
        saved.load_state_dict(state)
        torch.testing.assert_close(ae(x), saved(x), rtol=1e-5, atol=1e-5)
        state = {}
    for key, value in state.items():
        assert torch.equal(ae.state_dict()[key], value)
    torch.testing.assert_close(ae.encode(x), rebuilt.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(ae(x), rebuilt(x), rtol=0, atol=0)


def test_load_dictionary_falls_back_to_dictionary_learning(tmp_path, sparse_data):
    cfg = ARCHITECTURES["standard"].trainer_config(**BASE, steps=10, warmup_steps=2, sparsity_warmup_steps=2)
    trainSAE(stream(sparse_data), [cfg], steps=10, save_dir=str(tmp_path), device="cpu")
    ours, _ = load_dictionary(tmp_path / "trainer_0")
    theirs, _ = dl_load_dictionary(str(tmp_path / "trainer_0"), device="cpu")
    x = sparse_data(8)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("learned_var", [False, True])
def test_scale_biases_folds_normalisation_exactly(learned_var):
    ae = VSAETopK(32, 128, k=8, learned_var=learned_var, log_var_init=-1.0)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x_raw = 7.0 * torch.randn(16, 32)
    scale = 7.0
    x_hat_norm = ae(x_raw / scale)
    _, lv_norm = ae.posterior(x_raw / scale)
    ae.scale_biases(scale)
    torch.testing.assert_close(ae(x_raw), scale * x_hat_norm, rtol=1e-5, atol=1e-4)
    _, lv_raw = ae.posterior(x_raw)
    torch.testing.assert_close(lv_raw, lv_norm + 2 * torch.log(torch.tensor(scale)), rtol=1e-5, atol=1e-4)


def test_trainsae_normalize_activations_saves_raw_scale_dictionary(tmp_path, sparse_data):
    def big():
        while True:
            yield 50.0 * sparse_data(64)

    cfg = ARCHITECTURES["vsae_topk"].trainer_config(**BASE, steps=200, k=8, lr=3e-3, sigma=0.1)
    trainSAE(big(), [cfg], steps=200, save_dir=str(tmp_path), device="cpu", normalize_activations=True)
    ae, _ = load_dictionary(tmp_path / "trainer_0")
    assert fve(ae, 50.0 * sparse_data(512)) > 0.5  # works on raw-scale activations


# --- configs and bad input -------------------------------------------------------------


def test_unknown_key_and_unknown_architecture_raise():
    with pytest.raises(ConfigError, match="unknown key.*'bta'"):
        VSAETopKTrainer(**BASE, steps=10, k=8, bta=1.0)
    with pytest.raises(ConfigError, match="unknown architecture 'vsea'.*vsae"):
        get_architecture("vsea")
    with pytest.raises(ConfigError, match="no variant"):
        ARCHITECTURES["vsae_topk"].config("papr", **BASE, steps=10)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"k": 129}, "k=129 must be <= dict_size=128"),
        ({"k": 0}, "k=0 must be >= 1"),
        ({"beta": -0.1}, "beta=-0.1 must be >= 0"),
        ({"kl_warmup_frac": 1.5}, "kl_warmup_frac=1.5 must be <= 1"),
        ({"select_on": "z"}, "select_on='z' must be one of"),
        ({"steps": 0}, "steps=0 must be >= 1"),
        ({"dict_size": -4}, "dict_size=-4 must be >= 1"),
        ({"sigma": 0.0}, "sigma=0.0 must be > 0"),
        ({"log_var_init": 9.0}, "log_var_min <= log_var_init <= log_var_max"),
        ({"lr": float("nan")}, "lr must be finite"),
    ],
)
def test_config_validation_messages(override, match):
    with pytest.raises(ConfigError, match=match):
        VSAETopKTrainer(**{**BASE, "steps": 10, "k": 8, **override})


def test_zero_is_a_value_not_a_default():
    trainer = VSAETopKTrainer(**BASE, steps=10, k=8, beta=0.0, kl_warmup_frac=0.0, auxk_alpha=0.0, lr=1e-3)
    assert trainer.cfg.beta == 0.0 and trainer.cfg.auxk_alpha == 0.0 and trainer.cfg.kl_warmup_frac == 0.0
    assert trainer.config["beta"] == 0.0
    trainer.compute_loss(torch.randn(4, 32), step=0)
    assert trainer.beta == 0.0


def test_wrong_width_and_non_finite_batches_raise(sparse_data):
    trainer = VSAETopKTrainer(**BASE, steps=10, k=8)
    with pytest.raises(ValueError, match=r"shape \(4, 16\); expected \(batch, 32\)"):
        trainer.update(0, torch.randn(4, 16))
    x = sparse_data(8)
    x[3, 5] = float("nan")
    before = {k: v.clone() for k, v in trainer.ae.state_dict().items()}
    with pytest.raises(NonFiniteError, match="NaN/Inf in 1 of 8 rows"):
        trainer.update(0, x)
    for key, value in trainer.ae.state_dict().items():
        assert torch.equal(value, before[key])


def test_checkpoint_config_mismatch_is_named(tmp_path, sparse_data):
    cfg = ARCHITECTURES["vsae_topk"].trainer_config(**BASE, steps=5, k=8)
    trainSAE(stream(sparse_data), [cfg], steps=5, save_dir=str(tmp_path), device="cpu")
    config_path = tmp_path / "trainer_0" / "config.json"
    config = json.loads(config_path.read_text())
    config["trainer"]["dict_size"] = 64
    config["trainer"]["k"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*encoder.weight"):
        load_dictionary(tmp_path / "trainer_0")
    config["trainer"]["dict_class"] = "AutoEncoder"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="dict_class='AutoEncoder'"):
        load_dictionary(tmp_path / "trainer_0")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_dictionary(tmp_path)


def test_registry_rejects_duplicates():
    arch = ARCHITECTURES["vsae"]
    with pytest.raises(ValueError, match="clashes"):
        ext.register(arch)
