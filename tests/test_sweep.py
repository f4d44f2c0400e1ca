"""The `smoke` study end to end: training, SAEBench, analyses, results.json and the HTML report,
with the reported numbers recomputed independently of the code that produced them."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dictionary_learning_ext import load_dictionary
from experiments.analyses.activations import ActivationSample
from dictionary_learning_ext.errors import StudyError
from experiments.studies.definitions import get_study
from experiments.studies.sweep import run_study
from experiments.training.plan import plan_trainers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "smoke"
    study = get_study("smoke")
    results = run_study(study, run_dir)
    return study, run_dir, results


def test_results_cover_every_planned_sae(smoke):
    study, run_dir, results = smoke
    plan = plan_trainers(study.run)
    assert [(r.seed, r.trainer) for r in results.saes] == [(s, p.trainer) for s in study.seeds for p in plan]
    assert len(plan) == len(study.run.architectures) * len(study.run.ks)
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results.to_dict()))
    for row in results.saes:
        config = json.loads((run_dir / "saes" / row.path / "config.json").read_text())["trainer"]
        assert config["k"] == row.k and config["dict_size"] == study.run.dict_size
        assert (config["architecture"], config["variant"]) == (row.architecture, row.variant)
        # one protocol for every SAE, as each saved config.json records it
        run = study.run
        expected = {"lr": run.lr, "warmup_steps": round(run.warmup_frac * run.steps),
                    "decay_start": round(run.decay_frac * run.steps), "auxk_alpha": run.auxk_alpha,
                    "dead_window_tokens": run.dead_window_tokens}
        assert {key: config[key] for key in expected} == expected, row.path
        assert {key: row.protocol[key] for key in expected} == expected
        assert row.protocol["normalize_activations"] is run.normalize_activations and row.protocol["departures"] == {}
        for eval_type in study.evals:
            assert row.saebench[eval_type].status == "ok", row.saebench[eval_type]


def test_firing_numbers_match_a_recount_from_the_saved_sample(smoke):
    study, run_dir, results = smoke
    sample = ActivationSample.load(run_dir / "analyses" / "sample.pt")
    assert sample.tokens_NT.shape == (study.analysis_contexts, study.run.ctx_len)
    x_BD = sample.acts_BD
    for row in results.saes:
        ae, _ = load_dictionary(run_dir / "saes" / row.path)
        with torch.no_grad():
            f_BF = ae.encode(x_BD)
        fired_F = (f_BF != 0).any(dim=0)
        firing = row.analysis.firing
        assert firing["frac_alive"] == pytest.approx(fired_F.float().mean().item())
        assert firing["n_alive"] == int(fired_F.sum())
        window = firing["unique_window"]
        assert window == min(study.unique_window, x_BD.shape[0])
        assert firing["unique_latents_in_window"] == int((f_BF[:window] != 0).any(dim=0).sum())
        assert firing["l0"] == pytest.approx((f_BF != 0).sum(dim=-1).float().mean().item())
        if row.k is not None:
            assert firing["l0"] <= row.k + 1e-6


def test_cosine_statistics_match_the_decoder(smoke):
    _, run_dir, results = smoke
    sample = ActivationSample.load(run_dir / "analyses" / "sample.pt")
    for row in results.saes:
        ae, _ = load_dictionary(run_dir / "saes" / row.path)
        with torch.no_grad():
            alive_F = (ae.encode(sample.acts_BD) != 0).any(dim=0)
        d_FD = ae.decoder.weight.T.detach()
        d_FD = d_FD / d_FD.norm(dim=-1, keepdim=True)
        d_AD = d_FD[alive_F]
        cos_AA = d_AD @ d_AD.T
        off = cos_AA[~torch.eye(len(d_AD), dtype=torch.bool)]
        cos = row.analysis.cosine
        assert cos["n_active"] == int(alive_F.sum())
        assert cos["mean"] == pytest.approx(off.mean().item(), abs=1e-5)
        assert cos["max_abs"] == pytest.approx(off.abs().max().item(), abs=1e-5)
        assert sum(cos["hist_counts"]) == len(d_AD) * (len(d_AD) - 1) // 2


def test_sample_activations_are_the_models_at_the_hook(smoke):
    """The analysis sample (TransformerLens) equals the training path's activations (nnsight submodule)."""
    from experiments.lm.models import load_model

    study, run_dir, _ = smoke
    sample = ActivationSample.load(run_dir / "analyses" / "sample.pt")
    lm = load_model(study.run.model, layer=study.run.layer)
    tokens = sample.tokens_NT[:2]
    with torch.no_grad(), lm.model.trace(tokens):
        out = lm.submodule.output.save()
    acts = out.value if hasattr(out, "value") else out
    acts = acts[0] if isinstance(acts, tuple) else acts
    torch.testing.assert_close(acts.float(), sample.acts_NTD[:2], atol=1e-4, rtol=1e-4)


