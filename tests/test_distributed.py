"""Data-parallel training (gloo on CPU, 2 processes): 2 ranks with global batch B give the weights of 1
process with batch B (fp32 rounding apart) and its exact dead-latent counters and norm factor, for every
architecture that can train data-parallel; a 2-rank run killed mid-way resumes to the same result; a rank
that dies, hangs, runs out of data or gets a short batch ends the run on every rank with a clear error.

The ranks are forked from the test process (nothing to import again), and join a process group on a free
local port; one test starts the real ``torchrun`` CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from dictionary_learning_ext import ARCHITECTURES
from dictionary_learning_ext.errors import UsageError
from experiments.training import distributed
from experiments.training.config import RunConfig
from experiments.training.loop import LoopOptions, build_trainers, latest_checkpoint, train
from experiments.training.plan import fitted_step_defaults
from experiments.training.run_folder import staging_dir

REPO = Path(__file__).resolve().parents[1]
D, F, K, B, STEPS = 16, 64, 4, 64, 30
NAN_AT = 12  # the draw whose last row is NaN: it lands in rank 1's slice only
NORM_DRAWS = 7  # get_norm_factor(steps=5) reads 7 batches


class Stream:
    """Seeded global batches of B rows with a saveable position; ``fail_at``: raise on that draw;
    ``short_at``: that draw is one row short; ``end_at``: the stream ends there; ``nan_at``: NaN in its last row."""

    def __init__(self, seed: int = 0, fail_at=None, short_at=None, end_at=None, nan_at=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.atoms = torch.randn(F, D, generator=self.gen)
        self.drawn, self.fail_at, self.short_at, self.end_at, self.nan_at = 0, fail_at, short_at, end_at, nan_at

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.drawn == self.fail_at:
            raise RuntimeError("simulated crash")
        if self.drawn == self.end_at:
            raise StopIteration
        codes = torch.relu(torch.randn(B, F, generator=self.gen) - 1.5)
        x = codes @ self.atoms + 0.1
        if self.drawn == self.nan_at:
            x[-1, 0] = float("nan")
        if self.drawn == self.short_at:
            x = x[:-1]
        self.drawn += 1
        return x

    def state_dict(self):
        return {"gen": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.drawn = state["drawn"]


# Each case switches on what reads the whole batch: auxK on dead latents (a window of 3 batches), the
# TopK threshold, VSAETopK's noise (on the selection or the sample), free bits and resampling.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "top_k": ("top_k", dict(threshold_start_step=5, dead_window_tokens=3 * B, auxk_alpha=0.5)),
    "vsae_topk": ("vsae_topk", dict(dead_window_tokens=3 * B)),
    "vsae_topk_sample_freebits_resample": ("vsae_topk", dict(select_on="sample", free_bits=0.05, resample_steps=7,
                                                             dead_window_tokens=3 * B)),
    "mp_sae": ("mp_sae", {}),
    "vsae": ("vsae", {}),
    "standard": ("standard", {}),
}


def configs(case: str, steps: int = STEPS):
    name, extra = CASES[case]
    arch = ARCHITECTURES[name]
    values = dict(steps=steps, activation_dim=D, dict_size=F, layer=0, lm_name="synthetic", device="cpu", seed=1,
                  lr=1e-3, **fitted_step_defaults(arch, steps))
    if "k" in arch.field_names:
        values["k"] = K
    values.update(extra)
    return [arch.trainer_config(**values)]


def options(**extra) -> LoopOptions:
    return LoopOptions(steps=STEPS, normalize_activations=True, norm_factor_batches=5, skip_nonfinite=True, **extra)


def counters(trainer) -> list[int]:
    tracker = getattr(trainer, "activity", None)
    if tracker is not None:
        return tracker.tokens_since_fired.tolist()
    return getattr(trainer, "num_tokens_since_fired", torch.zeros(0)).tolist()


def summary(result) -> dict[str, Any]:
    return {"norm_factor": result.norm_factor, "skipped": result.skipped_at_steps,
            "counters": counters(result.trainers[0]), "steps": result.steps}


def weights(save_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(save_dir) / "trainer_0" / "ae.pt", weights_only=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- running ranks -------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, timeout_s: float, fn: Callable, queue, env: bool) -> None:
    torch.set_num_threads(1)
    try:
        if env:  # as torchrun starts a rank: the run finds its process group in the environment
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
            report = (rank, "ok", fn(rank))
        else:
            group = distributed.init(rank, world, "cpu", timeout_s, init_method=f"tcp://127.0.0.1:{port}")
            report = (rank, "ok", fn(group))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        report = (rank, "error", f"{type(err).__name__}: {err}", traceback.format_exc())
    if dist.is_initialized():
        dist.destroy_process_group()
    queue.put(report)
    queue.close()
    queue.join_thread()
    os._exit(0)  # no interpreter shutdown in a forked copy of the test process


def run_ranks(fn: Callable, world: int = 2, timeout_s: float = 30, wait_s: float = 120, env: bool = False,
              kill_when: Callable[[], bool] | None = None, need: tuple[int, ...] | None = None) -> dict[int, tuple]:
    """``fn(group)`` (or ``fn(rank)`` with ``env``: the rank finds its group in the environment) on ``world``
    forked ranks; returns each rank's ("ok", result) or ("error", message, traceback). A rank that neither
    reports nor exits within ``wait_s`` is killed (its entry is missing), as is every rank once the ranks
    ``need`` reported. ``kill_when``: SIGKILL every rank once it returns True."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, timeout_s, fn, queue, env)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.time() + wait_s
    try:
        while len(results) < world and time.time() < deadline:
            if need is not None and set(need) <= set(results):
                break
            if kill_when is not None and kill_when():
                for p in procs:
                    os.kill(p.pid, signal.SIGKILL)
                break
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            try:
                item = queue.get(timeout=0.02)
                results[item[0]] = item[1:]
            except Exception:  # queue.Empty
                pass
    finally:
        for p in procs:
            p.join(timeout=1)  # a rank that has not exited by now is waiting for a rank that never comes
            if p.is_alive():
                p.kill()
                p.join()
    return results


