"""The synthetic ground-truth study (experiments.synth): recovery of known features through the project's
wiring, SAELens's MCC against an independent recomputation, results.json against a re-evaluation of the saved
dictionaries, the SynthSAEBench-16k configuration, and bad input refused before anything trains."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from scipy.optimize import linear_sum_assignment

from dictionary_learning_ext import load_dictionary
from dictionary_learning_ext.errors import ConfigError, StudyError
from experiments import synth_study
from experiments.synth.metrics import EvalSet, saelens_metrics, saelens_sae
from experiments.synth.model import (
    FiringSpec,
    HierarchySpec,
    HubUnavailableError,
    MagnitudeSpec,
    OrthogonalizationSpec,
    SyntheticModelSpec,
    build_model,
    feature_structure,
)
from experiments.synth.setups import SETUPS, Setup, TrainingSpec
from experiments.synth.study import RESULTS, SyntheticBatches, reevaluate, run_synth_study, study_setup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMERIC = ("true_l0", "sae_l0", "dead_latents", "shrinkage", "explained_variance", "mcc", "uniqueness", "precision",
           "recall", "f1", "accuracy")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_quick")
    return out, run_synth_study(out, quick=True, seeds=(0, 1))


def tiny_orthogonal_setup(steps: int = 1500) -> Setup:
    """64 orthogonalised features in 32 dimensions, no hierarchy, no correlation, rare firing (true L0 ~1.7);
    a TopK of 32 latents at k=2."""
    model = SyntheticModelSpec(
        num_features=64, hidden_dim=32, firing=FiringSpec(exponent=0.5, max_prob=0.08, min_prob=0.02),
        hierarchy=None, correlation=None, orthogonalization=OrthogonalizationSpec(num_steps=300, lr=0.01),
        magnitudes=MagnitudeSpec(mean_start=1.0, mean_end=1.0, std_mean=0.1, std_std=0.05), bias=0.0, seed=0)
    training = TrainingSpec(dict_size=32, steps=steps, batch_size=256, l0_targets=(2,), l1_grid={},
                            architectures=("top_k",), eval_samples=4096, eval_batch_size=1024)
    return Setup(name="tiny-orthogonal", description="a tiny orthogonal model", model=model, training=training)


# --- feature recovery through the wiring ------------------------------------------------------------
def test_topk_recovers_the_features_of_a_tiny_orthogonal_model(tmp_path):
    results = run_synth_study(tmp_path, setup=tiny_orthogonal_setup(), seeds=(0,))
    (row,) = results["rows"]
    assert row["sae"] == "top_k" and row["sae_l0"] == pytest.approx(2.0)
    assert row["mcc"] > 0.9
    assert row["uniqueness"] > 0.9


def independent_mcc(out_dir, dictionary: str) -> float:
    """MCC from the files alone: the true feature vectors from the saved synthetic model (safetensors), the
    decoder from ae.pt, |cos| and scipy's Hungarian matching (no SAELens, no adapter)."""
    features = load_file(str(out_dir / "synthetic_model" / "synthetic_model.safetensors"))["feature_vectors"]
    state = torch.load(out_dir / dictionary / "ae.pt", map_location="cpu", weights_only=True)
    atoms = state["decoder.weight"].double().numpy().T  # (latents, D)
    a = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    f = features.astype(np.float64) / np.linalg.norm(features, axis=1, keepdims=True)
    cos = np.abs(a @ f.T)
    rows, cols = linear_sum_assignment(-cos)
    return float(cos[rows, cols].mean())


def test_saelens_mcc_equals_an_independent_recomputation(quick):
    out, results = quick
    checked = set()
    for row in results["rows"]:
        if row["sae"] in ("top_k", "mp_sae", "standard") and row["dictionary"] not in checked:
            checked.add(row["dictionary"])
            assert row["mcc"] == pytest.approx(independent_mcc(out, row["dictionary"]), abs=1e-5)
    assert len(checked) >= 3