def test_saebench_numbers_are_the_result_files(smoke):
    _, _, results = smoke
    for row in results.saes:
        core = row.saebench["core"]
        metrics = json.loads(Path(core.file).read_text())["eval_result_metrics"]
        assert core.metrics["explained_variance"] == metrics["reconstruction_quality"]["explained_variance"]
        assert core.metrics["l0"] == pytest.approx(metrics["sparsity"]["l0"])


def test_feature_pages_show_real_top_activations(smoke):
    _, run_dir, results = smoke
    sample = ActivationSample.load(run_dir / "analyses" / "sample.pt")
    row = results.saes[0]
    ae, _ = load_dictionary(run_dir / "saes" / row.path)
    with torch.no_grad():
        f_NTF = ae.encode(sample.acts_BD).reshape(*sample.tokens_NT.shape, -1)
    pages = row.analysis.feature_pages
    assert pages
    for page in pages:
        acts_NT = f_NTF[..., page["latent"]]
        best = page["examples"][0]
        assert best["acts"][best["max_index"]] == pytest.approx(acts_NT.abs().max().item(), rel=1e-3)
        assert page["utilisation"] == pytest.approx((acts_NT != 0).float().mean().item())
        assert len(page["logits_positive"]) == len(page["logits_negative"]) > 0
        assert page["logits_positive"][0][1] >= page["logits_negative"][0][1]


def test_report_references_only_existing_images(smoke):
    _, run_dir, _ = smoke
    index = run_dir / "report" / "index.html"
    text = index.read_text()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert len(srcs) >= 5
    for src in srcs:
        assert (index.parent / src).is_file(), src
        assert (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # headline first: the headline table comes before any figure
    assert text.index("Headline") < text.index("<img")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (.ci/run installs it)")
def test_report_images_all_load_in_headless_chromium(smoke, tmp_path):
    _, run_dir, _ = smoke
    assert CHROMIUM, "chromium not installed: .ci/run installs it with apt-get"
    index = (run_dir / "report" / "index.html").resolve()
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", index.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    n_img = len(re.findall(r"<img src=", index.read_text()))
    assert f'data-images="{n_img}"' in dom, dom[:300]
    assert 'data-broken-images="0"' in dom, re.findall(r"image failed to load: [^<]+", dom)


def test_rerun_skips_finished_stages_and_rejects_a_different_study(smoke):
    study, run_dir, results = smoke
    stamp = (run_dir / "saes" / "seed_0" / "trainer_0" / "ae.pt").stat().st_mtime_ns
    again = run_study(study, run_dir)
    assert (run_dir / "saes" / "seed_0" / "trainer_0" / "ae.pt").stat().st_mtime_ns == stamp
    assert [r.analysis for r in again.saes] == [r.analysis for r in results.saes]
    assert again.wall_seconds["train"] == results.wall_seconds["train"]
    # a study whose fields do not survive JSON unchanged (int dict keys) still counts as the same study
    extra = study.replace(paper_k_equivalent={8: 64})
    (run_dir / "study.json").write_text(json.dumps(extra.to_dict()))
    from experiments.studies.sweep import prepare_run_dir

    prepare_run_dir(extra, run_dir, force=False)
    with pytest.raises(StudyError, match="different settings.*steps"):
        run_study(study.replace(steps=study.run.steps + 1), run_dir)


def test_digits_only_study_reports_its_section(tmp_path):
    study = get_study("digits").replace(digits_quick=True)
    results = run_study(study, tmp_path / "digits_run")
    assert results.saes == [] and results.digits["settings"]["quick"] is True
    text = (tmp_path / "digits_run" / "report" / "index.html").read_text()
    assert "MP-SAE: the controlled digits study" in text
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert len(srcs) == len(results.digits["figures"]) > 0
    for src in srcs:
        assert (tmp_path / "digits_run" / "report" / src).is_file()
    for row in results.digits["table"]:
        assert re.search(rf"<td[^>]*>{row['architecture']}</td>", text)


def test_a_killed_sweep_continues_where_it_stopped(smoke, tmp_path):
    """SIGKILL the sweep during training; the re-run resumes from the checkpoint and gives the
    uninterrupted run's weights bit for bit (CPU, same seed), then finishes every stage."""
    import signal
    import sys
    import time

    study, reference_dir, _ = smoke
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--study", "smoke", "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_dir / "saes" / ".seed_0.partial" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob("step_*.pt"))):
        assert proc.poll() is None, "the sweep ended before writing a checkpoint"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "saes" / "seed_0" / "run.json").exists()

    results = run_study(study, run_dir)
    assert len(results.saes) == len(plan_trainers(study.run)) * len(study.seeds)
    for row in results.saes:
        done = torch.load(run_dir / "saes" / row.path / "ae.pt", weights_only=True)
        ref = torch.load(reference_dir / "saes" / row.path / "ae.pt", weights_only=True)
        assert done.keys() == ref.keys()
        for key in ref:
            assert torch.equal(done[key], ref[key]), (row.trainer, key)


def test_missing_run_dir_parent_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(StudyError, match="parent .* does not exist; create it first"):
        run_study(get_study("smoke"), tmp_path / "no" / "such" / "run")
    assert not (tmp_path / "no").exists()


