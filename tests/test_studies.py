"""Study definitions are validated data; the report's target verdict is computed as stated."""

import math

import pytest

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.config import ConfigError
from experiments.studies.definitions import SETUP_RUN_FIELDS, SETUP_STUDY_FIELDS, STUDIES, get_study
from experiments.studies import compare
from experiments.studies.results import Analysis, EvalOutcome, SaeResult, StudyResults
from experiments.stats import detectable_difference, mean_interval, paired_difference, verdict
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


def _row(label, k, fve, alive, scr=None, seed=0):
    saebench = {"core": EvalOutcome("ok", {"explained_variance": fve, "l0": k})}
    if scr is not None:
        saebench["scr"] = EvalOutcome("ok", {"scr_metric_threshold_10": scr})
    name, _, variant = label.partition(":")
    return SaeResult(trainer=f"{label}{k}", seed=seed, path=f"seed_{seed}/{label}{k}", label=label, architecture=name, variant=variant or "default",
                     k=k, dict_size=64, protocol={}, train_metrics={}, saebench=saebench,
                     analysis=Analysis(firing={"frac_alive": alive}, cosine={}, latent_map={}))


def _results(rows):
    return StudyResults(study=get_study("smoke").replace(evals=("core", "scr")), run_dir="x", saes=rows, wall_seconds={})


def test_interval_is_the_student_t_closed_form():
    iv = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3), t_{0.975, 2} = 4.302652729911275
    assert (iv.mean, iv.sd, iv.n) == (2.0, 1.0, 3)
    assert iv.half_width == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert mean_interval([5.0]).n == 1 and math.isnan(mean_interval([5.0]).low)
    assert mean_interval([1.0, float("nan"), 3.0]).n == 2  # an eval that did not run is left out
    diff = paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 1.5, 3: 9.0})  # seed 3 is unpaired
    assert diff.mean == pytest.approx((0.5 + 1.0 + 2.5) / 3) and diff.n == 3
    # (t_{0.975,2} + t_{0.8,2}) * sd / sqrt(n), t_{0.8,2} = 1.0606601717798212
    assert detectable_difference(1.0, 3) == pytest.approx((4.302652729911275 + 1.0606601717798212) / math.sqrt(3))


def test_verdict_has_three_outcomes():
    assert verdict(mean_interval([0.10, 0.11, 0.12])) == "holds"
    assert verdict(mean_interval([-0.10, -0.11, -0.12])) == "fails"
    assert verdict(mean_interval([-0.1, 0.0, 0.1])) == "not distinguishable"
    assert verdict(mean_interval([0.3])) == "not distinguishable"  # one seed: no interval
    assert verdict(mean_interval([0.97, 0.975, 0.98]), threshold=0.95) == "holds"
    assert verdict(mean_interval([0.90, 0.91, 0.92]), threshold=0.95) == "fails"


def test_target_is_decided_on_intervals_at_every_k():
    rows = []
    for seed, (noise) in enumerate((0.0, 0.001, -0.001)):
        rows += [_row("top_k", 32, 0.90 + noise, 1.0, 0.10 + noise, seed), _row("top_k", 64, 0.95 + noise, 1.0, 0.10, seed),
                 # within 0.01 of TopK at every k and alive: holds
                 _row("vsae_topk", 32, 0.897 + noise, 0.97, 0.12 + noise, seed),
                 _row("vsae_topk", 64, 0.946 + noise, 0.96 + noise, 0.10 + 0.05 * (seed - 1), seed),
                 # dead at k=32, FVE 0.02 below at k=64: fails there
                 _row("vsae_topk:paper", 32, 0.90 + noise, 0.5, 0.2, seed),
                 _row("vsae_topk:paper", 64, 0.93 + noise, 1.0, 0.2, seed)]
    judgements = compare.judge(_results(rows))
    by = {(j.label, j.criterion.key, j.k): j for j in judgements}
    assert {label for label, _, _ in by} == {"vsae_topk", "vsae_topk:paper"}  # the baseline is not judged
    assert by[("vsae_topk", "frac_alive", 32)].verdict == "holds"
    assert by[("vsae_topk", "fve", 32)].interval.mean == pytest.approx(-0.003)
    assert by[("vsae_topk", "fve", 32)].verdict == "holds" and by[("vsae_topk", "fve", 64)].verdict == "holds"
    assert by[("vsae_topk", "scr", 32)].verdict == "holds"
    assert by[("vsae_topk", "scr", 64)].verdict == "not distinguishable"  # spread over seeds straddles 0
    assert by[("vsae_topk:paper", "frac_alive", 32)].verdict == "fails"
    assert by[("vsae_topk:paper", "fve", 64)].interval.mean == pytest.approx(-0.02)
    assert by[("vsae_topk:paper", "fve", 64)].verdict == "fails"
    own = [j for j in judgements if j.label == "vsae_topk" and j.criterion.key == "scr"]
    assert compare.overall(own) == "not distinguishable at k = 64"
    assert compare.overall([j for j in judgements if j.label == "vsae_topk" and j.criterion.key == "fve"]) == "holds at every k"


def test_study_seed_lists_and_protocol_are_checked():
    smoke = get_study("smoke")
    with pytest.raises(ConfigError, match="seeds is empty"):
        smoke.replace(seeds=())
    with pytest.raises(ConfigError, match=r"seeds \[0, 0\] must be distinct"):
        smoke.replace(seeds=(0, 0))
    with pytest.raises(ConfigError, match=r"training protocol leaves \['warmup_frac'\]"):
        smoke.replace(warmup_frac=None)
    with pytest.raises(ConfigError, match=r"--auxk-alpha 0.03125 cannot be honoured by mp_sae: MPSAEConfig has no 'auxk_alpha'"):
        smoke.replace(architectures=("top_k", "mp_sae"))
    assert smoke.replace(architectures=("top_k", "mp_sae"), auxk_alpha=0.0).run.auxk_alpha == 0.0
    with pytest.raises(ConfigError, match="has no variant 'nope'"):
        smoke.replace(architectures=("vsae_topk:nope",))


def test_protocol_reaches_every_trainer_config_unless_a_variant_keeps_its_own():
    run = get_study("smoke").run.replace(architectures=("top_k", "vsae_topk", "vsae_topk:paper", "standard"),
                                         steps=1000, auxk_alpha=0.0)
    plan = plan_trainers(run)
    for t, cfg in zip(plan, trainer_configs(run, plan, d_model=32, lm_name="x")):
        assert (cfg["lr"], cfg["warmup_steps"], cfg["decay_start"]) == (8e-4, 50, 800), t.label
        if "auxk_alpha" in cfg:
            assert (cfg["auxk_alpha"], cfg["dead_window_tokens"]) == (0.0, 20_000), t.label