def test_adapter_scores_like_the_equivalent_saelens_sae(quick):
    """The TopK dictionary through our adapter and through its exported SAELens TopK SAE: same numbers."""
    from sae_lens.synthetic import SyntheticModel

    from saebench_adapters.saelens import build_saelens, to_saelens

    out, results = quick
    row = next(r for r in results["rows"] if r["sae"] == "top_k")
    dictionary, config = load_dictionary(out / row["dictionary"])
    sae = saelens_sae(dictionary, config["trainer"])
    copy = to_saelens(sae, config["trainer"])
    assert copy.architecture == "topk"
    model = SyntheticModel.load_from_disk(out / "synthetic_model")
    t = results["settings"]["setup"]["training"]
    eval_set = EvalSet(model, t["eval_samples"], t["eval_batch_size"], t["eval_seed"])
    theirs = saelens_metrics(build_saelens(copy.cfg, copy.state_dict), model, eval_set)
    for key in NUMERIC:
        assert theirs[key] == pytest.approx(row[key], abs=1e-5), key


# --- the study's files and numbers --------------------------------------------------------------------
def test_results_equal_a_reevaluation_of_the_saved_dictionaries(quick):
    out, results = quick
    again = reevaluate(out)
    assert len(again) == len(results["rows"])
    for before, after in zip(results["rows"], again):
        for key in NUMERIC:
            assert after[key] == pytest.approx(before[key], abs=1e-6), (before["dictionary"], key)
        for group, summary in before["groups"].items():
            for key, value in summary.items():
                if value is None:
                    assert after["groups"][group][key] is None
                else:
                    assert after["groups"][group][key] == pytest.approx(value, abs=1e-6)


def test_results_are_self_describing(quick):
    out, results = quick
    saved = json.loads((out / RESULTS).read_text())
    for key in ("description", "settings", "rows", "table", "figures", "claims", "definitions", "ground_truth"):
        assert key in saved
    labels = results["settings"]["setup"]["training"]["architectures"]
    targets = results["settings"]["setup"]["training"]["l0_targets"]
    assert {(e["sae"], e["target_l0"]) for e in results["table"]} == {(s, t) for s in labels for t in targets}
    for entry in results["table"]:
        assert entry["n_seeds"] == 2
        own = [r["mcc"] for r in results["rows"]
               if r["role"] == "matched" and r["sae"] == entry["sae"] and r["target_l0"] == entry["target_l0"]]
        assert entry["mcc"]["mean"] == pytest.approx(sum(own) / len(own))
        assert entry["mcc"]["low"] <= entry["mcc"]["mean"] <= entry["mcc"]["high"]
    for row in results["rows"]:  # every dictionary on disk, in the trainSAE layout, loadable
        assert (out / row["dictionary"] / "ae.pt").is_file() and (out / row["dictionary"] / "config.json").is_file()
    for fig in results["figures"]:
        assert (out / fig["file"]).read_bytes().startswith(PNG_MAGIC) and fig["caption"]
    # one protocol for every SAE; auxK off where it cannot be honoured
    protocol = results["settings"]["protocol"]
    assert protocol["auxk_alpha"] == 0.0 and protocol["lr"] == 8e-4
    for row in results["rows"]:
        trainer = json.loads((out / row["dictionary"] / "config.json").read_text())["trainer"]
        assert trainer.get("auxk_alpha", 0.0) == 0.0 or row["sae"] == "vsae_topk:authors"
        assert trainer["lr"] == pytest.approx(8e-4)
    claims = results["claims"]
    verdicts = {c["verdict"] for c in claims["vsae_topk_vs_topk"]["comparisons"]}
    assert verdicts <= {"holds", "fails", "not distinguishable"}
    assert {c["metric"] for c in claims["vsae_topk_vs_topk"]["comparisons"]} == {"mcc", "f1", "uniqueness"}
    assert claims["mp_sae_structure"]["checked"]


def test_worker_processes_change_no_number(tmp_path):
    small = ['training.architectures=["top_k","standard"]', 'training.l1_grid={"standard":[0.03,0.3]}']
    alone = run_synth_study(tmp_path / "one", quick=True, seeds=(0, 1), overrides=small, workers=1)
    parallel = run_synth_study(tmp_path / "two", quick=True, seeds=(0, 1), overrides=small, workers=2)
    key = lambda r: (r["seed"], r["dictionary"], r["target_l0"])  # noqa: E731
    assert sorted(map(key, parallel["rows"])) == sorted(map(key, alone["rows"]))
    by_key = {key(r): r for r in alone["rows"]}
    for row in parallel["rows"]:
        for metric in NUMERIC:
            assert row[metric] == by_key[key(row)][metric], (key(row), metric)
    assert parallel["settings"]["workers"] == 2