def _numbers(results: dict) -> dict:
    """Every SAE's numbers, without file paths and wall times (which differ between two runs of a study)."""
    rows = {}
    for r in results["saes"]:
        outcomes = {e: {k: v for k, v in o.items() if k != "file"} for e, o in r["saebench"].items()}
        rows[(r["seed"], r["label"], r["k"])] = (r["train_metrics"], outcomes, r["analysis"], r["protocol"])
    return rows


def test_a_two_shard_sweep_gives_the_unsharded_results(smoke, tmp_path, capfd):
    from experiments.studies.sweep import Shard

    study, reference_dir, _ = smoke
    run_dir = tmp_path / "sharded"
    assert run_study(study, run_dir, shard=Shard(0, 2)) is None  # the other shard's run is not done yet
    assert (run_dir / "saes" / "seed_0" / "run.json").is_file() and not (run_dir / "saes" / "seed_1").exists()
    assert not (run_dir / "results.json").exists()
    results = run_study(study, run_dir, shard=Shard(1, 2))  # the last shard evaluates and writes the report
    assert (run_dir / "report" / "index.html").is_file()
    # The terminal: a few progress lines per stage, the libraries' output in the logs
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert len(lines) < 100, lines
    for stage in ("train", "evals", "analyses", "report"):
        assert any(line.startswith(f"{stage} ") for line in lines), (stage, lines)
    assert (run_dir / "logs" / "evals.log").stat().st_size > 0
    reference = json.loads((reference_dir / "results.json").read_text())
    assert _numbers(results.to_dict()) == _numbers(reference)
    # a re-run of a shard skips its finished run
    stamp = (run_dir / "saes" / "seed_0" / "trainer_0" / "ae.pt").stat().st_mtime_ns
    run_study(study, run_dir, shard=Shard(0, 2), report=False)
    assert (run_dir / "saes" / "seed_0" / "trainer_0" / "ae.pt").stat().st_mtime_ns == stamp


def test_one_run_per_sae_trains_the_same_saes_as_one_run_per_seed(smoke, tmp_path):
    from experiments.studies.sweep import check_trained, stage_train

    study, reference_dir, _ = smoke
    per_sae = study.replace(units="sae", seeds=(0,))
    run_dir = tmp_path / "per_sae"
    stage_train(per_sae, run_dir, force=False)
    for sae in check_trained(per_sae, run_dir):
        assert sae.path == f"seed_0/sae_{sae.trainer.index}/trainer_0"
        done = torch.load(run_dir / "saes" / sae.path / "ae.pt", weights_only=True)
        ref = torch.load(reference_dir / "saes" / "seed_0" / sae.trainer.trainer / "ae.pt", weights_only=True)
        for key in ref:
            assert torch.equal(done[key], ref[key]), (sae.path, key)
        metrics = json.loads((run_dir / "saes" / sae.path / "metrics.json").read_text())
        ref_metrics = json.loads((reference_dir / "saes" / "seed_0" / sae.trainer.trainer / "metrics.json").read_text())
        assert {k: v for k, v in metrics.items() if k != "trainer"} == {k: v for k, v in ref_metrics.items() if k != "trainer"}


def test_shard_specs_and_the_environment():
    from experiments.studies.sweep import Shard
    from experiments.sweep import shard_of

    assert shard_of("1/3", {}) == Shard(1, 3)
    assert shard_of(None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4)
    assert shard_of(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_of(None, {}) == Shard(0, 1)
    with pytest.raises(StudyError, match="index must lie in 0..1"):
        shard_of("2/2", {})
    owned = [[i for i in range(7) if Shard(r, 3).owns(i)] for r in range(3)]
    assert owned == [[0, 3, 6], [1, 4], [2, 5]]


def test_report_prints_the_headline_as_markdown(smoke, capsys):
    from experiments import report

    study, reference_dir, _ = smoke
    assert report.main([str(reference_dir), "--markdown"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("| k ") and set(lines[1]) <= set("|-: ")
    results = json.loads((reference_dir / "results.json").read_text())
    for label, k in {(r["label"], r["k"]) for r in results["saes"]}:  # one row per SAE and k, seeds averaged
        assert sum(line.startswith(f"| {k} ") and f"| {label} " in line for line in lines) == 1, (label, k)
    assert f"Against {study.baseline}" in out


def test_eval_progress_counts_result_files_when_the_evals_change_directory(tmp_path, monkeypatch):
    """SAEBench's evals run in their own working directory; a relative run dir must still be counted."""
    import os
    import time

    from experiments.studies.sweep import result_files_watched

    class Seen:
        done = 0

        def update(self, done):
            self.done = done

    (tmp_path / "run" / "eval_results" / "core").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    seen = Seen()
    with result_files_watched(Path("run") / "eval_results", seen, every=0.05):
        os.chdir(tmp_path / "elsewhere")  # what the evals do
        for i in range(3):
            (tmp_path / "run" / "eval_results" / "core" / f"sae_{i}.json").write_text("{}")
        (tmp_path / "run" / "eval_results" / "summary.json").write_text("{}")
        time.sleep(0.5)
    assert seen.done == 3
