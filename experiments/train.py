"""Train SAEs of any registered architecture with dictionary_learning's buffer and trainers.

    python -m experiments.train --architectures top_k vsae_topk --model default --layer 0 \\
        --dict-size 1024 --k 32 --steps 2000 --save-dir runs/demo [--checkpoint-every 500]
    python -m experiments.train --resume runs/demo      # continue an interrupted run

Writes dictionary_learning's layout ``save_dir/trainer_i/{ae.pt, config.json}`` plus
``metrics.json`` per trainer and ``run.json``/``metrics.json`` at the top. Everything is
validated before the model is loaded. Training happens in the staging folder
``.<save_dir name>.partial`` beside ``save_dir``, renamed into place only when every trainer
finished. If the run fails or is killed, the staging folder is removed unless it holds a
checkpoint (``--checkpoint-every``): then it is kept and ``--resume save_dir`` continues from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from dictionary_learning_ext import ARCHITECTURES, Architecture, NonFiniteError, get_architecture, load_dictionary
from dictionary_learning_ext.atomic import write_json as atomic_write_json
from dictionary_learning_ext.config import parse_value
from experiments.training_loop import (
    CHECKPOINT_DIR,
    BufferStream,
    CountingIterator,
    LoopOptions,
    latest_checkpoint,
)
from experiments.training_loop import train as train_loop

RUN_STATE = "run_state.json"
RUN_STATE_FORMAT = "vsae-run-state"
LOCK_FILE = ".lock"
# Arguments a resumed run may change: they do not affect the trained weights.
RESUME_MUTABLE = frozenset({"checkpoint_every", "wandb", "wandb_project", "eval_batches"})
# Namespace entries that describe this invocation, not the run.
INVOCATION_ONLY = frozenset({"resume", "overwrite", "explicit", "argv"})
# Trainer fields the CLI fills from its own options; a --set would silently contradict them.
SET_BY_OPTIONS = {
    "activation_dim": "the model's width at --layer", "lm_name": "--model", "layer": "--layer",
    "steps": "--steps", "device": "--device", "seed": "--seed", "dict_size": "--dict-size", "k": "--k",
}
AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--architectures",
        nargs="+",
        metavar="NAME[:PRESET]",
        help=f"registered names: {', '.join(sorted(ARCHITECTURES))}; e.g. vsae_topk:paper (required unless --resume)",
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
    p.add_argument("--save-dir", type=Path, help="output folder (required unless --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast-dtype", choices=sorted(AUTOCAST_DTYPES), default="float32",
                   help="activation dtype and autocast (bfloat16: losses still in float32)")
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
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a resumable checkpoint every N steps (kept if the run fails or is killed)")
    p.add_argument("--resume", type=Path, default=None, metavar="SAVE_DIR",
                   help="continue the interrupted run of SAVE_DIR from its last checkpoint, with its own arguments")
    p.add_argument("--skip-nonfinite-batches", action="store_true",
                   help="skip (and count in run.json) activation batches with NaN/Inf instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing save dir")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (needs network)")
    p.add_argument("--wandb-project", default="vsae")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # Which options were given (not defaulted): --resume compares only those with the stored run.
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    args.explicit = frozenset(vars(probe.parse_args(argv))) - {"help"}
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run.json
    return args


def _parse_overrides(items: Iterable[str]) -> list[tuple[str | None, str, Any]]:
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected [ARCH.]KEY=VALUE, e.g. --set vsae_topk.beta=0.5")
        arch, _, key = key.rpartition(".")
        if key in SET_BY_OPTIONS:
            raise UsageError(f"--set {item!r}: {key} is set by {SET_BY_OPTIONS[key]}; use that instead of --set")
        if arch and arch not in ARCHITECTURES:
            raise UsageError(f"--set {item!r}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
        parsed.append((arch or None, key, parse_value(raw)))
    return parsed


def validate_args(args: argparse.Namespace, resuming: bool = False) -> None:
    """Everything checkable before touching the model or the disk."""
    if not args.architectures:
        raise UsageError("--architectures is required (or --resume SAVE_DIR to continue a run)")
    if args.save_dir is None:
        raise UsageError("--save-dir is required (or --resume SAVE_DIR to continue a run)")
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--n-ctxs", args.n_ctxs),
                        ("--ctx-len", args.ctx_len), ("--eval-batches", args.eval_batches),
                        ("--refresh-batch-size", args.refresh_batch_size)):
        if value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        raise UsageError(f"--checkpoint-every must be a positive number of steps, got {args.checkpoint_every}")
    if args.dict_size is not None and args.dict_size <= 0:
        raise UsageError(f"--dict-size must be a positive integer, got {args.dict_size}")
    if any(k <= 0 for k in args.k):
        raise UsageError(f"--k values must be positive, got {args.k}")
    if args.dict_size is not None and max(args.k) > args.dict_size:
        raise UsageError(f"--k {max(args.k)} is larger than --dict-size {args.dict_size}; choose k <= dict size")
    if args.layer < 0:
        raise UsageError(f"--layer must be >= 0, got {args.layer}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    for spec in args.architectures:
        name, _, preset = spec.partition(":")
        arch = get_architecture(name)
        if preset and not arch.has_preset(preset):
            raise UsageError(f"architecture {name!r} has no preset {preset!r}; presets: {arch.preset_names()}")
    parent = args.save_dir.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--save-dir parent {parent} does not exist; create it first or choose another path")
    if not resuming and args.save_dir.exists() and not args.overwrite:
        raise UsageError(f"--save-dir {args.save_dir} already exists; pass --overwrite or choose a new folder")
    if args.save_dir.exists() and not args.save_dir.is_dir():
        raise UsageError(f"--save-dir {args.save_dir} is a file, not a folder; choose another path")
    if args.n_ctxs * args.ctx_len < 2 * args.batch_size:
        raise UsageError("--n-ctxs x --ctx-len must hold at least two batches of activations")
    _parse_overrides(args.overrides)
    from experiments.corpus import parse_text_spec  # imports sae_bench's prompt format: only when needed

    parse_text_spec(args.text)


def trainer_plan(specs: Sequence[str], ks: Sequence[int]) -> list[tuple[Architecture, str, str, int | None]]:
    """(architecture, name, preset, k) per trainer, in trainer_i order: each ``name[:preset]`` spec,
    swept over ``ks`` when the architecture has a k."""
    plan = []
    for spec in specs:
        name, _, preset = spec.partition(":")
        arch = get_architecture(name)
        plan += [(arch, name, preset, k) for k in (ks if "k" in arch.field_names else [None])]
    return plan


def build_trainer_configs(args: argparse.Namespace, d_model: int, lm_name: str) -> list[dict[str, Any]]:
    """One trainSAE config dict per (architecture, k); validated through the registry."""
    dict_size = args.dict_size if args.dict_size is not None else 4 * d_model
    overrides = _parse_overrides(args.overrides)
    plan = trainer_plan(args.architectures, args.k)
    configs = []
    for arch, name, preset, k in plan:
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
            if arch_name in (None, name) and (key in arch.field_names or arch_name == name):
                values[key] = value
        values["wandb_name"] = f"{name}{'_' + preset if preset else ''}{f'_k{k}' if k else ''}"
        configs.append(arch.trainer_config(preset or "default", **values))
    unused = [key for arch_name, key, _ in overrides
              if arch_name is None and not any(key in arch.field_names for arch, _, _, _ in plan)]
    if unused:
        raise UsageError(f"--set key(s) {unused} match no field of the chosen architectures")
    return configs


def make_buffer(args: argparse.Namespace, lm) -> BufferStream:
    """dictionary_learning's ActivationBuffer, wrapped with its own RNG and a saveable position."""
    from dictionary_learning import ActivationBuffer

    from experiments.corpus import text_source

    texts = CountingIterator(text_source(args.text, tokenizer=lm.model.tokenizer, seed=args.seed))
    buffer = ActivationBuffer(
        data=texts,
        model=lm.model,
        submodule=lm.submodule,
        d_submodule=lm.d_model,
        n_ctxs=args.n_ctxs,
        ctx_len=args.ctx_len,
        refresh_batch_size=args.refresh_batch_size,
        out_batch_size=args.batch_size,
        device=args.device,
    )
    return BufferStream(buffer, texts, seed=args.seed)