def ok(results: dict[int, tuple], world: int = 2) -> list[Any]:
    for rank in range(world):
        assert rank in results, f"rank {rank} did not report"
        assert results[rank][0] == "ok", results[rank][-1]
    return [results[r][1] for r in range(world)]


# --- 2 ranks = 1 process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    single = {case: summary(train(Stream(nan_at=NAN_AT), configs(case), root / f"one_{case}", options()))
              for case in CASES}

    def two_ranks(group):
        return {case: summary(train(Stream(nan_at=NAN_AT), configs(case), root / f"two_{case}",
                                    options(distributed=group))) for case in CASES}

    ranks = ok(run_ranks(two_ranks))
    return root, single, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_the_weights_of_one_process(both, case):
    root, single, ranks = both
    one, two = weights(root / f"one_{case}"), weights(root / f"two_{case}")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{case}.{key}: {m}")
    for rank in range(2):
        got = ranks[rank][case]
        # Statistics of whole batches are the 1-process ones exactly: the norm factor (from gathered batches),
        # the step skipped for a NaN that only rank 1 saw, and the dead-latent counters.
        assert got["norm_factor"] == single[case]["norm_factor"]
        assert got["skipped"] == single[case]["skipped"] == [NAN_AT - NORM_DRAWS]
        assert got["counters"] == single[case]["counters"]
    if case in ("top_k", "vsae_topk"):
        assert max(single[case]["counters"]) > 0  # the counters moved (auxK's window is 3 batches)


