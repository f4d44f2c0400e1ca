"""Train SAEs of any registered architecture with dictionary_learning's own buffer and loop.

    python -m experiments.train --architectures top_k vsae_topk --model default --layer 0 \\
        --dict-size 1024 --k 32 --steps 2000 --save-dir runs/demo

Writes dictionary_learning's layout ``save_dir/trainer_i/{ae.pt, config.json}`` plus
``metrics.json`` per trainer and ``run.json``/``metrics.json`` at the top. Everything is
validated before the model is loaded, and training happens in a staging folder that is
renamed into place only when every trainer finished, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from dictionary_learning_ext import ARCHITECTURES, Architecture, get_architecture, load_dictionary
from saebench_adapters.atomic import write_json as atomic_write_json

# dictionary_learning's defaults assume 10k+ steps; in shorter runs they are scaled to a tenth of the run.
STEP_DEFAULTS_TO_FIT = ("warmup_steps", "sparsity_warmup_steps", "threshold_start_step")


def fitted_step_defaults(arch: Architecture, steps: int) -> dict[str, int]:
    """Step-count defaults of ``arch`` that do not fit in a run of ``steps``, set to a tenth of it."""
    return {
        f.name: steps // 10
        for f in fields(arch.config_class)
        if f.name in STEP_DEFAULTS_TO_FIT and isinstance(f.default, int) and f.default >= steps
    }


class UsageError(ValueError):
    """Bad command-line input; the message names the problem and the fix."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--architectures",
        nargs="+",
        required=True,
        metavar="NAME[:PRESET]",
        help=f"registered names: {', '.join(sorted(ARCHITECTURES))}; e.g. vsae_topk:paper",
    )
    p.add_argument("--model", default="default", help="'default' (embedded, offline), 'gelu-1l', or a HF id")
    p.add_argument("--layer", type=int, default=0, help="residual stream after this block")
    p.add_argument("--dict-size", type=int, default=None, help="latents (default 4 x d_model)")
    p.add_argument("--k", type=int, nargs="+", default=[32], help="k for TopK-style architectures (sweep)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=None, help="override every trainer's learning rate")
    p.add_argument("--batch-size", type=int, default=192, help="activations per training step")
    p.add_argument("--n-ctxs", type=int, default=500, help="contexts held in the activation buffer")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--refresh-batch-size", type=int, default=64)
    p.add_argument("--text", default="local", help="'local' (stdlib corpus) or 'hf:<dataset>[:<column>]'")
    p.add_argument("--save-dir", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--normalize-activations", action="store_true", help="dictionary_learning's unit mean-square scaling")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[ARCH.]KEY=VALUE",
        help="config override (JSON value), e.g. --set vsae_topk.beta=0.5 --set auxk_alpha=0",
    )
    p.add_argument("--eval-batches", type=int, default=4, help="batches for the final metrics table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing save dir")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (needs network)")
    p.add_argument("--wandb-project", default="vsae")
    return p.parse_args(argv)


def _parse_overrides(items: Iterable[str]) -> list[tuple[str | None, str, Any]]:
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected [ARCH.]KEY=VALUE, e.g. --set vsae_topk.beta=0.5")
        arch, _, key = key.rpartition(".")
        if arch and arch not in ARCHITECTURES:
            raise UsageError(f"--set {item!r}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as select_on=mean
        parsed.append((arch or None, key, value))
    return parsed


def validate_args(args: argparse.Namespace) -> None:
    """Everything checkable before touching the model or the disk."""
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--n-ctxs", args.n_ctxs),
                        ("--ctx-len", args.ctx_len), ("--eval-batches", args.eval_batches),
                        ("--refresh-batch-size", args.refresh_batch_size)):
        if value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if args.dict_size is not None and args.dict_size <= 0:
        raise UsageError(f"--dict-size must be a positive integer, got {args.dict_size}")
    if any(k <= 0 for k in args.k):
        raise UsageError(f"--k values must be positive, got {args.k}")
    if args.dict_size is not None and max(args.k) > args.dict_size:
        raise UsageError(f"--k {max(args.k)} is larger than --dict-size {args.dict_size}; choose k <= dict size")
    if args.layer < 0:
        raise UsageError(f"--layer must be >= 0, got {args.layer}")
    for spec in args.architectures:
        name, _, preset = spec.partition(":")
        arch = get_architecture(name)
        if preset and preset not in arch.preset_names():
            raise UsageError(f"architecture {name!r} has no preset {preset!r}; presets: {arch.preset_names()}")
    parent = args.save_dir.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--save-dir parent {parent} does not exist; create it first or choose another path")
    if args.save_dir.exists() and not args.overwrite:
        raise UsageError(f"--save-dir {args.save_dir} already exists; pass --overwrite or choose a new folder")
    if args.n_ctxs * args.ctx_len < 2 * args.batch_size:
        raise UsageError("--n-ctxs x --ctx-len must hold at least two batches of activations")
    _parse_overrides(args.overrides)


def build_trainer_configs(args: argparse.Namespace, d_model: int, lm_name: str) -> list[dict[str, Any]]:
    """One trainSAE config dict per (architecture, k); validated through the registry."""
    dict_size = args.dict_size if args.dict_size is not None else 4 * d_model
    overrides = _parse_overrides(args.overrides)
    chosen = [(get_architecture(name), name, preset) for name, _, preset in (s.partition(":") for s in args.architectures)]
    configs = []
    for arch, name, preset in chosen:
        field_names = arch.field_names
        ks = args.k if "k" in field_names else [None]
        for k in ks:
            values: dict[str, Any] = dict(
                steps=args.steps, activation_dim=d_model, dict_size=dict_size, layer=args.layer, lm_name=lm_name,
                device=args.device, seed=args.seed,
            )
            if k is not None:
                values["k"] = k
            if args.lr is not None:
                values["lr"] = args.lr
            values.update(fitted_step_defaults(arch, args.steps))
            for arch_name, key, value in overrides:
                if arch_name in (None, name) and (key in field_names or arch_name == name):
                    values[key] = value
            values["wandb_name"] = f"{name}{'_' + preset if preset else ''}{f'_k{k}' if k else ''}"
            configs.append(arch.trainer_config(preset or "default", **values))
    unused = [key for arch_name, key, _ in overrides
              if arch_name is None and not any(key in arch.field_names for arch, _, _ in chosen)]
    if unused:
        raise UsageError(f"--set key(s) {unused} match no field of the chosen architectures")
    return configs


def make_buffer(args: argparse.Namespace, lm) -> Any:
    from dictionary_learning import ActivationBuffer

    from experiments.corpus import text_source

    return ActivationBuffer(
        data=text_source(args.text, tokenizer=lm.model.tokenizer, seed=args.seed),
        model=lm.model,
        submodule=lm.submodule,
        d_submodule=lm.d_model,
        n_ctxs=args.n_ctxs,
        ctx_len=args.ctx_len,
        refresh_batch_size=args.refresh_batch_size,
        out_batch_size=args.batch_size,
        device=args.device,
    )


@torch.no_grad()
def evaluate_trainer(trainer_dir: Path, buffer, args: argparse.Namespace) -> dict[str, float]:
    """dictionary_learning's evaluate (FVE, L0, loss recovered) with a signed-correct frac_alive."""
    from dictionary_learning.evaluation import evaluate

    ae, config = load_dictionary(trainer_dir, device=args.device)
    metrics = evaluate(ae, buffer, max_len=args.ctx_len, batch_size=min(32, args.refresh_batch_size),
                       device=args.device, n_batches=args.eval_batches)
    # evaluate() calls a latent alive when sum(f) != 0, which signed codes can cancel; count f != 0.
    fired = torch.zeros(ae.dict_size, dtype=torch.bool, device=args.device)
    for _ in range(args.eval_batches):
        fired |= (ae.encode(next(buffer).to(args.device)) != 0).any(dim=0)
    metrics["frac_alive"] = fired.float().mean().item()
    trainer = config["trainer"]
    return {"architecture": trainer["trainer_class"], "k": trainer.get("k"), "dict_size": trainer["dict_size"],
            **{key: float(value) for key, value in metrics.items()}}


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("trainer", "trainer"), ("architecture", "architecture"), ("k", "k"),
            ("frac_variance_explained", "FVE"), ("l0", "L0"), ("frac_alive", "frac alive"),
            ("frac_recovered", "loss recovered")]
    cells = [[h for _, h in cols]] + [
        [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c, _ in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from dictionary_learning.training import trainSAE

    from experiments.models import load_model

    validate_args(args)
    torch.manual_seed(args.seed)
    lm = load_model(args.model, layer=args.layer, device=args.device)
    configs = build_trainer_configs(args, lm.d_model, lm.name)
    buffer = make_buffer(args, lm)

    save_dir = args.save_dir.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.partial-", dir=save_dir.parent))
    try:
        start = time.time()
        trainSAE(
            data=buffer,
            trainer_configs=configs,
            steps=args.steps,
            save_dir=str(staging),
            device=args.device,
            normalize_activations=args.normalize_activations,
            use_wandb=args.wandb,
            wandb_project=args.wandb_project,
            log_steps=max(1, args.steps // 20),
        )
        train_seconds = time.time() - start
        rows = []
        for i in range(len(configs)):
            trainer_dir = staging / f"trainer_{i}"
            metrics = {"trainer": f"trainer_{i}", **evaluate_trainer(trainer_dir, buffer, args)}
            atomic_write_json(trainer_dir / "metrics.json", metrics)
            rows.append(metrics)
        atomic_write_json(staging / "metrics.json", rows)
        atomic_write_json(staging / "run.json", {
            "argv": sys.argv[1:], "model": lm.name, "layer": lm.layer, "hook_name": lm.hook_name,
            "d_model": lm.d_model, "text": args.text, "train_seconds": train_seconds,
            "tokens_per_step": args.batch_size, "steps": args.steps,
        })
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(staging, save_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (ValueError, FileNotFoundError) as err:  # usage/config errors, unknown model, layer out of range
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nsaved to {args.save_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
