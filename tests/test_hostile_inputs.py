"""Hostile inputs at every edge: CLI arguments, --resume targets, text sources, weight files,
training checkpoints, activations and losses. Each case asserts the error type, that the message
names the problem (and the fix where there is one), and that nothing half-written is left."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from dictionary_learning_ext import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    VSAETopKTrainer,
    VSAETrainer,
    load_dictionary,
)
from dictionary_learning_ext.io import save_torch
from experiments import train
from experiments.lm import corpus
from experiments.training import run_folder
from experiments.training.data import BufferStream
from experiments.training.loop import (
    CHECKPOINT_DIR,
    LoopOptions,
    build_trainers,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    set_trainer_state,
)
from experiments.training.loop import train as train_loop
from test_resume import D, STEPS, SyntheticStream, assert_same, configs, weights

SMALL = ["--architectures", "top_k", "--dict-size", "64", "--k", "8", "--steps", "12", "--batch-size", "32",
         "--n-ctxs", "8", "--ctx-len", "16", "--refresh-batch-size", "8", "--eval-batches", "1"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = train.main(list(argv))
    return code, capsys.readouterr().err


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- CLI arguments: exit code 2, a message naming the option, nothing written ---------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--checkpoint-every", "0"], r"--checkpoint-every must be a positive number of steps, got 0"),
        (["--lr", "nan"], r"--lr must be a positive finite number, got nan"),
        (["--set", "activation_dim=300"], r"activation_dim is set by the model's width at --layer; use that"),
        (["--set", "top_k.k=9"], r"k is set by --k"),
        (["--text", "pile"], r"unknown text source 'pile'; accepted forms: .*hf:<dataset>"),
        (["--seed", "-1"], r"--seed must be >= 0"),
    ],
)
def test_bad_cli_values(tmp_path, capsys, extra, message):
    code, err = cli(capsys, *SMALL, *extra, "--save-dir", str(tmp_path / "run"))
    assert code == 2
    assert re.search(message, err), err
    assert files_under(tmp_path) == []


def test_missing_architectures_names_the_alternative(tmp_path, capsys):
    code, err = cli(capsys, "--save-dir", str(tmp_path / "run"))
    assert code == 2 and "--architectures is required (or --resume SAVE_DIR" in err
    assert files_under(tmp_path) == []


def test_save_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    code, err = cli(capsys, *SMALL, "--save-dir", str(tmp_path / "run"), "--overwrite")
    assert code == 2 and "is a file, not a folder" in err
    assert (tmp_path / "run").read_text() == "not a folder"


def test_unknown_autocast_dtype_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args([*SMALL, "--autocast-dtype", "float8", "--save-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


# --- --resume targets ------------------------------------------------------------------------------
def fake_interrupted(tmp_path: Path, with_checkpoint: bool = True) -> Path:
    """The staging folder a killed run leaves (its checkpoint is not read by the checks below)."""
    save_dir = tmp_path / "run"
    staging = run_folder.staging_dir(save_dir)
    staging.mkdir()
    config = train.parse_args([*SMALL, "--save-dir", str(save_dir), "--checkpoint-every", "5"]).config
    (staging / run_folder.RUN_STATE).write_text(json.dumps(run_folder.new_run_state(config, [])))
    if with_checkpoint:
        (staging / CHECKPOINT_DIR).mkdir()
        checkpoint_path(staging, 5).write_bytes(b"checkpoint")
    return save_dir


def fake_finished(tmp_path: Path, with_args: bool = True) -> Path:
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    config = train.parse_args([*SMALL, "--save-dir", str(save_dir)]).config.to_dict()
    (save_dir / "run.json").write_text(json.dumps({"config": config} if with_args else {"steps": 12}))
    (save_dir / "metrics.json").write_text(json.dumps([{"trainer": "trainer_0", "l0": 8.0}]))
    return save_dir


def test_resume_of_a_missing_run(tmp_path, capsys):
    code, err = cli(capsys, "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "no such run" in err and "start it without --resume" in err
    assert files_under(tmp_path) == []


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpg")
    code, err = cli(capsys, "--resume", str(tmp_path / "photos"))
    assert code == 2 and "is not a training run" in err
    assert files_under(tmp_path) == ["photos", "photos/cat.jpg"]


def test_resume_with_overwrite(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path)
    before = files_under(tmp_path)
    code, err = cli(capsys, "--resume", str(save_dir), "--overwrite")
    assert code == 2 and "pass only one of them" in err
    assert files_under(tmp_path) == before


def test_resume_with_conflicting_arguments(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path)
    before = files_under(tmp_path)
    code, err = cli(capsys, "--resume", str(save_dir), "--steps", "99", "--k", "8", "--checkpoint-every", "3")
    assert code == 2
    # --k 8 equals the stored value and --checkpoint-every may change: only --steps conflicts.
    assert "--steps 99 (the run has 12)" in err and "--k" not in err.split("A resumed run")[0]
    assert "drop the conflicting options, or start a new run" in err
    assert files_under(tmp_path) == before


def test_resume_of_a_run_without_checkpoint(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path, with_checkpoint=False)
    before = files_under(tmp_path)
    code, err = cli(capsys, "--resume", str(save_dir))
    assert code == 2 and "has no checkpoint" in err and "start it again without --resume" in err
    assert files_under(tmp_path) == before


def test_resume_with_damaged_run_state(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path)
    (run_folder.staging_dir(save_dir) / run_folder.RUN_STATE).write_text('{"format": "vsae-run-st')
    code, err = cli(capsys, "--resume", str(save_dir))
    assert code == 2 and "is not valid JSON" in err and "edited or damaged" in err


def test_resume_while_another_process_trains_it(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path)
    lock = run_folder.staging_dir(save_dir) / run_folder.LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the running process holds
    try:
        code, err = cli(capsys, "--resume", str(save_dir))
    finally:
        os.close(fd)
    assert code == 2 and "another process is training into" in err
    assert checkpoint_path(run_folder.staging_dir(save_dir), 5).read_bytes() == b"checkpoint"


def test_fresh_run_over_an_interrupted_one_keeps_its_checkpoints(tmp_path, capsys):
    save_dir = fake_interrupted(tmp_path)
    before = files_under(tmp_path)
    code, err = cli(capsys, *SMALL, "--save-dir", str(save_dir))
    assert code == 2 and "has an interrupted run with checkpoints" in err
    assert f"--resume {save_dir}" in err and "--overwrite to discard it" in err
    assert set(before) <= set(files_under(tmp_path))  # only the lock file may be new


def test_resume_of_a_finished_run_skips_it(tmp_path, capsys):
    save_dir = fake_finished(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in save_dir.iterdir()}
    rows = train.run(train.parse_args(["--resume", str(save_dir), "--eval-batches", "3"]))
    assert rows == [{"trainer": "trainer_0", "l0": 8.0}]
    assert "already finished; nothing to resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in save_dir.iterdir()} == before


def test_resume_of_a_finished_run_with_conflicting_arguments(tmp_path, capsys):
    save_dir = fake_finished(tmp_path)
    code, err = cli(capsys, "--resume", str(save_dir), "--architectures", "vsae_topk")
    assert code == 2 and "--architectures ['vsae_topk'] (the run has ['top_k'])" in err


def test_resume_of_a_run_from_an_older_version(tmp_path, capsys):
    save_dir = fake_finished(tmp_path, with_args=False)
    code, err = cli(capsys, "--resume", str(save_dir))
    assert code == 2 and "has no stored arguments" in err and "Start a new run" in err


# --- text sources ------------------------------------------------------------------------------------
def test_hf_text_source_with_a_missing_column(tmp_path, capsys):
    data = tmp_path / "ds"
    (data / "data").mkdir(parents=True)
    pd.DataFrame({"text": ["a b c"] * 4, "tokens": [[1, 2]] * 4}).to_parquet(data / "data" / "train-0.parquet")
    out = tmp_path / "out"
    out.mkdir()
    code, err = cli(capsys, *SMALL, "--text", f"hf:{data}:body", "--save-dir", str(out / "run"))
    assert code == 2
    assert "has no column 'body'; columns: ['text', 'tokens']" in err and f"--text hf:{data}:<column>" in err
    assert files_under(out) == []  # the staging folder of the failed run is gone


def test_hf_text_source_that_is_empty(tmp_path):
    data = tmp_path / "ds"
    (data / "data").mkdir(parents=True)
    (data / "data" / "train.jsonl").write_text("")
    with pytest.raises(corpus.EmptySourceError, match="yields no rows"):
        corpus.text_source(f"hf:{data}")


# --- weight files (load_dictionary) -------------------------------------------------------------------
@pytest.fixture
def trainer_dir(tmp_path) -> Path:
    trainer = VSAETopKTrainer(activation_dim=D, dict_size=64, k=4, steps=10, layer=0, lm_name="x", device="cpu", seed=0)
    folder = tmp_path / "trainer_0"
    save_torch(trainer.ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}))
    return folder


def test_truncated_weights(trainer_dir):
    data = (trainer_dir / "ae.pt").read_bytes()
    (trainer_dir / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"weights file .*ae.pt is truncated or not a torch file.*retrain"):
        load_dictionary(trainer_dir)


def test_weights_that_are_not_a_torch_file(trainer_dir):
    (trainer_dir / "ae.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_dictionary(trainer_dir)


def test_weights_that_do_not_match_the_config(trainer_dir):
    config = json.loads((trainer_dir / "config.json").read_text())
    config["trainer"]["dict_size"] = 128
    (trainer_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*encoder.weight: checkpoint \(64, 16\) vs config \(128, 16\)"):
        load_dictionary(trainer_dir)


def test_weights_with_a_missing_key(trainer_dir):
    state = torch.load(trainer_dir / "ae.pt", weights_only=True)
    del state["b_dec"]
    save_torch(state, trainer_dir / "ae.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['b_dec'\]"):
        load_dictionary(trainer_dir)


def test_config_with_the_wrong_dictionary_class(trainer_dir):
    config = json.loads((trainer_dir / "config.json").read_text())
    config["trainer"]["dict_class"] = "AutoEncoderTopK"
    (trainer_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config says dict_class='AutoEncoderTopK' but VSAETopKTrainer trains VSAETopK"):
        load_dictionary(trainer_dir)


# --- training checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def checkpointed(tmp_path) -> Path:
    save_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(SyntheticStream(fail_at=7), configs("vsae_topk"), save_dir, LoopOptions(steps=STEPS, checkpoint_every=5))
    return save_dir


def test_truncated_training_checkpoint(checkpointed):
    path = latest_checkpoint(checkpointed)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000005.pt is truncated"):
        train_loop(SyntheticStream(), configs("vsae_topk"), checkpointed, LoopOptions(steps=STEPS), resume=True)


def test_checkpoint_of_a_different_configuration(checkpointed):
    with pytest.raises(CheckpointError, match=r"trainer_0's config differs from the checkpoint's in \['lr'\]"):
        train_loop(SyntheticStream(), configs("vsae_topk", lr=5e-3), checkpointed, LoopOptions(steps=STEPS), resume=True)


def test_checkpoint_of_another_trainer(checkpointed):
    state = load_checkpoint(latest_checkpoint(checkpointed), build_trainers(configs("vsae_topk")))
    top_k = build_trainers(configs("top_k"))[0]
    with pytest.raises(CheckpointError, match="holds the state of a 'VSAETopKTrainer', not of a TopKTrainer"):
        set_trainer_state(top_k, state["trainers"][0])  # dictionary_learning's trainer: restored generically


def test_trainer_state_with_missing_entries(checkpointed):
    state = load_checkpoint(latest_checkpoint(checkpointed), build_trainers(configs("vsae_topk")))
    trainer_state = state["trainers"][0]
    del trainer_state["objects"]["activity"]
    trainer = build_trainers(configs("vsae_topk"))[0]
    with pytest.raises(CheckpointError, match=r"missing \['activity'\], unexpected \[\]"):
        trainer.load_state_dict(trainer_state)


def test_resume_without_any_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint under .*nothing to resume from"):
        train_loop(SyntheticStream(), configs("top_k"), tmp_path / "run", LoopOptions(steps=STEPS), resume=True)


def test_loop_options_are_validated():
    with pytest.raises(ConfigError, match="checkpoint_every must be a positive int or None, got 0"):
        LoopOptions(steps=10, checkpoint_every=0)
    with pytest.raises(ConfigError, match="log_steps must be set when logging"):
        LoopOptions(steps=10, verbose=True)


def test_trainer_config_is_validated():
    with pytest.raises(ConfigError, match=r"VSAETopKConfig.beta=-1.0 must be >= 0.0"):
        configs("vsae_topk", beta=-1.0)


# --- activations and losses ----------------------------------------------------------------------------
class Poisoned(SyntheticStream):
    """Inserts ``batch(n)`` as extra draws at positions ``at`` without disturbing the clean stream."""

    def __init__(self, at: set[int], batch, **kw):
        super().__init__(**kw)
        self.at, self.batch, self.calls = at, batch, 0

    def __next__(self):
        self.calls += 1
        if self.calls - 1 in self.at:
            return self.batch(self.calls - 1)
        return super().__next__()


def nan_batch(_: int) -> torch.Tensor:
    x = torch.ones(32, D)
    x[3, 5] = float("nan")
    return x


def test_nonfinite_activations_stop_training(tmp_path):
    with pytest.raises(NonFiniteError, match=r"activation batch at step 7 contains NaN/Inf in 1 of 32 rows"):
        train_loop(Poisoned({7}, nan_batch), configs("top_k"), tmp_path / "run", LoopOptions(steps=STEPS))
    assert not (tmp_path / "run" / "trainer_0" / "ae.pt").exists()


@pytest.mark.parametrize("name", ["vsae_topk", "top_k"])
def test_skipped_nonfinite_batches_are_counted_and_change_nothing_else(tmp_path, name):
    result = train_loop(Poisoned({7, 8, 20}, nan_batch), configs(name), tmp_path / "skip",
                        LoopOptions(steps=STEPS, skip_nonfinite=True))
    assert result.skipped_batches == 3 and result.skipped_at_steps == [7, 7, 18]
    train_loop(SyntheticStream(), configs(name), tmp_path / "clean", LoopOptions(steps=STEPS))
    assert_same(weights(tmp_path / "clean"), weights(tmp_path / "skip"))


def test_a_stream_of_only_nonfinite_batches_stops(tmp_path):
    with pytest.raises(NonFiniteError, match="4 activation batches in a row contained NaN/Inf"):
        train_loop(Poisoned(set(range(5, 100)), nan_batch), configs("top_k"), tmp_path / "run",
                   LoopOptions(steps=STEPS, skip_nonfinite=True, max_consecutive_skips=3))


def test_activation_width_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"has shape \(32, 17\); expected \(batch, 16\).*activation_dim matches"):
        train_loop(Poisoned({0}, lambda _: torch.ones(32, 17)), configs("vsae_topk"), tmp_path / "run",
                   LoopOptions(steps=STEPS))


@pytest.mark.parametrize("name,message", [
    ("vsae_topk", r"VSAETopKTrainer: loss became inf at step 12"),  # ours: caught before the step
    ("top_k", r"trainer_0 \(TopKTrainer\): loss became (inf|nan) at step 12"),  # theirs: caught after it
])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, name, message):
    huge = lambda _: torch.full((32, D), 1e30)  # finite activations whose squared error overflows float32
    save_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=message):
        train_loop(Poisoned({12}, huge), configs(name), save_dir, LoopOptions(steps=STEPS, checkpoint_every=5))
    assert not (save_dir / "trainer_0" / "ae.pt").exists()
    path = latest_checkpoint(save_dir)
    assert path.name == "step_00000010.pt"
    state = load_checkpoint(path, build_trainers(configs(name)))
    ae_state = state["trainers"][0]["objects"]["ae"]
    assert all(torch.isfinite(v).all() for v in ae_state.values() if v.is_floating_point())


def test_cli_reports_skipped_batches_in_run_json(tmp_path, capsys, monkeypatch):
    real_next = BufferStream.__next__
    draws = []

    def poisoned_next(self):
        x = real_next(self)
        draws.append(1)
        return torch.full_like(x, float("inf")) if len(draws) == 4 else x

    monkeypatch.setattr(BufferStream, "__next__", poisoned_next)
    save_dir = tmp_path / "run"
    code, err = cli(capsys, *SMALL, "--save-dir", str(save_dir), "--skip-nonfinite-batches")
    assert code == 0, err
    run = json.loads((save_dir / "run.json").read_text())
    assert run["skipped_nonfinite_batches"] == 1 and run["skipped_at_steps"] == [3]
    assert json.loads((save_dir / "metrics.json").read_text())[0]["skipped_nonfinite_batches"] == 1

    monkeypatch.setattr(BufferStream, "__next__", poisoned_next)
    draws.clear()
    code, err = cli(capsys, *SMALL, "--save-dir", str(tmp_path / "strict"))
    assert code == 1 and "activation batch at step 3 contains NaN/Inf in 32 of 32 rows" in err
    assert not (tmp_path / "strict").exists() and not run_folder.staging_dir(tmp_path / "strict").exists()

    # With checkpoints, the failure keeps the last good one and says how to continue.
    draws.clear()
    save_dir = tmp_path / "checkpointed"
    code, err = cli(capsys, *SMALL, "--save-dir", str(save_dir), "--checkpoint-every", "2")
    assert code == 1 and "step 3 contains NaN/Inf" in err
    assert f"last good checkpoint is kept in {run_folder.staging_dir(save_dir)}" in err
    assert f"python -m experiments.train --resume {save_dir}" in err
    assert latest_checkpoint(run_folder.staging_dir(save_dir)).name == "step_00000002.pt"
    code, err = cli(capsys, "--resume", str(save_dir))  # the poisoned draw is behind us now
    assert code == 0, err
    assert json.loads((save_dir / "run.json").read_text())["resumed_from_steps"] == [2]


# --- float32 losses under bf16 autocast --------------------------------------------------------------
@pytest.mark.parametrize("trainer_class,extra", [(VSAETopKTrainer, {"k": 8}), (VSAETrainer, {})])
def test_losses_are_float32_under_bf16_autocast(trainer_class, extra, sparse_data):
    trainer = trainer_class(activation_dim=32, dict_size=128, steps=10, layer=0, lm_name="x", device="cpu", seed=0,
                            **extra)
    x = sparse_data(64) * 30  # large activations: bf16 (8 bits of mantissa) would lose the residual
    state = trainer.generator.get_state()
    loss32, _, _, terms32 = trainer.compute_loss(x, step=5)
    trainer.generator.set_state(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, x_hat16, _, terms16 = trainer.compute_loss(x.bfloat16(), step=5)
    assert not torch.equal(loss16, loss32)  # autocast really changed the matmuls
    assert loss16.dtype == torch.float32
    for name in ("l2_loss", "kl_loss"):
        assert terms16[name].dtype == torch.float32, name
        # Same value up to the bf16 rounding of the input and the matmuls.
        torch.testing.assert_close(terms16[name], terms32[name], rtol=3e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["vsae_topk", "top_k"])
def test_bf16_autocast_training_on_cpu(tmp_path, name):
    # trainSAE casts activations to bfloat16 but autocasts only on CUDA, which fails on CPU; the loop autocasts.
    train_loop(SyntheticStream(), configs(name), tmp_path / "bf16", LoopOptions(steps=STEPS, autocast_dtype=torch.bfloat16))
    train_loop(SyntheticStream(), configs(name), tmp_path / "fp32", LoopOptions(steps=STEPS))
    bf16, fp32 = weights(tmp_path / "bf16"), weights(tmp_path / "fp32")
    assert all(v.dtype == fp32[k].dtype and torch.isfinite(v).all() for k, v in bf16.items())
    assert not torch.equal(bf16["encoder.weight"], fp32["encoder.weight"])
    torch.testing.assert_close(bf16["b_dec"], fp32["b_dec"], rtol=0.05, atol=0.05)


# --- SAEBench stand-in datasets ------------------------------------------------------------------
def test_standin_dataset_with_a_missing_column(tmp_path, capsys):
    from saebench_adapters import standin_data

    standin_data.generate(tmp_path, train_size=8, test_size=8, core_tokens=1000)
    path = tmp_path / "fancyzhx/ag_news/train.parquet"
    pd.read_parquet(path).drop(columns=["label"]).to_parquet(path)
    with pytest.raises(standin_data.StandinError, match=r"lacks column\(s\) \['label'\].*run generate\(\) again"):
        standin_data.load_frame(tmp_path, "fancyzhx/ag_news")
    # generate() would have reused the damaged cache (its manifest still matches); it rebuilds it.
    standin_data.generate(tmp_path, train_size=8, test_size=8, core_tokens=1000)
    err = capsys.readouterr().err
    assert "lacks column(s) ['label']" in err and "regenerating them" in err
    assert list(standin_data.load_frame(tmp_path, "fancyzhx/ag_news").columns) == ["text", "label"]
    assert standin_data.standin_problems(tmp_path) == []


def test_trainer_state_that_cannot_be_checkpointed_is_refused():
    trainer = build_trainers(configs("vsae_topk"))[0]
    trainer.running_means = {"l2": torch.zeros(3)}  # e.g. a new attribute a future trainer adds
    with pytest.raises(TypeError, match=r"cannot checkpoint VSAETopKTrainer.running_means \(dict\)"):
        trainer.state_dict()