@torch.no_grad()
def evaluate_trainer(trainer_dir: Path, data: BufferStream, args: argparse.Namespace) -> dict[str, float]:
    """dictionary_learning's evaluate (FVE, L0, loss recovered) with a signed-correct frac_alive."""
    from dictionary_learning.evaluation import evaluate

    ae, config = load_dictionary(trainer_dir, device=args.device)
    with data.rng() as buffer:  # the buffer's draws stay on the data RNG, as in training
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


# --- run folders, state and locking ----------------------------------------------------------
def staging_dir(save_dir: Path) -> Path:
    """Where a run trains until it finishes (deterministic, so --resume can find it)."""
    save_dir = save_dir.resolve()
    return save_dir.parent / f".{save_dir.name}.partial"


def run_status(save_dir: Path) -> str:
    """"interrupted" (a staging folder with run state), "finished" (a run.json with its arguments),
    "missing", or "not_a_run"; for scripts that decide between a fresh run and --resume."""
    save_dir = Path(save_dir)
    if (staging_dir(save_dir) / RUN_STATE).is_file():
        return "interrupted"
    if (save_dir / "run.json").is_file():
        return "finished"
    return "not_a_run" if save_dir.exists() else "missing"


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in INVOCATION_ONLY}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{what} {path} is not valid JSON ({err}); the folder was edited or damaged") from err


