"""Resumable training: a SIGKILLed CLI run resumed with --resume ends with the same weights, bit for
bit, as an uninterrupted run; a crash while a checkpoint is written leaves the previous one loadable;
every registered architecture resumes exactly; logging has no effect on training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dictionary_learning_ext.io as atomic
from dictionary_learning_ext import ARCHITECTURES
from experiments.training.plan import fitted_step_defaults
from experiments.training.loop import (
    CHECKPOINT_DIR,
    LoopOptions,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    build_trainers,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--architectures", "vsae_topk", "top_k", "--dict-size", "256", "--k", "16", "--steps", "60",
    "--batch-size", "64", "--n-ctxs", "20", "--ctx-len", "32", "--refresh-batch-size", "10",
    "--eval-batches", "1", "--seed", "3",
]


def _env() -> dict[str, str]:
    # One thread: CPU float results are then identical across processes (no split reductions).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    baseline, killed = tmp_path / "baseline", tmp_path / "killed"
    # The baseline does not checkpoint at all, so this also shows checkpointing has no side effects.
    _finish(_cli(*SMALL_RUN, "--save-dir", str(baseline)))

    proc = _cli(*SMALL_RUN, "--save-dir", str(killed), "--checkpoint-every", "10")
    checkpoints = tmp_path / ".killed.partial" / CHECKPOINT_DIR
    deadline = time.time() + 120
    while not list(checkpoints.glob("step_*.pt")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists(), "the run finished before it was killed; the test proves nothing"
    step_at_kill = int(latest_checkpoint(tmp_path / ".killed.partial").stem.split("_")[1])
    assert 10 <= step_at_kill < 60

    # --resume reads every other argument from the run's stored state.
    _finish(_cli("--resume", str(killed)))
    assert not (tmp_path / ".killed.partial").exists()
    assert sorted(p.name for p in killed.iterdir()) == ["metrics.json", "run.json", "trainer_0", "trainer_1"]
    run = json.loads((killed / "run.json").read_text())
    assert run["resumed_from_steps"] == [step_at_kill]
    for i in range(2):
        want = torch.load(baseline / f"trainer_{i}" / "ae.pt", weights_only=True)
        got = torch.load(killed / f"trainer_{i}" / "ae.pt", weights_only=True)
        assert want.keys() == got.keys()
        for key in want:
            diff = (want[key].double() - got[key].double()).abs().max().item()
            assert torch.equal(want[key], got[key]), f"trainer_{i}.{key} differs after resume (max |diff| {diff:.3g})"
        assert json.loads((killed / f"trainer_{i}" / "config.json").read_text()) == \
            json.loads((baseline / f"trainer_{i}" / "config.json").read_text())
    # The evaluation reads the data stream after training too: same position, same metrics.
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((baseline / "metrics.json").read_text())


# --- in-process runs on synthetic activations ----------------------------------------------------
D, F, K, STEPS = 16, 64, 4, 30


class SyntheticStream:
    """Seeded activation batches with a saveable position; ``fail_at`` raises on that draw."""

    def __init__(self, seed: int = 0, fail_at: int | None = None):
        self.gen = torch.Generator().manual_seed(seed)
        self.atoms = torch.randn(F, D, generator=self.gen)
        self.drawn, self.fail_at = 0, fail_at

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.drawn == self.fail_at:
            raise RuntimeError("simulated crash")
        self.drawn += 1
        codes = torch.relu(torch.randn(32, F, generator=self.gen) - 1.5)
        return codes @ self.atoms + 0.1

    def state_dict(self):
        return {"gen": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.drawn = state["drawn"]


def configs(name: str, steps: int = STEPS, **extra):
    arch = ARCHITECTURES[name]
    values = dict(steps=steps, activation_dim=D, dict_size=F, layer=0, lm_name="synthetic", device="cpu", seed=1,
                  lr=1e-3, **fitted_step_defaults(arch, steps))
    values.update(extra)
    if "k" in arch.field_names:
        values["k"] = K
    return [arch.trainer_config(**values)]


def weights(save_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(save_dir / "trainer_0" / "ae.pt", weights_only=True)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# Every registered architecture, ours and dictionary_learning's.
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_resumes_exactly(tmp_path, name):
    train(SyntheticStream(), configs(name), tmp_path / "a", LoopOptions(steps=STEPS))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(SyntheticStream(fail_at=17), configs(name), tmp_path / "b", LoopOptions(steps=STEPS, checkpoint_every=10))
    assert latest_checkpoint(tmp_path / "b").name == "step_00000010.pt"
    assert not (tmp_path / "b" / "trainer_0" / "ae.pt").exists()
    result = train(SyntheticStream(), configs(name), tmp_path / "b", LoopOptions(steps=STEPS, checkpoint_every=10),
                   resume=True)
    assert result.resumed_from_step == 10
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.parametrize("name", ["vsae_topk", "top_k"])
def test_logging_does_not_change_training(tmp_path, name, capsys):
    # log_stats calls trainer.loss(), which advances noise generators and dead-latent counters.
    train(SyntheticStream(), configs(name), tmp_path / "quiet", LoopOptions(steps=STEPS))
    train(SyntheticStream(), configs(name), tmp_path / "verbose", LoopOptions(steps=STEPS, verbose=True, log_steps=3))
    assert "Step 27: L0" in capsys.readouterr().out
    assert_same(weights(tmp_path / "quiet"), weights(tmp_path / "verbose"))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save_dir = tmp_path / "run"
    real_save = torch.save
    writes = []

    def dying_save(obj, fh):
        writes.append(fh.name)
        if len(writes) == 2:  # the second checkpoint: half of it reaches the disk, then the disk is full
            real_save(obj, fh)
            fh.truncate(fh.tell() // 2)
            raise OSError(28, "No space left on device")
        real_save(obj, fh)

    monkeypatch.setattr(atomic.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        train(SyntheticStream(), configs("vsae_topk"), save_dir, LoopOptions(steps=STEPS, checkpoint_every=10))
    monkeypatch.setattr(atomic.torch, "save", real_save)

    folder = save_dir / CHECKPOINT_DIR
    assert [p.name for p in folder.iterdir()] == ["step_00000010.pt"]  # no temp file, no step 20
    trainers = build_trainers(configs("vsae_topk"))
    state = load_checkpoint(folder / "step_00000010.pt", trainers)
    assert state["step"] == 10
    trainers[0].load_state_dict(state["trainers"][0])

    # A writer killed mid-write (no cleanup possible) leaves only a temp file: never taken as a checkpoint.
    stale = folder / ".step_00000020.pt.abc123.tmp"
    stale.write_bytes((folder / "step_00000010.pt").read_bytes()[:1000])
    assert latest_checkpoint(save_dir) == folder / "step_00000010.pt"
    assert not stale.exists()

    train(SyntheticStream(), configs("vsae_topk"), save_dir, LoopOptions(steps=STEPS, checkpoint_every=10), resume=True)
    train(SyntheticStream(), configs("vsae_topk"), tmp_path / "clean", LoopOptions(steps=STEPS))
    assert_same(weights(tmp_path / "clean"), weights(save_dir))


def test_failed_final_write_never_leaves_a_loadable_partial_ae(tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, fh):
        if "format" not in obj:  # the final ae.pt (a plain state dict), not a checkpoint
            fh.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        real_save(obj, fh)

    monkeypatch.setattr(atomic.torch, "save", dying_save)
    with pytest.raises(OSError):
        train(SyntheticStream(), configs("top_k"), tmp_path / "run", LoopOptions(steps=12, checkpoint_every=5))
    assert sorted(p.name for p in (tmp_path / "run" / "trainer_0").iterdir()) == ["config.json"]
    assert latest_checkpoint(tmp_path / "run") == checkpoint_path(tmp_path / "run", 12)


@pytest.mark.parametrize("name", ["vsae_topk", "top_k"])
def test_resume_with_normalized_activations(tmp_path, name):
    # The norm factor is measured once (get_norm_factor reads 100+ batches) and stored in the
    # checkpoint; the resumed run must neither re-measure it nor read those batches again.
    options = dict(steps=STEPS, normalize_activations=True, norm_factor_batches=20)
    clean = train(SyntheticStream(), configs(name), tmp_path / "a", LoopOptions(**options))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(SyntheticStream(fail_at=22 + 13), configs(name), tmp_path / "b", LoopOptions(**options, checkpoint_every=10))
    resumed = train(SyntheticStream(), configs(name), tmp_path / "b", LoopOptions(**options, checkpoint_every=10),
                    resume=True)
    assert resumed.resumed_from_step == 10 and resumed.norm_factor == clean.norm_factor > 0
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    config = json.loads((tmp_path / "b" / "trainer_0" / "config.json").read_text())
    assert config["trainer"]["norm_factor"] == clean.norm_factor