def test_every_seed_group_reads_the_same_batches():
    model, _ = build_model(study_setup("synth", quick=True).model, "local")
    a, b = SyntheticBatches(model, 16, seed=3, setup="x"), SyntheticBatches(model, 16, seed=3, setup="x")
    first = [next(a) for _ in range(3)]
    torch.manual_seed(123)  # the caller's RNG state plays no part
    torch.randn(10)
    assert all(torch.equal(x, next(b)) for x in first)
    assert not torch.equal(first[0], next(SyntheticBatches(model, 16, seed=4, setup="x")))


def test_finished_results_are_reused_and_other_settings_refused(quick):
    out, results = quick
    assert run_synth_study(out, quick=True, seeds=(0, 1)) == json.loads((out / RESULTS).read_text())
    with pytest.raises(StudyError, match="other settings"):
        run_synth_study(out, quick=True, seeds=(0, 1, 2))


def test_hierarchy_structure_is_read_from_the_model():
    spec = SyntheticModelSpec(num_features=64, hidden_dim=16, hierarchy=HierarchySpec(total_root_nodes=2, branching_factor=4,
                                                                                      max_depth=2),
                              orthogonalization=None, seed=1)
    model, _ = build_model(spec, "local")
    s = feature_structure(model)
    assert int((s["depth"] == 0).sum()) == 2 and int((s["depth"] == 1).sum()) == 8 and int((s["depth"] == 2).sum()) == 32
    assert int(s["has_children"].sum()) == 10 and int((s["has_parent"] & ~s["has_children"]).sum()) == 32
    assert int((s["depth"] < 0).sum()) == 64 - 42


# --- SynthSAEBench-16k ---------------------------------------------------------------------------------
def test_synthsaebench16k_config_is_the_documented_one():
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    documented = SyntheticModelConfig(  # SAELens docs, synth_sae_bench.md / create_synth_bench_16k_model.py
        num_features=16_384, hidden_dim=768,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=128, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                                  mutually_exclusive_min_depth=0, compensate_probabilities=True,
                                  scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=42)
    setup = SETUPS["synthsaebench16k"]
    assert setup.model.saelens_config().to_dict() == documented.to_dict()
    assert setup.model.hub_repo == "decoderesearch/synth-sae-bench-16k-v2"
    t = setup.training
    assert (t.dict_size, t.batch_size, t.steps * t.batch_size, t.lr) == (4096, 1024, 199_999_488, 3e-4)
    assert {"batch_top_k", "standard", "mp_sae", "vsae_topk"} <= set(t.architectures)
    assert setup.published["by_l0"]["25"]["BatchTopK"]["f1"][0] == 0.7316


def test_synthsaebench16k_divided_down_trains_on_cpu(tmp_path):
    results = run_synth_study(tmp_path, setup="synthsaebench16k", quick=True, seeds=(0,), model_source="local")
    model = results["settings"]["model_source_used"]["config"]
    full = SETUPS["synthsaebench16k"].model.saelens_config().to_dict()
    assert (model["num_features"], model["hidden_dim"]) == (1024, 48)
    for key in ("firing_probability", "correlation", "orthogonalization", "mean_firing_magnitudes",
                "std_firing_magnitudes", "bias", "seed"):
        assert model[key] == full[key], key
    assert {k: v for k, v in model["hierarchy"].items() if k != "total_root_nodes"} == \
        {k: v for k, v in full["hierarchy"].items() if k != "total_root_nodes"}
    assert {r["sae"] for r in results["rows"]} == set(SETUPS["synthsaebench16k"].training.architectures)
    assert all(math.isfinite(r["mcc"]) for r in results["rows"])
    assert results["published"]["by_l0"]["25"]["MatchPursuit"]["mcc"][0] == 0.693
    again = run_synth_study(tmp_path, setup="synthsaebench16k", quick=True, seeds=(0,), model_source="local")
    assert again["elapsed_seconds"] == results["elapsed_seconds"]  # reused, not re-run