class RunLock:
    """An exclusive flock on ``staging/.lock``: one process per run. The kernel drops it when the
    process dies (even by SIGKILL), so a killed run never leaves a stale lock."""

    def __init__(self, staging: Path, save_dir: Path):
        staging.mkdir(exist_ok=True)
        self.path = staging / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(
                f"another process is training into {save_dir} (it holds {self.path}); wait for it to finish "
                "or stop it, then use --resume"
            ) from None

    def release(self) -> None:
        os.close(self.fd)


def _resume_args(args: argparse.Namespace) -> tuple[argparse.Namespace, str]:
    """The stored arguments of the run at ``args.resume`` (with the allowed changes applied) and its
    status ("interrupted" or "finished")."""
    target = args.resume
    if args.overwrite:
        raise UsageError("--resume continues a run and --overwrite discards one; pass only one of them")
    status = run_status(target)
    if status == "interrupted":
        state = _read_json(staging_dir(target) / RUN_STATE, "run state")
        if state.get("format") != RUN_STATE_FORMAT:
            raise UsageError(f"{staging_dir(target) / RUN_STATE} was not written by this CLI; cannot resume from it")
        stored = state["args"]
    elif status == "finished":
        stored = _read_json(target / "run.json", "run record").get("args")
        if stored is None:
            raise UsageError(f"{target}/run.json has no stored arguments (written by an older version); "
                             "it cannot be resumed. Start a new run instead")
    elif status == "missing":
        raise UsageError(f"--resume {target}: no such run (neither {target} nor an interrupted run at "
                         f"{staging_dir(target)}); start it without --resume")
    else:
        raise UsageError(f"--resume {target}: this folder is not a training run (no run.json, no interrupted "
                         f"run at {staging_dir(target)}); pass the --save-dir of a run of this CLI")
    defaults = vars(build_parser().parse_args([]))
    unknown = sorted(set(stored) - set(defaults))
    if unknown:
        raise UsageError(f"{target}: stored arguments {unknown} are unknown to this version; resume with the "
                         "version that started the run")
    given = _args_json(args)
    explicit = getattr(args, "explicit", None)
    if explicit is None:  # a Namespace built in code: everything that differs from the defaults was chosen
        explicit = {k for k, v in given.items() if v != defaults.get(k)}
    conflicts = []
    for key in sorted(set(explicit) - INVOCATION_ONLY - RESUME_MUTABLE):
        if key == "save_dir":
            if Path(given[key]).resolve() != target.resolve():
                conflicts.append(f"--save-dir {given[key]} (resuming {target})")
        elif json.loads(json.dumps(given[key])) != stored.get(key, defaults[key]):
            conflicts.append(f"--{key.replace('_', '-')} {given[key]!r} (the run has {stored.get(key, defaults[key])!r})")
    if conflicts:
        raise UsageError(
            f"--resume {target}: {'; '.join(conflicts)}. A resumed run keeps its original arguments (only "
            f"{sorted('--' + k.replace('_', '-') for k in RESUME_MUTABLE)} may change); drop the conflicting "
            "options, or start a new run in another --save-dir"
        )
    merged = argparse.Namespace(**{**defaults, **stored})
    for key in RESUME_MUTABLE & set(explicit):
        setattr(merged, key, getattr(args, key))
    merged.save_dir = target
    merged.resume, merged.overwrite, merged.explicit = target, False, frozenset(explicit)
    return merged, status


def _has_checkpoint(staging: Path) -> bool:
    return any((staging / CHECKPOINT_DIR).glob("step_*.pt"))


