"""saebench_adapters.run_evals: SAEBench's five evals on briefly trained TopK and VSAETopK SAEs.

Runs on the embedded default model (experiments.lm.models, "vsae-gelu-2l"), where all five evals, absorption
included, must produce results that SAEBench's validator accepts.
"""

import json
import os
import random
from pathlib import Path

import pytest
import sae_bench
import torch
from dictionary_learning.training import trainSAE
from transformer_lens import HookedTransformer

import dictionary_learning_ext as dle
from saebench_adapters import standin_data
from saebench_adapters.results import validated
from saebench_adapters.run_evals import EVALS, EvalError, run_evals
from saebench_adapters.standin_model import standin_model

STEPS = 300


def eval_model() -> HookedTransformer:
    # The embedded default model (committed, checksummed): it spells well enough for SAEBench's absorption eval.
    from experiments.lm.models import load_model

    return load_model("default", layer=0).hooked_transformer()


@torch.no_grad()
def activations(model: HookedTransformer, n_texts: int = 300) -> torch.Tensor:
    rng = random.Random(0)
    texts = []
    for _ in range(n_texts // 3):
        texts.append(standin_data.bio(rng.randrange(28), rng.randrange(2), rng))
        texts.append(standin_data.review(rng.randrange(34), rng.choice((1.0, 5.0)), rng))
        texts.append(standin_data.news(rng.randrange(4), rng))
    hook = "blocks.0.hook_resid_post"
    out = []
    for i in range(0, len(texts), 32):
        toks = model.to_tokens(texts[i : i + 32], prepend_bos=True, padding_side="right")[:, :64]
        _, cache = model.run_with_cache(toks, names_filter=hook)
        keep = toks[:, 1:] != model.tokenizer.pad_token_id
        out.append(cache[hook][:, 1:][keep])
    return torch.cat(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)  # the machine's other core belongs to other workers
    model = eval_model()
    acts = activations(model)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield acts[torch.randint(0, len(acts), (128,), generator=gen)]

    d = model.cfg.d_model
    common = dict(steps=STEPS, activation_dim=d, dict_size=2 * d, layer=0, lm_name=model.cfg.model_name,
                  seed=0, device="cpu")
    configs = [
        dle.ARCHITECTURES["top_k"].trainer_config(k=16, warmup_steps=10, threshold_start_step=STEPS // 2, **common),
        dle.ARCHITECTURES["vsae_topk"].trainer_config(k=16, **common),
    ]
    run_dir = tmp_path_factory.mktemp("runs") / "topk_vs_vsae"
    trainSAE(batches(), configs, steps=STEPS, save_dir=str(run_dir), device="cpu")
    return model, run_dir


def test_all_five_evals_write_valid_results(trained, tmp_path):
    model, run_dir = trained
    cwd = os.getcwd()
    loader = HookedTransformer.__dict__["from_pretrained_no_processing"]
    torch.set_grad_enabled(True)
    out = tmp_path / "out"
    summary = run_evals(run_dir, EVALS, model=model, profile="quick", out=out)
    print(json.dumps({"model": summary["model"], "seconds": summary["seconds"]}, indent=1))

    # Global state restored (SCR/TPP turn grad off, absorption on; model loading was patched).
    assert torch.is_grad_enabled()
    assert os.getcwd() == cwd
    assert HookedTransformer.__dict__["from_pretrained_no_processing"] is loader
    # Nothing cached inside the installed sae_bench package.
    assert not (Path(sae_bench.__file__).parent / "artifacts").exists()

    assert summary["standins"] and set(summary["datasets_dropped"]["sparse_probing"]) == {
        "codeparrot/github-code", "Helsinki-NLP/europarl"}
    # The stand-ins live outside the evals' working directory, where no hub id can resolve to them.
    assert (out / standin_data.STANDIN_DIR / "LabHC" / "bias_in_bios" / "train.parquet").is_file()
    assert not [p for p in (out / "saebench_work").iterdir() if p.name in {"LabHC", "canrager", "fancyzhx", "Skylion007"}]
    assert summary["status"] == "complete" and summary["failures"] == {}
    assert set(summary["saes"]) == {"topk_vs_vsae_trainer_0", "topk_vs_vsae_trainer_1"}
    for name, per_eval in summary["saes"].items():
        assert set(per_eval) == set(EVALS)
        for eval_type, r in per_eval.items():
            print(name, eval_type, r["status"], r.get("metrics") or r.get("reason"))
            assert Path(r["file"]).is_file() and Path(r["file"]).parent == out / "eval_results" / eval_type
            # Every eval runs, absorption included: SAEBench's first-letter probe passes on the embedded model
            # (the not-evaluable path is tested on the stand-in model in test_real_world.py).
            assert r["status"] == "ok", (eval_type, r.get("reason"))
            assert validated(eval_type, Path(r["file"]))  # SAEBench's own validator accepts the file
            # SAEBench's own result file says it was computed on stand-ins (and which sets were dropped).
            recorded = json.loads(Path(r["file"]).read_text())["sae_cfg_dict"]["eval_datasets"]
            assert recorded["standins"] is True and "NOT the hub datasets" in recorded["source"]
            if eval_type == "sparse_probing":
                assert set(recorded["datasets_dropped"]) == {"codeparrot/github-code", "Helsinki-NLP/europarl"}
                assert len(recorded["datasets"]) == 3  # bias_in_bios, amazon reviews, ag_news
        core = per_eval["core"]["metrics"]
        assert 0.0 < core["explained_variance"] <= 1.0
        assert core["l0"] == pytest.approx(16.0)
        sp = per_eval["sparse_probing"]["metrics"]
        assert sp["llm_test_accuracy"] > 0.7  # the stand-in texts carry a learnable signal
        assert per_eval["scr"]["metrics"] and per_eval["tpp"]["metrics"]
        absorption = per_eval["absorption"]["metrics"]
        assert 0.0 <= absorption["mean_absorption_fraction_score"] <= 1.0
        assert 0.0 <= absorption["mean_full_absorption_score"] <= 1.0
    assert json.loads((out / "eval_results" / "summary.json").read_text())["saes"] == summary["saes"]


def test_core_failure_is_an_error_with_the_message(trained, tmp_path, monkeypatch):
    """SAEBench's core eval catches every exception and returns []: it must surface here."""
    import sae_bench.evals.core.main as core

    model, run_dir = trained

    def broken(**kwargs):
        raise RuntimeError("reconstruction blew up")

    monkeypatch.setattr(core, "run_evals", broken)
    with pytest.raises(EvalError, match="reconstruction blew up"):
        run_evals(run_dir / "trainer_1", ["core"], model=model, profile="quick", out=tmp_path)


def test_bad_input(trained, tmp_path):
    model, run_dir = trained
    with pytest.raises(FileNotFoundError):
        run_evals(tmp_path / "missing", ["core"], model=model, out=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer folders"):
        run_evals(tmp_path / "empty", ["core"], model=model, out=tmp_path / "o")
    with pytest.raises(ValueError, match="unknown evals"):
        run_evals(run_dir, ["autointerp"], model=model, out=tmp_path / "o")
    with pytest.raises(ValueError, match="unknown preset"):
        run_evals(run_dir, ["core"], model=model, profile="medium", out=tmp_path / "o")
    other = standin_model(d_model=16)  # a model the SAEs were not trained on
    with pytest.raises(ValueError, match="trained on"):
        run_evals(run_dir, ["core"], model=other, out=tmp_path / "o")


def test_absorption_gives_the_same_numbers_in_two_processes(trained, tmp_path):
    """SAEBench's absorption draws from unseeded global generators and lists the vocabulary in the tokenizer's
    hash-map order (which changes between processes); the adapter seeds and sorts, so two runs agree."""
    import subprocess
    import sys

    _, run_dir = trained
    code = ("import json, sys; from saebench_adapters.run_evals import run_evals; "
            "s = run_evals(sys.argv[1], ['absorption'], model='default', profile='quick', out=sys.argv[2]); "
            "print(json.dumps({n: v['absorption']['metrics'] for n, v in s['saes'].items()}, sort_keys=True))")
    outs = []
    for i in range(2):
        done = subprocess.run([sys.executable, "-c", code, str(run_dir), str(tmp_path / f"out{i}")],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] and len(outs[0]) == 2
    assert all(m and "mean_absorption_fraction_score" in m for m in outs[0].values())