def test_hub_model_offline_is_a_clear_error_and_auto_builds_locally(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = study_setup("synth", quick=True).model.replace(hub_repo="decoderesearch/synth-sae-bench-16k-v2")
    with pytest.raises(HubUnavailableError, match="synth-sae-bench-16k-v2.*--model-source local"):
        build_model(spec, "hub")
    model, info = build_model(spec, "auto")
    assert info["used"].startswith("local build") and "synth-sae-bench-16k-v2" in info["hub_error"]
    assert model.cfg.num_features == spec.num_features


# --- bad input, refused before anything trains -------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["model.num_featurez=10"], "unknown key.*num_featurez"),
    (["model.firing.maxprob=0.3"], "unknown key.*maxprob"),
    (["training.dict_size=2048"], "larger than the synthetic model's 1024 true features"),
    (["training.l0_targets=[4,300]"], "L0 target 300 cannot be reached .* 256 latents"),
    (["model.hidden_dim=8"], "L0 target 9 cannot be reached by mp_sae in 8 dimensions"),
    (['training.architectures=["top_k","nope"]'], "unknown architecture 'nope'"),
    (["model.firing.max_prob=2"], "max_prob <= 1"),
    (["training.l1_grid={\"standard\":[0.1]}"], "at least two"),
    (["steps=10"], "expected model.KEY=VALUE"),
])
def test_bad_settings_are_named_before_anything_trains(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_synth_study(tmp_path / "out", overrides=overrides)
    assert not (tmp_path / "out").exists()


def test_hub_source_without_a_hub_copy_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="names none"):
        run_synth_study(tmp_path / "out", quick=True, model_source="hub")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seeds", [(), (0, 0), (-1,), (1_000_000,)])
def test_bad_seeds_are_refused(tmp_path, seeds):
    with pytest.raises(ConfigError, match="seed"):
        run_synth_study(tmp_path / "out", quick=True, seeds=seeds)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = synth_study.main([str(tmp_path / "out"), "--quick", "--set", "training.dict_size=100000"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dict_size" in err and "Traceback" not in err
    assert synth_study.main([str(tmp_path / "out"), "--setup", "nope"]) == 2
    assert "unknown synthetic setup 'nope'" in capsys.readouterr().err


# --- through the sweep: --study synth --------------------------------------------------------------
def test_synth_study_through_the_sweep_reports_its_table_claims_and_figures(tmp_path):
    import re

    from experiments.studies.definitions import get_study
    from experiments.studies.sweep import run_study

    study = get_study("synth").replace(synth_quick=True, digits_quick=True, seeds=(0, 1))
    results = run_study(study, tmp_path / "run")
    assert results.saes == [] and results.synth["settings"]["quick"] is True
    assert results.synth["settings"]["seeds"] == [0, 1]  # the study's seeds, not the synth default
    text = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "Ground truth: synthetic data with known features" in text
    assert "MP-SAE: the controlled digits study" in text  # beside it, as the issue asks
    for entry in results.synth["table"]:  # a row for every SAE and target, with its on-target flag
        assert re.search(rf"<td[^>]*>{re.escape(entry['sae'])}</td><td[^>]*>{entry['target_l0']}</td>", text)
    for line in (line for c in results.synth["claims"].values() for line in c.get("reading", [])):
        assert line.replace("'", "&#x27;") in text
    assert "Published SynthSAEBench-16k at L0 25" in text
    srcs = re.findall(r"<img src='(synth_[^']+)'", text)
    assert len(srcs) == len(results.synth["figures"]) > 0
    assert all((tmp_path / "run" / "report" / src).is_file() for src in srcs)


def test_an_unknown_synth_setup_is_refused_when_the_study_is_defined():
    from experiments.studies.definitions import get_study

    with pytest.raises(ConfigError, match="nosuch"):
        get_study("synth").replace(synth="nosuch")


def test_score_axes_start_at_zero(quick, tmp_path, monkeypatch):
    """F1, MCC and uniqueness are scores in [0, 1]: their panels start at 0, so a gap is drawn at its size."""
    from experiments.synth import figures

    drawn = []
    real_save = figures.save_figure

    def keep(fig, path, **kwargs):
        drawn.extend(fig.axes)
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(figures, "save_figure", keep)
    _, results = quick
    figures.make_figures(results, tmp_path)
    scores = [ax for ax in drawn if ax.get_ylabel() in ("F1 score (SAELens)", "MCC", "uniqueness")
              or ax.get_ylabel().startswith("per-feature recall")]
    assert len(scores) >= 4
    for ax in scores:
        assert ax.get_ylim()[0] <= 0, (ax.get_ylabel(), ax.get_ylim())
