"""A first run that reads well (issue 20): bad input ends in one line with exit code 2 and leaves a folder
that works once fixed, every requested eval has a column, help is fast, count and fraction axes start at 0."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweep
from experiments.studies.definitions import get_study
from experiments.studies.results import Analysis, EvalOutcome, SaeResult, StudyResults

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,message", [
    ("steps=2", r"--decay-frac 0.8 starts the decay at step 2 of 2, which must lie after the warm-up"),
    ("vsae_topk.bta=0.5", r"--set 'vsae_topk.bta=0.5': key\(s\) \['bta'\] match no field of VSAETopKConfig"),
    ("layer=3", r"layer 3 is out of range for 'vsae-gelu-2l'"),
    ("text=hf:nobody/no-such-dataset-xyz", r"cannot open the dataset 'nobody/no-such-dataset-xyz'"),
    ("model=no-such-model-xyz", r"unknown model 'no-such-model-xyz'"),
])
def test_bad_study_settings_end_in_one_line_and_the_folder_works_once_fixed(tmp_path, capsys, override, message):
    import re

    run_dir = tmp_path / "run"
    code = sweep.main(["--study", "smoke", "--run-dir", str(run_dir), "--set", "steps=20", "--set", override,
                       "--no-report"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
    # nothing finished, so the same folder takes the fixed study (no "holds a study with different settings")
    from experiments.studies.sweep import prepare_run_dir

    prepare_run_dir(get_study("smoke"), run_dir, force=False)


def _sae(label, seed, absorption):
    return SaeResult(trainer="trainer_0", seed=seed, path=f"seed_{seed}/trainer_0", label=label, architecture=label,
                     variant="default", k=8, dict_size=64, protocol={}, train_metrics={},
                     saebench={"core": EvalOutcome("ok", {"explained_variance": 0.9, "l0": 8.0}), "absorption": absorption},
                     analysis=Analysis(firing={"frac_alive": 1.0, "n_tokens": 1000}, cosine={}, latent_map={}))


def test_every_requested_eval_has_a_column_with_a_number_or_its_status():
    from experiments.studies.report import headline_cells, outcome_notes

    reason = "only 3 of 26 first letters are linearly decodable\nmore detail"
    study = get_study("smoke").replace(evals=("core", "absorption", "scr"))
    rows = [_sae("top_k", s, EvalOutcome("not_evaluable", reason=reason)) for s in (0, 1)]
    header, body = headline_cells(StudyResults(study=study, run_dir="x", saes=rows, wall_seconds={}))
    assert "absorption (mean fraction)" in header and "SCR (top 10)" in header
    row = dict(zip(header, body[0]))
    assert row["absorption (mean fraction)"] == "not evaluable" and row["SCR (top 10)"] == "not run"
    assert row["L0 (core)"] == "8.0 ± 0.0" and row["FVE (core explained variance)"] == "0.900 ± 0.000"
    notes = outcome_notes(StudyResults(study=study, run_dir="x", saes=rows, wall_seconds={}))
    assert "absorption: not evaluable for every SAE: only 3 of 26 first letters are linearly decodable" in notes


@pytest.mark.parametrize("module", ["experiments.train", "experiments.sweep", "experiments.report",
                                    "experiments.digits_study", "experiments.demo", "saebench_adapters.run_evals",
                                    "saebench_adapters.export"])
def test_help_answers_in_under_a_second(module):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    assert seconds < 1.0, f"{module} --help took {seconds:.2f} s"


def test_count_and_fraction_axes_start_at_zero(tmp_path, monkeypatch):
    """Every axis whose label counts latents or gives a fraction of tokens starts at (or below) 0."""
    import numpy as np
    import torch

    from experiments.analyses import figures, latent_map
    from experiments.studies import report

    drawn = []
    real_save = figures.save_figure

    def keep(fig, path, **kwargs):
        drawn.extend(fig.axes)
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", keep)
    monkeypatch.setattr(latent_map, "save_figure", keep)
    study = get_study("smoke")
    rows = []
    for seed in (0, 1):
        for label in ("top_k", "vsae_topk"):
            for k in (8, 16):
                rows.append(SaeResult(
                    trainer="trainer_0", seed=seed, path="p", label=label, architecture=label, variant="default", k=k,
                    dict_size=1024, protocol={}, train_metrics={},
                    saebench={"core": EvalOutcome("ok", {"explained_variance": 0.9, "l0": k, "ce_loss_score": 0.9,
                                                        "kl_div_score": 0.9})},
                    analysis=Analysis(firing={"frac_alive": 0.99, "n_tokens": 1000, "unique_window": 1000,
                                              "unique_latents_in_window": 1017 + seed + k},
                                      cosine={"mean": 0.0, "var": 0.01, "hist_edges": list(np.linspace(-1, 1, 5)),
                                              "hist_counts": [0, 5, 5, 0]}, latent_map={})))
    report.comparison_figures(StudyResults(study=study, run_dir="x", saes=rows, wall_seconds={}), tmp_path)
    gen = torch.Generator().manual_seed(0)
    stats = {"alive_F": torch.ones(40, dtype=torch.bool), "utilisation_F": torch.rand(40, generator=gen) * 0.1 + 0.05,
             "mean_activation_F": torch.rand(40, generator=gen)}
    m = latent_map.latent_map(torch.randn(40, 8, generator=gen), stats, 4, 0)
    latent_map.plot_latent_map(m, "test", tmp_path / "map.png")
    counted = [ax for ax in drawn if any(w in ax.get_ylabel() for w in ("unique latents", "fraction of latents",
                                                                         "latents in cluster", "mean utilisation"))]
    assert len(counted) >= 4
    for ax in counted:
        assert ax.get_ylim()[0] <= 0, (ax.get_ylabel(), ax.get_ylim())
