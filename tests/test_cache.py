"""The activation cache: shards round-trip the model's activations bit for bit, a killed write continues
where it stopped, a damaged shard is named (and rewritten by the same command), a cache that does not fit
the run is refused naming the field, and training on a cache resumes exactly."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dictionary_learning_ext import ARCHITECTURES
from dictionary_learning_ext.errors import CheckpointError, DataError, UsageError
from experiments import train as train_cli
from experiments.lm.corpus import text_source
from experiments.training.cache import (
    MANIFEST,
    ActivationCache,
    CacheOptions,
    CachedActivations,
    extract_activations,
    write_cache,
)
from experiments.training.config import RunConfig
from experiments.training.loop import LoopOptions, latest_checkpoint, train
from experiments.training.plan import fitted_step_defaults

SOURCE = RunConfig(ctx_len=32, refresh_batch_size=10)  # model "default", layer 0, text "local", seed 0
TOKENS, SHARD = 2500, 1000


@pytest.fixture(scope="module")
def lm():
    from experiments.lm.models import load_model

    return load_model("default", layer=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, lm) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=TOKENS, shard_tokens=SHARD), lm=lm)
    return out


def shard_rows(folder: Path) -> torch.Tensor:
    manifest = json.loads((folder / MANIFEST).read_text())
    return torch.cat([torch.from_numpy(np.load(folder / s["file"])) for s in manifest["shards"]])


def row_bytes(x: torch.Tensor) -> list[bytes]:
    return sorted(row.numpy().tobytes() for row in x)


def test_cache_round_trips_activations_bit_exactly(cache_dir, lm):
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["complete"] and manifest["tokens"] == TOKENS
    assert [s["tokens"] for s in manifest["shards"]] == [1000, 1000, 500]
    assert (manifest["model"], manifest["layer"], manifest["hook_name"], manifest["d_model"], manifest["dtype"]) == \
        ("vsae-gelu-2l", 0, "blocks.0.hook_resid_post", 256, "float32")
    assert manifest["tokenizer"]["vocab_size"] == len(lm.model.tokenizer)
    # The same text batches through the same trace, straight from the model.
    texts = text_source("local", tokenizer=lm.model.tokenizer, seed=0)
    direct = []
    while sum(len(d) for d in direct) < TOKENS:
        direct.append(extract_activations(lm, list(itertools.islice(texts, 10)), 32))
    assert torch.equal(shard_rows(cache_dir), torch.cat(direct)[:TOKENS])
    # A training stream's first pass serves every cached row exactly once.
    stream = CachedActivations(ActivationCache(cache_dir), batch_size=100, seed=5, window_shards=2)
    assert row_bytes(stream.rows(0, TOKENS)) == row_bytes(shard_rows(cache_dir))


def test_bfloat16_cache_stores_the_rounded_activations(tmp_path, cache_dir, lm):
    out = tmp_path / "bf16"
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=1200, shard_tokens=SHARD, dtype="bfloat16"), lm=lm)
    stream = CachedActivations(ActivationCache(out), batch_size=1200, seed=0, window_shards=1)
    got = stream.rows(0, 1200)
    assert got.dtype == torch.bfloat16
    assert row_bytes(got.float()) == row_bytes(shard_rows(cache_dir)[:1200].to(torch.bfloat16).float())


def test_stream_order_is_seeded_and_resumable(cache_dir):
    def stream(seed=1):
        return CachedActivations(ActivationCache(cache_dir), batch_size=300, seed=seed, window_shards=1)

    a, b = stream(), stream()
    batches = [next(a) for _ in range(12)]  # 3600 rows: across windows and into the second pass
    assert all(torch.equal(x, next(b)) for x in batches)
    assert not torch.equal(batches[0], next(stream(seed=2)))
    assert not torch.equal(batches[0], batches[9])  # the second pass is shuffled anew
    # Bounded memory: with a window of one shard, at most two shards are mapped at a time.
    c = stream()
    for _ in range(12):
        next(c)
        assert len(c._mapped) <= 2
    resumed = stream()
    resumed.load_state_dict(a.state_dict() | {"rows_read": 5 * 300})
    assert all(torch.equal(x, next(resumed)) for x in batches[5:])
    # Rank slices of a global batch are that batch.
    parts = [stream().next_slice(rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batches[0])


def test_interrupted_cache_write_continues_to_the_same_shards(tmp_path, cache_dir, lm):
    out = tmp_path / "acts"

    def die_after_first_shard(index):
        if index == 0:
            raise KeyboardInterrupt  # killed right after shard 0 and the manifest listing it

    with pytest.raises(KeyboardInterrupt):
        write_cache(SOURCE, CacheOptions(out=str(out), tokens=TOKENS, shard_tokens=SHARD), lm=lm,
                    on_shard=die_after_first_shard)
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    with pytest.raises(DataError, match="incomplete .*finish it with: python -m experiments.cache_activations"):
        ActivationCache(out)
    # A writer killed mid-shard leaves a temp file; one killed before updating the manifest, an unlisted shard.
    (out / ".shard_000001.npy.x1y2.tmp").write_bytes(b"partial")
    (out / "shard_000001.npy").write_bytes(b"complete but never listed")
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=TOKENS, shard_tokens=SHARD), lm=lm)
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads((cache_dir / MANIFEST).read_text())["shards"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["manifest.json", "shard_000000.npy", "shard_000001.npy", "shard_000002.npy"]
    # A larger --tokens extends it (the short last shard is rewritten full), to what one write gives.
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=3000, shard_tokens=SHARD), lm=lm)
    assert torch.equal(shard_rows(out)[:TOKENS], shard_rows(cache_dir))
    assert json.loads((out / MANIFEST).read_text())["tokens"] == 3000


def test_sigkilled_cache_writer_resumes(tmp_path, cache_dir, lm):
    out = tmp_path / "acts"
    options = CacheOptions(out=str(out), tokens=30000, shard_tokens=500)
    # A forked writer (the model is loaded already), SIGKILLed once a shard is listed.
    writer = multiprocessing.get_context("fork").Process(target=write_cache, args=(SOURCE, options, lm))
    writer.start()
    deadline = time.time() + 120
    while not (out / MANIFEST).is_file() or not json.loads((out / MANIFEST).read_text())["shards"]:
        assert writer.is_alive() and time.time() < deadline
        time.sleep(0.005)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"], "the writer finished before it was killed; the test proves nothing"
    write_cache(SOURCE, options, lm=lm)
    assert json.loads((out / MANIFEST).read_text())["complete"]
    assert torch.equal(shard_rows(out)[:TOKENS], shard_rows(cache_dir))


def test_corrupted_shard_is_named_and_rewritten(tmp_path, cache_dir, lm):
    out = tmp_path / "acts"
    shutil.copytree(cache_dir, out)
    shard = out / "shard_000001.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # one bit of one activation
    shard.write_bytes(bytes(data))
    stream = CachedActivations(ActivationCache(out), batch_size=TOKENS, seed=0)
    with pytest.raises(DataError, match=r"shard_000001\.npy is corrupted .*python -m experiments.cache_activations"):
        next(stream)
    messages = []
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=TOKENS, shard_tokens=SHARD), lm=lm, log=messages.append)
    assert any("shard_000001.npy is corrupted" in m for m in messages)
    assert torch.equal(shard_rows(out), shard_rows(cache_dir))
    next(CachedActivations(ActivationCache(out), batch_size=TOKENS, seed=0))
    # A truncated shard: its manifest entry no longer fits it.
    (out / "shard_000002.npy").write_bytes((out / "shard_000002.npy").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard_000002\.npy is corrupted"):
        CachedActivations(ActivationCache(out), batch_size=TOKENS, seed=0).rows(0, TOKENS)


@pytest.mark.parametrize("change,message", [
    (dict(model="gelu-1l"), r"activations of model 'vsae-gelu-2l', the run has --model 'gelu-1l'.*model field"),
    (dict(layer=1), r"activations of layer 0, the run has --layer 1.*layer field"),
    (dict(batch_size=4096, n_ctxs=4096), r"holds 2500 activations, fewer than one batch"),
])
def test_cache_that_does_not_fit_the_run_is_refused(cache_dir, change, message):
    with pytest.raises(UsageError, match=message):
        ActivationCache(cache_dir).check_run(RunConfig(activations=str(cache_dir), **change))


def test_cache_of_another_width_or_dtype_is_refused(tmp_path, cache_dir, lm):
    cache = ActivationCache(cache_dir)
    other = SimpleNamespace(d_model=128, name="vsae-gelu-2l", hook_name="blocks.0.hook_resid_post")
    with pytest.raises(UsageError, match=r"width \(d_model\) 256, the model 'vsae-gelu-2l' has width 128.*width field"):
        cache.check_run(RunConfig(activations=str(cache_dir)), other)
    cache.check_run(RunConfig(activations=str(cache_dir), autocast_dtype="bfloat16"), lm)  # float32 serves any run
    out = tmp_path / "bf16"
    write_cache(SOURCE, CacheOptions(out=str(out), tokens=500, shard_tokens=SHARD, dtype="bfloat16"), lm=lm)
    with pytest.raises(UsageError, match=r"holds bfloat16 activations, the run trains in --autocast-dtype float32.*dtype"):
        ActivationCache(out).check_run(RunConfig(activations=str(out), batch_size=100), lm)
    # Continuing a cache with other settings is refused too, naming them.
    with pytest.raises(UsageError, match=r"other settings: seed 0 there, 1 now"):
        write_cache(SOURCE.replace(seed=1), CacheOptions(out=str(cache_dir), tokens=TOKENS, shard_tokens=SHARD), lm=lm)


def test_cli_refuses_a_mismatched_cache_and_writes_nothing(tmp_path, cache_dir, capsys):
    code = train_cli.main(["--architectures", "top_k", "--activations", str(cache_dir), "--layer", "1",
                           "--save-dir", str(tmp_path / "run"), "--batch-size", "64"])
    assert code == 2
    assert "the layer field must match" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- training on a cache ----------------------------------------------------------------------------
def trainer_configs(name: str, steps: int = 30):
    arch = ARCHITECTURES[name]
    values = dict(steps=steps, activation_dim=256, dict_size=128, layer=0, lm_name="vsae-gelu-2l", device="cpu",
                  seed=1, lr=1e-3, **fitted_step_defaults(arch, steps))
    if "k" in arch.field_names:
        values["k"] = 8
    return [arch.trainer_config(**values)]


class Crashing:
    """A stream that raises on draw ``at`` (a crash mid-run), with the stream's position otherwise."""

    def __init__(self, stream, at):
        self.stream, self.at, self.drawn = stream, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.drawn == self.at:
            raise RuntimeError("simulated crash")
        self.drawn += 1
        return next(self.stream)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


