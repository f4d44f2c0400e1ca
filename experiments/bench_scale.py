"""Beyond one process: ``python -m experiments.bench_scale``.

    python -m experiments.bench_scale                    # both parts, a few minutes on 2 busy cores
    python -m experiments.bench_scale --parts dp --dp-steps 100 --dp-batch 4096

Parts:

* ``dp``: training tokens/s of one run (the same SAEs, the same global batch) in 1 process and in N
  processes under ``torchrun`` (gloo on CPU), on an activation cache so no language model runs inside the
  timed loop. The time is the run's own ``train_seconds`` (run.json: the training loop, without start-up and
  evaluation). 1 process runs 1 torch thread, each of the N processes 1 thread; ``--also-threads`` adds 1
  process with N threads, the other way to use N cores.
* ``study``: the language-model time a cache saves a study: S seeds of one run (several SAEs on one
  buffer, as a study trains them) on live buffers, against one cache write plus the same S runs on the
  cache. Times are ``train_seconds`` (the live buffer's model passes happen inside the loop) plus, for the
  cached study, the cache write.

The machine is shared: the 1-minute load average is printed before and after each measurement; with
fewer free cores than processes the N-process numbers say more about the load than about the method.
Results also go to ``--out-dir``/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "bench_scale"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("dp", "study"), default=["dp", "study"])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="the cache, the runs and results.json")
    p.add_argument("--architectures", nargs="+", default=["top_k", "vsae_topk", "mp_sae"])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dict-size", type=int, default=2048)
    g = p.add_argument_group("dp")
    g.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    g.add_argument("--dp-steps", type=int, default=60)
    g.add_argument("--dp-batch", type=int, default=2048)
    g.add_argument("--rounds", type=int, default=2, help="repetitions of each setting, interleaved")
    g.add_argument("--also-threads", action="store_true", help="also 1 process with --nproc torch threads")
    g = p.add_argument_group("study")
    g.add_argument("--seeds", type=int, default=3, help="runs of the study (one per seed)")
    g.add_argument("--study-steps", type=int, default=150)
    g.add_argument("--study-batch", type=int, default=512)
    return p


def load() -> float:
    return round(os.getloadavg()[0], 2)


def say(message: str) -> None:
    print(f"[load {load():5.2f}] {message}", flush=True)


def env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def ensure_cache(folder: Path, tokens: int) -> float:
    """Write (or reuse) a cache of ``tokens`` activations of the embedded model; returns the write's seconds."""
    from experiments.training.cache import CacheOptions, write_cache
    from experiments.training.config import RunConfig

    started = time.time()
    write_cache(RunConfig(), CacheOptions(out=str(folder), tokens=tokens, shard_tokens=65536))
    return time.time() - started