def test_killed_two_rank_run_resumes_to_the_same_weights(tmp_path):
    crash = NORM_DRAWS + 17  # rank 1 dies at step 17; the last checkpoint is step 10

    def uninterrupted(group):
        return summary(train(Stream(), configs("vsae_topk"), tmp_path / "a", options(distributed=group, checkpoint_every=10)))

    def crashing(group):
        stream = Stream(fail_at=crash if group.rank == 1 else None)
        return summary(train(stream, configs("vsae_topk"), tmp_path / "b", options(distributed=group, checkpoint_every=10)))

    def resumed(group):
        return summary(train(Stream(), configs("vsae_topk"), tmp_path / "b", options(distributed=group, checkpoint_every=10),
                             resume=True))

    ok(run_ranks(uninterrupted))
    results = run_ranks(crashing, timeout_s=20)
    assert results[1][0] == "error" and "simulated crash" in results[1][1]
    assert results[0][0] == "error" and results[0][1].startswith("DistributedError: rank 0 of 2:"), results[0]
    assert latest_checkpoint(tmp_path / "b").name == "step_00000010.pt"
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    ok(run_ranks(resumed))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), "2 ranks resumed differ from 2 ranks uninterrupted"
    # The checkpoint holds the global state: it resumes on one process too.
    train(Stream(), configs("vsae_topk"), tmp_path / "c", options(checkpoint_every=10), resume=True)
    c = weights(tmp_path / "c")
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-5)


# --- failures end every rank with a clear error ---------------------------------------------------------
def _train_with(tmp_path, on_step=None, stream_for=lambda rank: Stream()):
    def fn(group):
        opts = options(distributed=group, on_step=(lambda step: on_step(group.rank, step)) if on_step else None)
        return summary(train(stream_for(group.rank), configs("top_k"), tmp_path / "run", opts))
    return fn


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    def die(rank, step):
        if rank == 1 and step == 5:
            os._exit(1)  # no exception, no clean-up: as a SIGKILL or an out-of-memory kill

    started = time.time()
    results = run_ranks(_train_with(tmp_path, on_step=die), timeout_s=60)
    assert 1 not in results
    assert results[0][0] == "error", results
    assert results[0][1].startswith("DistributedError: rank 0 of 2:") and "Another rank died, hung" in results[0][1]
    assert time.time() - started < 30  # well before the 60 s time-out: the dead peer is noticed at once


def test_a_rank_that_hangs_times_out(tmp_path):
    def hang(rank, step):
        if rank == 1 and step == 5:
            time.sleep(60)

    started = time.time()
    results = run_ranks(_train_with(tmp_path, on_step=hang), timeout_s=2, wait_s=20, need=(0,))
    assert results[0][0] == "error" and "within --collective-timeout 2 s" in results[0][1], results
    assert time.time() - started < 15  # the 2 s time-out, not the 60 s hang


@pytest.mark.parametrize("stream_for,message", [
    (lambda rank: Stream(short_at=NORM_DRAWS + 4 if rank == 1 else None),
     r"uneven batches at step 4: the ranks hold between 31 and 32 rows, expected 32 each"),
    (lambda rank: Stream(end_at=NORM_DRAWS + 4 if rank == 1 else None),
     r"the activation source of a rank ended at step 4"),
])
def test_uneven_or_ended_data_stops_every_rank(tmp_path, stream_for, message):
    import re

    results = run_ranks(_train_with(tmp_path, stream_for=stream_for), timeout_s=20)
    for rank in range(2):
        assert results[rank][0] == "error" and re.search(message, results[rank][1]), results[rank]


def test_what_cannot_train_data_parallel_is_refused():
    arch = ARCHITECTURES["batch_top_k"]
    with pytest.raises(UsageError, match=r"BatchTopKTrainer\) cannot train data-parallel"):
        distributed.check_supported(build_trainers([arch.trainer_config(
            steps=10, activation_dim=D, dict_size=F, k=K, layer=0, lm_name="synthetic", device="cpu",
            **fitted_step_defaults(arch, 10))]))
    odd = distributed.RankSlice(Stream(), SimpleNamespace(rank=0, world=3))
    next(odd)
    with pytest.raises(UsageError, match="64 rows does not split evenly over 3 ranks"):
        odd.expected_rows()
    with pytest.raises(UsageError, match="under torchrun give --device cuda"):
        distributed.init(0, 2, device="cuda:1")