@pytest.mark.parametrize("name", ["vsae_topk", "top_k"])
def test_training_on_a_cache_resumes_exactly(tmp_path, cache_dir, name):
    def stream():
        return CachedActivations(ActivationCache(cache_dir), batch_size=128, seed=3, window_shards=1)

    options = dict(steps=30, normalize_activations=True, norm_factor_batches=5)
    train(stream(), trainer_configs(name), tmp_path / "a", LoopOptions(**options))  # 37 x 128 rows: almost two passes
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Crashing(stream(), 6 + 17), trainer_configs(name), tmp_path / "b", LoopOptions(**options, checkpoint_every=10))
    assert latest_checkpoint(tmp_path / "b").name == "step_00000010.pt"
    train(stream(), trainer_configs(name), tmp_path / "b", LoopOptions(**options, checkpoint_every=10), resume=True)
    a = torch.load(tmp_path / "a" / "trainer_0" / "ae.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "trainer_0" / "ae.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint of another cache is refused.
    other = stream()
    with pytest.raises(CheckpointError, match="another activation cache"):
        other.load_state_dict(other.state_dict() | {"cache": "0" * 64})


def test_cli_trains_on_a_cache(tmp_path, cache_dir):
    argv = ["--architectures", "top_k", "mp_sae", "--dict-size", "128", "--k", "8", "--steps", "20", "--batch-size", "64",
            "--ctx-len", "32", "--refresh-batch-size", "10", "--eval-batches", "1", "--activations", str(cache_dir)]
    assert train_cli.main([*argv, "--save-dir", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["activations"]["tokens"] == TOKENS and run["activations"]["passes_in_training"] == pytest.approx(20 * 64 / TOKENS)
    assert run["world_size"] == 1 and run["config"]["activations"] == str(cache_dir)
    buffer = json.loads((tmp_path / "run" / "trainer_0" / "config.json").read_text())["buffer"]
    assert buffer["activations"] == str(cache_dir.resolve()) and buffer["ctx_len"] == 32
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["architecture"] for r in rows] == ["TopKTrainer", "MPSAETrainer"]
    assert all(0 < r["frac_variance_explained"] <= 1 and np.isfinite(r["frac_recovered"]) for r in rows)
