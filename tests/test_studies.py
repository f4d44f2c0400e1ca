"""Study definitions are validated data; the report's target verdict is computed as stated."""

import math

import pytest

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.config import ConfigError
from experiments.studies.definitions import SETUP_RUN_FIELDS, SETUP_STUDY_FIELDS, STUDIES, get_study
from experiments.studies.report import TARGET, target_rows
from experiments.studies.results import Analysis, EvalOutcome, SaeResult
from experiments.training.plan import plan_trainers, trainer_configs


def test_paper_study_is_the_papers_setup():
    p = get_study("paper").run
    assert (p.model, p.layer, p.dict_size, p.steps, p.batch_size, p.n_ctxs, p.ctx_len, p.lr, p.autocast_dtype) == (
        "gelu-1l", 0, 2048, 20_000, 192, 2500, 128, 8e-4, "bfloat16")
    assert p.ks == (64, 128, 256, 512)
    assert p.architectures == ("top_k", "vsae_topk:paper")
    cfg = get_architecture("vsae_topk").config("paper", activation_dim=512, dict_size=2048, steps=20_000, layer=0,
                                                 lm_name="gelu-1l", k=64)
    assert (cfg.beta, cfg.kl_warmup_frac, cfg.select_on) == (1.0, 0.1, "sample")


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_plans_configs_the_train_run_accepts(name, tmp_path):
    study = STUDIES[name]
    plan = plan_trainers(study.run)
    if not plan:
        assert study.digits
        return
    config = study.run.replace(save_dir=str(tmp_path / "saes"))
    configs = trainer_configs(config, plan_trainers(config), d_model=256, lm_name="x")
    assert len(configs) == len(plan)
    for config, row in zip(configs, plan):
        assert config["trainer"] is get_architecture(row.architecture).trainer_class
        assert config.get("k") == row.k


def test_bad_studies_and_overrides_are_rejected():
    smoke = get_study("smoke")
    with pytest.raises(ConfigError, match="ks"):
        smoke.replace(ks=(0,))
    with pytest.raises(ConfigError, match="ks"):
        smoke.replace(ks=(smoke.run.dict_size + 1,))
    with pytest.raises(ConfigError, match="no variant 'nope'"):
        smoke.replace(architectures=("vsae_topk:paper+nope",))
    with pytest.raises(ConfigError, match="unknown study field"):
        smoke.with_overrides(["stepz=3"])
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        smoke.with_overrides(["steps=0"])
    with pytest.raises(ConfigError, match="unknown evals"):
        smoke.replace(evals=("core", "vibes"))
    with pytest.raises(ConfigError, match="unknown study"):
        get_study("fast")
    assert smoke.with_overrides(["steps=7", "ks=[4, 8]"]).run.ks == (4, 8)


def test_setup_takes_model_data_and_scale_from_another_study():
    ablation, paper = get_study("ablation"), get_study("paper")
    on_paper = ablation.on_setup(paper)
    for name in SETUP_RUN_FIELDS:
        assert getattr(on_paper.run, name) == getattr(paper.run, name)
    for name in SETUP_STUDY_FIELDS:
        assert getattr(on_paper, name) == getattr(paper, name)
    assert on_paper.run.architectures == ablation.run.architectures


def _row(label, k, fve, alive, scr=None):
    saebench = {"core": EvalOutcome("ok", {"explained_variance": fve, "l0": k})}
    if scr is not None:
        saebench["scr"] = EvalOutcome("ok", {"scr_metric_threshold_10": scr})
    name, _, variant = label.partition(":")
    return SaeResult(trainer=f"{label}{k}", label=label, architecture=name, variant=variant or "default", k=k,
                     dict_size=64, train_metrics={}, saebench=saebench,
                     analysis=Analysis(firing={"frac_alive": alive}, cosine={}, latent_map={}))


def test_target_verdict_uses_the_worst_k():
    rows = [_row("top_k", 32, 0.90, 1.0, 0.1), _row("top_k", 64, 0.95, 1.0, 0.1),
            _row("vsae_topk", 32, 0.895, 0.97, 0.12), _row("vsae_topk", 64, 0.945, 0.96, 0.1),
            _row("vsae_topk:paper", 32, 0.90, 0.5, 0.2), _row("vsae_topk:paper", 64, 0.93, 1.0, 0.2)]
    verdict = {t["label"]: t for t in target_rows(rows, baseline="top_k")}
    assert set(verdict) == {"vsae_topk", "vsae_topk:paper"}
    ok = verdict["vsae_topk"]
    assert ok["min_frac_alive"] == 0.96 and ok["max_fve_gap"] == pytest.approx(0.005)
    assert ok["min_scr_minus_topk"] == pytest.approx(0.0) and math.isnan(ok["min_tpp_minus_topk"])
    assert ok["target_met"]
    bad = verdict["vsae_topk:paper"]
    assert bad["min_frac_alive"] == 0.5 < TARGET["min_frac_alive"]
    assert bad["max_fve_gap"] == pytest.approx(0.02)
    assert not bad["target_met"]