def _clear(folder: Path, keep: str) -> None:
    for child in folder.iterdir():
        if child.name == keep:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from experiments.models import load_model

    status = None
    if args.resume is not None:
        args, status = _resume_args(args)
    validate_args(args, resuming=status is not None)
    save_dir = args.save_dir.resolve()
    if status == "finished":
        print(f"{save_dir} already finished; nothing to resume (to train it again, run without --resume "
              "and with --overwrite)", file=sys.stderr)
        return _read_json(save_dir / "metrics.json", "metrics")

    staging = staging_dir(save_dir)
    if status == "interrupted" and latest_checkpoint(staging) is None:
        raise UsageError(
            f"--resume {save_dir}: the interrupted run has no checkpoint (it was started without "
            "--checkpoint-every or stopped before the first one); start it again without --resume"
        )
    lock = RunLock(staging, save_dir)
    try:
        try:
            if status == "interrupted":
                checkpoint = latest_checkpoint(staging)
                state = _read_json(staging / RUN_STATE, "run state")
                state["resumed_from_steps"].append(int(re.findall(r"\d+", checkpoint.name)[0]))
            else:
                if _has_checkpoint(staging) and not args.overwrite:
                    raise UsageError(
                        f"{save_dir} has an interrupted run with checkpoints in {staging}; continue it with "
                        f"--resume {args.save_dir}, or pass --overwrite to discard it"
                    )
                _clear(staging, keep=LOCK_FILE)  # a stale run without checkpoints holds nothing to keep
                state = {"format": RUN_STATE_FORMAT, "args": _args_json(args), "argv": getattr(args, "argv", None),
                         "resumed_from_steps": []}

            torch.manual_seed(args.seed)
            lm = load_model(args.model, layer=args.layer, device=args.device)
            configs = build_trainer_configs(args, lm.d_model, lm.name)
            data = make_buffer(args, lm)
            atomic_write_json(staging / RUN_STATE, state)
            result = train_loop(
                data, configs, staging,
                LoopOptions(
                    steps=args.steps, checkpoint_every=args.checkpoint_every,
                    skip_nonfinite=args.skip_nonfinite_batches, normalize_activations=args.normalize_activations,
                    device=args.device, autocast_dtype=AUTOCAST_DTYPES[args.autocast_dtype],
                    use_wandb=args.wandb, wandb_project=args.wandb_project, log_steps=max(1, args.steps // 20),
                ),
                resume=status == "interrupted",
            )
            rows = []
            for i in range(len(configs)):
                trainer_dir = staging / f"trainer_{i}"
                metrics = {"trainer": f"trainer_{i}", **evaluate_trainer(trainer_dir, data, args),
                           "skipped_nonfinite_batches": result.skipped_batches}
                atomic_write_json(trainer_dir / "metrics.json", metrics)
                rows.append(metrics)
            atomic_write_json(staging / "metrics.json", rows)
            atomic_write_json(staging / "run.json", {
                "argv": state["argv"], "args": state["args"], "model": lm.name, "layer": lm.layer,
                "hook_name": lm.hook_name, "d_model": lm.d_model, "text": args.text,
                "train_seconds": result.train_seconds, "tokens_per_step": args.batch_size, "steps": args.steps,
                "norm_factor": result.norm_factor, "skipped_nonfinite_batches": result.skipped_batches,
                "skipped_at_steps": result.skipped_at_steps, "resumed_from_steps": state["resumed_from_steps"],
            })
        except BaseException as err:
            if _has_checkpoint(staging):
                err.add_note(
                    f"The run's last good checkpoint is kept in {staging}; after fixing the cause, continue "
                    f"with: python -m experiments.train --resume {args.save_dir}"
                )
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        # A crash from here on leaves either the complete staging folder (resumable: its final
        # checkpoint is at the last step) or the finished save_dir.
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(staging, save_dir)
        shutil.rmtree(save_dir / CHECKPOINT_DIR, ignore_errors=True)
        (save_dir / RUN_STATE).unlink()
        (save_dir / LOCK_FILE).unlink()
    finally:
        lock.release()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (ValueError, FileNotFoundError, NonFiniteError) as err:
        # Usage/config/checkpoint errors (ValueError subclasses), unknown model, non-finite training.
        print(f"error: {err}", file=sys.stderr)
        for note in getattr(err, "__notes__", []):
            print(note, file=sys.stderr)
        return 1 if isinstance(err, NonFiniteError) else 2
    print(format_table(rows))
    print(f"\nsaved to {args.save_dir.resolve() if args.save_dir else args.resume.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
