"""A fast smoke of the benchmark's pieces (experiments.bench): workloads and their cache, the race (warm-up,
rounds, auxK's share), every contender's step, the parts' tables and the entry point, on tiny sizes."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from experiments.bench import contenders as C
from experiments.bench import mp, scaling, throughput, workloads
from experiments.bench.race import race

SAELENS = C.saelens_available() is None


def test_synthetic_workload_is_deterministic_and_batches_wrap():
    a = workloads.synthetic_workload(d=16, n_tokens=300, seed=1)
    b = workloads.synthetic_workload(d=16, n_tokens=300, seed=1)
    assert a.acts.shape == (300, 16) and a.d == 16 and torch.equal(a.acts, b.acts)
    assert torch.isfinite(a.acts).all() and not torch.equal(a.acts, workloads.synthetic_workload(16, 300, seed=2).acts)
    assert torch.equal(a.batch(0, 100), a.acts[:100]) and torch.equal(a.batch(2, 100), a.acts[200:])
    wrapped = a.batch(1, 200)  # rows 200..399 of a 300-row pool: 200..299 then 0..99
    assert torch.equal(wrapped, torch.cat([a.acts[200:], a.acts[:100]]))


def test_embedded_activations_are_collected_once_and_reused(tmp_path, monkeypatch):
    calls = []

    def fake_collect(n):
        calls.append(n)
        return torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)

    monkeypatch.setattr(workloads, "collect_embedded", fake_collect)
    first = workloads.embedded_workload(10, cache_dir=tmp_path, log=lambda s: None)
    again = workloads.embedded_workload(10, cache_dir=tmp_path, log=lambda s: None)
    assert calls == [10] and torch.equal(first.acts, again.acts) and first.name == "embedded"
    assert len(list(tmp_path.glob("*.pt"))) == 1
    workloads.embedded_workload(12, cache_dir=tmp_path, log=lambda s: None)  # other settings: collected anew
    assert calls == [10, 12]


class Sleeper(C.Contender):
    """A contender whose step sleeps: 4 ms, of which 2 ms are 'auxK' (absent from its twin)."""

    def __init__(self, label, aux=0.002, dead=1):
        self.label, self.aux, self.dead, self.steps = label, aux, dead, 0

    def step(self, x):
        time.sleep(0.002 + self.aux)
        self.steps += 1

    def dead_latents(self):
        return self.dead

    def without_auxk(self):
        return Sleeper(self.label + " [auxK off]", aux=0.0, dead=self.dead)


def test_race_warms_up_rotates_and_measures_the_auxk_share():
    seen = []
    a, b, idle = Sleeper("a"), Sleeper("b", aux=0.0, dead=0), Sleeper("idle", dead=0)
    results = race([a, b, idle], lambda i: seen.append(i) or torch.zeros(2, 2), 2, warmup_steps=3, rounds=3,
                   steps_per_round=2, clock="wall")  # sleeping takes wall time, no CPU time
    assert a.steps == 3 + 3 * 2 and idle.steps == 3 + 3 * 2
    assert set(results) == {"a", "b", "idle", "a [auxK off]"}  # a twin only where latents were dead
    assert results["a"].dead_after_warmup == 1 and results["a"].timed_steps_with_dead == 6
    assert 0.2 < results["a"].auxk_share < 0.8  # ~0.5: 2 of 4 ms
    assert results["b"].auxk_share == 0.0 and results["idle"].auxk_share == 0.0
    assert len(results["a"].seconds) == 3 and results["a"].tokens_per_s > 0
    assert sorted(set(seen)) == list(range(3 + 3 * 2)), "every contender sees batches 0..8"


@pytest.mark.parametrize("make", [
    lambda: C.dl_topk(16, 64, 4),
    lambda: C.vsae_topk("v", 16, 64, 4),
    lambda: C.vsae_topk("v", 16, 64, 4, kernel="sparse", sampling=False),
    lambda: C.mp_sae("m", 16, 64, 4, kernel="gram"),
    pytest.param(lambda: C.saelens_topk(16, 64, 4, 32), marks=pytest.mark.skipif(not SAELENS, reason="no SAELens")),
    pytest.param(lambda: C.saelens_mp(16, 64, 4, 32), marks=pytest.mark.skipif(not SAELENS, reason="no SAELens")),
], ids=["dl_topk", "vsae_topk", "vsae_topk_sparse_nosampling", "mp_sae", "saelens_topk", "saelens_mp"])
def test_every_contender_trains(make):
    c = make()
    x = torch.randn(32, 16)
    params = c.trainer.ae if hasattr(c.trainer, "ae") else c.trainer.sae
    before = {n: p.detach().clone() for n, p in params.named_parameters()}
    for _ in range(2):
        c.step(x)
    assert any(not torch.equal(before[n], p) for n, p in params.named_parameters()), "the step must train"
    assert c.dead_latents() == 0
    twin = c.without_auxk()
    if twin is not None:
        twin.step(x)
        assert twin.label.endswith("[auxK off]")


def small_args(**kw):
    base = dict(clock="cpu", expansion=4, k=[4], batch_sizes=[32], warmup_tokens=64, tokens_per_round=64, rounds=1,
                both_kernels=True, paper=False, mp_k=4, mp_batch=32, mp_select_also=["abs"], scaling_batch=32,
                scaling_k=4, scaling_dicts=[32, 64], scaling_dict=64, scaling_ks=[2, 4], scaling_rounds=1)
    return SimpleNamespace(**{**base, **kw})


def test_parts_produce_their_tables(tmp_path):
    w = workloads.synthetic_workload(d=16, n_tokens=400)
    lines = []
    rows = throughput.run([w], small_args(), log=lines.append)
    auto = throughput.kernel_of(32)  # what kernel="auto" runs at this batch
    other = {"dense": "sparse", "sparse": "dense"}[auto]
    assert len(rows) == 1 and rows[0]["kernel"] == auto and rows[0]["vs_dl"] > 0
    assert {throughput.OURS, throughput.OURS_NO_SAMPLING, throughput.DL, f"VSAETopK kernel={other}"} <= set(rows[0]["tokens_per_s"])
    throughput.report(rows, [w], print_=lines.append)
    verdicts = throughput.check_targets(rows, print_=lines.append)
    assert {v["target"] for v in verdicts} >= {">= 1.5x TopKTrainer", "never slower than TopKTrainer",
                                               "sampling overhead <= 5%"}
    mp_rows = mp.run([w], small_args(), log=lines.append)
    assert {mp.FAST, mp.TODAY, "MP-SAE gram, select=abs"} <= set(mp_rows[0]["tokens_per_s"])
    assert mp.report(mp_rows, print_=lines.append)
    res = scaling.run(w, small_args(), log=lines.append)
    assert [(r["axis"], r["dict_size"], r["k"]) for r in res["rows"]] == [("dict", 32, 4), ("dict", 64, 4), ("k", 64, 2), ("k", 64, 4)]
    assert all(r["roofline_tokens_per_s"] > 0 for r in res["rows"])
    path = scaling.report(res, tmp_path, print_=lines.append)
    assert path is not None and path.is_file()
    assert any("dense roofline" in line for line in lines)


def test_entry_point_runs_the_parts_and_writes_results(tmp_path, capsys):
    from experiments.bench.cli import main

    results = main(["--parts", "throughput", "mp", "--workloads", "synthetic512", "--synthetic-tokens", "256",
                    "--expansion", "1", "--k", "4", "--batch-sizes", "32", "--warmup-tokens", "32",
                    "--tokens-per-round", "32", "--rounds", "1", "--mp-k", "2", "--mp-batch", "32",
                    "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "load at start" in out and "load at end" in out and "== targets" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "throughput", "mp", "targets", "elapsed_s"} <= set(saved) and saved["machine"]["threads"] == 1
    assert results["throughput"][0]["dict_size"] == 512
