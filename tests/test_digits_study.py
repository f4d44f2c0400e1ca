"""The digits study in quick mode: its numbers against an independent recomputation from the saved
dictionaries, its files, reuse of finished results, and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dictionary_learning_ext import get_architecture, load_dictionary
from experiments import digits_study
from experiments.digits.study import (
    QUICK,
    StudyError,
    load_digits_split,
    run_digits_study,
    train_together,
    trainer_config,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, run_digits_study(out, seed=0, quick=True)


def independent_test_split(results):
    """The test split, rebuilt here from sklearn with numpy (not the study's loader)."""
    pixels = load_digits().data.astype(np.float64)
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0)).numpy()
    n_test = int(round(QUICK.test_fraction * len(pixels)))
    train, test = pixels[order[n_test:]], pixels[order[:n_test]]
    scale = math.sqrt((train**2).sum(1).mean() / 64)
    assert results["dataset"]["pixel_scale"] == pytest.approx(scale, rel=1e-5)
    assert results["dataset"]["n_test"] == n_test
    return test / scale


def test_table_numbers_match_a_recomputation_from_the_saved_dictionaries(study):
    out, results = study
    x_test = independent_test_split(results)
    table = results["table"]
    assert [r["architecture"] for r in table] == ["standard", "top_k", "vsae_topk", "mp_sae"]
    by_run = {r["run"]: r for r in results["rows"]}
    checked = 0
    for row in results["rows"]:
        ae, config = load_dictionary(out / row["dictionary"])
        assert config["trainer"]["trainer_class"] == get_architecture(row["architecture"]).trainer_class.__name__
        with torch.no_grad():
            f = ae.encode(torch.tensor(x_test, dtype=torch.float32))
            x_hat = ae.decode(f).double().numpy()
        f = f.numpy()
        sse = ((x_test - x_hat) ** 2).sum()
        assert row["fve"] == pytest.approx(1 - sse / ((x_test - x_test.mean(0)) ** 2).sum(), abs=1e-4)
        assert row["nmse"] == pytest.approx(sse / (x_test**2).sum(), abs=1e-4)
        assert row["l0"] == pytest.approx((f != 0).sum(1).mean(), abs=1e-6)
        # coherence from the decoder with numpy
        W = ae.decoder.weight.detach().double().numpy().T  # (F, D)
        A = W / np.linalg.norm(W, axis=1, keepdims=True)
        C = np.abs(A @ A.T)
        n = len(C)
        off = ~np.eye(n, dtype=bool)
        used = (f != 0).any(0)
        assert row["coherence_mean"] == pytest.approx(C[off].mean(), abs=1e-5)
        assert row["coherence_max"] == pytest.approx(C[off].max(), abs=1e-5)
        assert row["n_used"] == used.sum()
        pair = off & used[:, None] & used[None, :]
        if used.sum() < 2:  # e.g. a standard SAE with a huge L1 penalty: nothing to compare
            assert row["coherence_used_mean"] is None and row["coactive_coherence"] is None
            continue
        assert row["coherence_used_mean"] == pytest.approx(C[pair].mean(), abs=1e-5)
        assert row["coherence_used_max"] == pytest.approx(C[pair].max(), abs=1e-5)
        Cu = np.where(pair, C, -1.0)[used][:, used]
        assert row["coherence_nn_used_mean"] == pytest.approx(Cu.max(1).mean(), abs=1e-5)
        pair_sum = pair_count = 0.0
        for img in f:
            idx = np.flatnonzero(img)
            pair_sum += C[np.ix_(idx, idx)].sum() - np.trace(C[np.ix_(idx, idx)])
            pair_count += len(idx) * (len(idx) - 1)
        if pair_count:
            assert row["coactive_coherence"] == pytest.approx(pair_sum / pair_count, abs=1e-5)
        checked += 1
    assert checked >= 4  # at least the four matched runs had coherence to check
    # The table repeats its runs' numbers.
    for t in table:
        match = [r for r in by_run.values() if r["architecture"] == t["architecture"] and r["target_k"] == QUICK.matched_k]
        assert len(match) == 1 and all(match[0][k] == v for k, v in t.items())


def test_matched_l0_and_inference_k(study):
    _, results = study
    for row in results["table"]:
        if row["k"] is not None:
            assert row["l0"] <= row["k"] + 1e-9  # k-sparse: never more than k latents
            assert row["l0"] > 0.8 * row["k"]
    standard = [r for r in results["rows"] if r["architecture"] == "standard"]
    assert len(standard) > len(QUICK.l1_grid)  # the grid plus at least one refinement
    assert [r["l1_penalty"] for r in standard] != [None] * len(standard)
    mp = results["inference_k"]["mp_sae"]
    assert mp["k"] == list(QUICK.inference_ks) and mp["trained_k"] == QUICK.matched_k
    assert mp["monotone"] and all(b >= a - 1e-6 for a, b in zip(mp["fve"], mp["fve"][1:]))
    assert mp["fve"][-1] > mp["fve"][0]
    # At the training k the curve gives the table's number.
    mp_row = next(r for r in results["table"] if r["architecture"] == "mp_sae")
    assert mp["fve"][mp["k"].index(mp["trained_k"])] == pytest.approx(mp_row["fve"], abs=1e-6)
    claim = results["claim"]
    assert claim["checked"] and claim["mp_fve"] == mp_row["fve"]
    assert claim["mp_reconstructs_best_at_matched_l0"] == (
        mp_row["fve"] > max(r["fve"] for r in results["table"] if r["architecture"] != "mp_sae"))


def test_files_figures_and_results_json(study):
    out, results = study
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["table"] == json.loads(json.dumps(results["table"]))
    names = [f["file"] for f in results["figures"]]
    assert {"recon_vs_l0.png", "inference_k.png", "coherence.png"} <= set(names)
    assert {f"atoms_{a}.png" for a in ("standard", "top_k", "vsae_topk", "mp_sae")} <= set(names)
    for fig in results["figures"]:
        assert fig["caption"]
        data = (out / fig["file"]).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert results["settings"]["quick"] is True and results["settings"]["seed"] == 0


def test_same_seed_same_weights(study):
    """Retraining one run with the same seed gives the saved weights bit for bit."""
    out, _ = study
    (trainer, _), = train_together(
        [trainer_config("mp_sae", QUICK, seed=0, k=QUICK.matched_k)],
        load_digits_split(0, QUICK.test_fraction)[0], QUICK, seed=0,
    )
    saved = torch.load(out / "dictionaries" / f"mp_sae_k{QUICK.matched_k}" / "ae.pt", weights_only=True)
    assert all(torch.equal(trainer.ae.state_dict()[k], v) for k, v in saved.items())


def test_existing_results_are_reused_and_mismatches_refused(study):
    out, results = study
    stamp = (out / "results.json").stat().st_mtime_ns
    again = run_digits_study(out, seed=0, quick=True)
    assert again == json.loads((out / "results.json").read_text())
    assert (out / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(StudyError, match="force"):
        run_digits_study(out, seed=1, quick=True)
    with pytest.raises(StudyError, match="seed must be"):
        run_digits_study(out / "other", seed=-1, quick=True)


def test_cli_bad_parent_exits_2(tmp_path, capsys):
    assert digits_study.main([str(tmp_path / "missing" / "out"), "--quick"]) == 2
    assert "does not exist" in capsys.readouterr().err