# --- dp ------------------------------------------------------------------------------------------
def train_cli(nproc: int, threads: int, argv: list[str], save_dir: Path) -> dict[str, Any]:
    shutil.rmtree(save_dir, ignore_errors=True)
    if nproc == 1:
        cmd = [sys.executable, "-m", "experiments.train", *argv, "--save-dir", str(save_dir)]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "experiments.train", *argv, "--save-dir", str(save_dir)]
    before = load()
    done = subprocess.run(cmd, cwd=REPO, env=env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    run = json.loads((save_dir / "run.json").read_text())
    return {"train_seconds": run["train_seconds"], "tokens": run["steps"] * run["tokens_per_step"],
            "world_size": run["world_size"], "load_before": before, "load_after": load()}


def part_dp(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    tokens = args.dp_steps * args.dp_batch
    cache = out / "cache"
    seconds = ensure_cache(cache, tokens)
    say(f"cache of {tokens} activations ready ({seconds:.1f} s)")
    argv = ["--architectures", *args.architectures, "--k", str(args.k), "--dict-size", str(args.dict_size),
            "--steps", str(args.dp_steps), "--batch-size", str(args.dp_batch), "--eval-batches", "1",
            "--activations", str(cache)]
    settings = [("1 process x 1 thread", 1, 1), (f"{args.nproc} processes x 1 thread", args.nproc, 1)]
    if args.also_threads:
        settings.append((f"1 process x {args.nproc} threads", 1, args.nproc))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in settings}
    for r in range(args.rounds):
        for name, nproc, threads in (settings if r % 2 == 0 else settings[::-1]):
            got = train_cli(nproc, threads, argv, out / "dp_run")
            got["tokens_per_s"] = got["tokens"] / got["train_seconds"]
            results[name].append(got)
            say(f"round {r}: {name}: {got['tokens_per_s']:,.0f} tokens/s ({got['train_seconds']:.1f} s of training; "
                f"load {got['load_before']} -> {got['load_after']})")
    base = statistics.median(g["tokens_per_s"] for g in results[settings[0][0]])
    print(f"\ndata-parallel training ({', '.join(args.architectures)}; dict {args.dict_size}, k {args.k}, global batch "
          f"{args.dp_batch}, {args.dp_steps} steps; {os.cpu_count()} CPUs):")
    for name, _, _ in settings:
        rate = statistics.median(g["tokens_per_s"] for g in results[name])
        print(f"  {name:<24} {rate:>10,.0f} tokens/s   x{rate / base:.2f}")
    return {"settings": results, "cache_seconds": seconds}


# --- study ---------------------------------------------------------------------------------------
def part_study(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from experiments.training.config import RunConfig
    from experiments.training.run import train_run

    torch.set_num_threads(1)
    tokens = args.study_steps * args.study_batch
    base = dict(architectures=tuple(args.architectures), ks=(args.k,), dict_size=args.dict_size, steps=args.study_steps,
                batch_size=args.study_batch, eval_batches=1)

    def study(cache: Path | None) -> list[float]:
        seconds = []
        for seed in range(args.seeds):
            save_dir = out / f"study_{'cached' if cache else 'live'}_{seed}"
            shutil.rmtree(save_dir, ignore_errors=True)
            before = load()
            train_run(RunConfig(**base, seed=seed, save_dir=str(save_dir), activations=str(cache) if cache else None))
            seconds.append(json.loads((save_dir / "run.json").read_text())["train_seconds"])
            say(f"{'cached' if cache else 'live'} run, seed {seed}: {seconds[-1]:.1f} s of training (load {before} -> {load()})")
        return seconds

    live = study(None)
    cache = out / "study_cache"
    shutil.rmtree(cache, ignore_errors=True)
    before = load()
    write_seconds = ensure_cache(cache, tokens)
    say(f"cache write of {tokens} activations: {write_seconds:.1f} s (load {before} -> {load()})")
    cached = study(cache)
    live_total, cached_total = sum(live), sum(cached) + write_seconds
    print(f"\nstudy of {args.seeds} runs ({', '.join(args.architectures)}; {tokens} tokens each):")
    print(f"  live buffers:        {live_total:8.1f} s of training ({live_total / args.seeds:.1f} s per run)")
    print(f"  cache + {args.seeds} runs:      {cached_total:8.1f} s ({write_seconds:.1f} s writing the cache once, "
          f"{sum(cached) / args.seeds:.1f} s per run)")
    per_run_lm = (live_total - sum(cached)) / args.seeds
    print(f"  language-model time per live run ~ {per_run_lm:.1f} s; saved by the cache: "
          f"{live_total - cached_total:.1f} s ({(live_total - cached_total) / live_total:.0%} of the live study)")
    return {"live_seconds": live, "cached_seconds": cached, "cache_write_seconds": write_seconds, "tokens_per_run": tokens}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    say(f"bench_scale on {os.cpu_count()} CPUs; out {out}")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load()}
    if "dp" in args.parts:
        results["dp"] = part_dp(args, out)
    if "study" in args.parts:
        results["study"] = part_study(args, out)
    results["load_end"] = load()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