# --- whole runs: the run folder, the cache, torchrun ------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    from experiments.training.cache import CacheOptions, write_cache

    out = tmp_path_factory.mktemp("dpcache") / "acts"
    write_cache(RunConfig(ctx_len=32, refresh_batch_size=10), CacheOptions(out=str(out), tokens=3000, shard_tokens=1000))
    return out


RUN = dict(architectures=("top_k", "vsae_topk", "mp_sae"), dict_size=128, ks=(8,), steps=40, batch_size=64,
           eval_batches=1, ctx_len=32, refresh_batch_size=10, seed=3, normalize_activations=True)


def test_killed_two_rank_run_on_a_cache_resumes(tmp_path, cache_dir):
    from experiments.training.run import resume_run, train_run

    config = RunConfig(**RUN, activations=str(cache_dir), checkpoint_every=10, save_dir=str(tmp_path / "killed"))
    slow = lambda step: time.sleep(0.05)  # noqa: E731 - time to be killed mid-run; no effect on the weights
    staging = staging_dir(tmp_path / "killed")
    results = run_ranks(lambda rank: train_run(config, on_step=slow, data_parallel=True), env=True,
                        kill_when=lambda: any((staging / "checkpoints").glob("step_*.pt")))
    assert all(r[0] == "error" for r in results.values()) and not (tmp_path / "killed").exists(), \
        "the run finished before it was killed"
    ok(run_ranks(lambda rank: resume_run(tmp_path / "killed", data_parallel=True), env=True))
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert run["world_size"] == 2 and len(run["resumed_from_steps"]) == 1
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == \
        ["metrics.json", "run.json", "trainer_0", "trainer_1", "trainer_2"]
    ok(run_ranks(lambda rank: train_run(config.replace(save_dir=str(tmp_path / "whole")), data_parallel=True),
                  env=True))
    train_run(config.replace(save_dir=str(tmp_path / "single"), checkpoint_every=None))
    for i in range(3):
        killed, whole = (torch.load(tmp_path / d / f"trainer_{i}" / "ae.pt") for d in ("killed", "whole"))
        single = torch.load(tmp_path / "single" / f"trainer_{i}" / "ae.pt")
        for key in killed:
            assert torch.equal(killed[key], whole[key]), f"trainer_{i}.{key}: resumed differs from uninterrupted"
            torch.testing.assert_close(killed[key], single[key], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())


def test_a_run_rank_0_refuses_is_refused_on_every_rank(tmp_path, cache_dir):
    from experiments.training.run import train_run

    (tmp_path / "exists").mkdir()
    config = RunConfig(**RUN, activations=str(cache_dir), save_dir=str(tmp_path / "exists"))
    results = run_ranks(lambda rank: train_run(config, data_parallel=True), env=True)
    for rank in range(2):
        assert results[rank][0] == "error" and "already exists; pass --overwrite" in results[rank][1]


def test_torchrun_cli(tmp_path, cache_dir):
    from experiments import train as train_cli

    argv = ["--architectures", "top_k", "vsae_topk", "--dict-size", "128", "--k", "8", "--steps", "20",
            "--batch-size", "64", "--eval-batches", "1", "--activations", str(cache_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "experiments.train", *argv, "--save-dir", str(tmp_path / "two")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1  # rank 0 reports
    assert train_cli.main([*argv, "--save-dir", str(tmp_path / "one")]) == 0
    for i in range(2):
        one, two = (torch.load(tmp_path / d / f"trainer_{i}" / "ae.pt") for d in ("one", "two"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


def test_only_the_train_cli_turns_torchrun_ranks_into_data_parallelism(tmp_path, cache_dir, monkeypatch):
    # A sweep under torchrun uses the ranks as shards that train different runs: train_run without
    # data_parallel=True must stay a 1-process run whatever the environment says.
    from experiments.training.run import train_run

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = RunConfig(**{**RUN, "steps": 5}, activations=str(cache_dir), save_dir=str(tmp_path / "run"))
    assert len(train_run(config)) == 3 and not dist.is_initialized()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 1
