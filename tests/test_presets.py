"""Study presets are validated data; the report's target verdict is computed as stated."""

import math

import pytest

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.config import ConfigError
from experiments.presets import PRESETS, SETUP_FIELDS, get_preset
from experiments.report import TARGET, target_rows
from experiments.sweep import planned_saes, train_argv
from experiments.train import build_trainer_configs, parse_args


def test_paper_preset_is_the_papers_setup():
    p = get_preset("paper")
    assert (p.model, p.layer, p.dict_size, p.steps, p.batch_size, p.n_ctxs, p.ctx_len, p.lr, p.autocast_dtype) == (
        "gelu-1l", 0, 2048, 20_000, 192, 2500, 128, 8e-4, "bfloat16")
    assert p.ks == (64, 128, 256, 512)
    assert p.architectures == ("top_k", "vsae_topk:paper")
    cfg = get_architecture("vsae_topk").config("paper", activation_dim=512, dict_size=2048, steps=20_000, layer=0,
                                                 lm_name="gelu-1l", k=64)
    assert (cfg.beta, cfg.kl_warmup_frac, cfg.select_on) == (1.0, 0.1, "sample")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_plans_configs_the_train_cli_accepts(name, tmp_path):
    preset = PRESETS[name]
    plan = planned_saes(preset)
    if not plan:
        assert preset.digits
        return
    args = parse_args(train_argv(preset, tmp_path / "saes"))
    configs = build_trainer_configs(args, d_model=256, lm_name="x")
    assert len(configs) == len(plan)
    for config, row in zip(configs, plan):
        assert config["trainer"] is get_architecture(row["architecture"]).trainer_class
        assert config.get("k") == row["k"]


def test_bad_presets_and_overrides_are_rejected():
    smoke = get_preset("smoke")
    with pytest.raises(ConfigError, match="ks"):
        smoke.replace(ks=(0,))
    with pytest.raises(ConfigError, match="ks"):
        smoke.replace(ks=(smoke.dict_size + 1,))
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        smoke.replace(architectures=("vsae_topk:paper+nope",))
    with pytest.raises(ConfigError, match="unknown preset field"):
        smoke.with_overrides(["stepz=3"])
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        smoke.with_overrides(["steps=0"])
    with pytest.raises(ConfigError, match="unknown evals"):
        smoke.replace(evals=("core", "vibes"))
    with pytest.raises(ConfigError, match="unknown study preset"):
        get_preset("fast")
    assert smoke.with_overrides(["steps=7", "ks=[4, 8]"]).ks == (4, 8)


def test_setup_takes_model_data_and_scale_from_another_preset():
    ablation, paper = get_preset("ablation"), get_preset("paper")
    on_paper = ablation.on_setup(paper)
    for name in SETUP_FIELDS:
        assert getattr(on_paper, name) == getattr(paper, name)
    assert on_paper.architectures == ablation.architectures


def _row(label, k, fve, alive, scr=None):
    saebench = {"core": {"status": "ok", "metrics": {"explained_variance": fve, "l0": k}}}
    if scr is not None:
        saebench["scr"] = {"status": "ok", "metrics": {"scr_metric_threshold_10": scr}}
    return {"label": label, "architecture": label.split(":")[0], "k": k, "trainer": f"{label}{k}", "saebench": saebench,
            "analysis": {"firing": {"frac_alive": alive}}}


def test_target_verdict_uses_the_worst_k():
    rows = [_row("top_k", 32, 0.90, 1.0, 0.1), _row("top_k", 64, 0.95, 1.0, 0.1),
            _row("vsae_topk", 32, 0.895, 0.97, 0.12), _row("vsae_topk", 64, 0.945, 0.96, 0.1),
            _row("vsae_topk:paper", 32, 0.90, 0.5, 0.2), _row("vsae_topk:paper", 64, 0.93, 1.0, 0.2)]
    verdict = {t["label"]: t for t in target_rows(rows)}
    assert set(verdict) == {"vsae_topk", "vsae_topk:paper"}
    ok = verdict["vsae_topk"]
    assert ok["min_frac_alive"] == 0.96 and ok["max_fve_gap"] == pytest.approx(0.005)
    assert ok["min_scr_minus_topk"] == pytest.approx(0.0) and math.isnan(ok["min_tpp_minus_topk"])
    assert ok["target_met"]
    bad = verdict["vsae_topk:paper"]
    assert bad["min_frac_alive"] == 0.5 < TARGET["min_frac_alive"]
    assert bad["max_fve_gap"] == pytest.approx(0.02)
    assert not bad["target_met"]
