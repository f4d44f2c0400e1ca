"""One training run from a ``RunConfig``: load the model, build the buffer and the trainers, train in
the staging folder (checkpointing, resumable), evaluate every trainer, and move the finished run into
place. The train CLI and the sweep both call ``train_run`` / ``resume_run`` with a config object.

With ``data_parallel=True`` (what ``experiments.train`` passes) a process started by torchrun trains
data-parallel (``experiments.training.distributed``): every rank calls these; rank 0 alone checks and locks
the folders and writes, and the other ranks take its outcome (its error, if it refused the run), train
their slices, and return no metrics (rank 0 evaluates). Without it (the default: e.g. a sweep whose
torchrun ranks are shards training different runs) a run is a 1-process run whatever the environment says.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from dictionary_learning_ext.errors import UsageError
from dictionary_learning_ext.io import read_json, write_json

from experiments.training.config import RunConfig
from experiments.training.run_folder import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    RUN_RECORD,
    RUN_STATE,
    RunLock,
    check_save_dir,
    clear,
    has_checkpoint,
    new_run_state,
    read_run_state,
    resume_config,
    staging_dir,
)

AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def train_run(config: RunConfig, overwrite: bool = False, argv: Optional[Sequence[str]] = None,
              on_step: Optional[Callable[[int], None]] = None, data_parallel: bool = False) -> list[dict[str, Any]]:
    """Train a fresh run into ``config.save_dir``; returns every trainer's metrics row. ``on_step``: called
    with the steps done after each step. ``data_parallel``: under torchrun, train as this rank."""
    from experiments.training.distributed import run_on_main_first, session

    with session(config.device, config.collective_timeout, enabled=data_parallel) as group:
        lock = None

        def prepare() -> Path:
            nonlocal lock
            save_dir = check_save_dir(config, overwrite).resolve()
            staging = staging_dir(save_dir)
            lock = RunLock(staging, save_dir)
            if has_checkpoint(staging) and not overwrite:
                raise UsageError(
                    f"{save_dir} has an interrupted run with checkpoints in {staging}; continue it with "
                    f"--resume {config.save_dir}, or pass --overwrite to discard it"
                )
            clear(staging, keep=LOCK_FILE)  # a stale run without checkpoints holds nothing to keep
            return save_dir

        try:
            save_dir = run_on_main_first(group, prepare, "preparing the run folder")
            return _train_in_staging(config, save_dir, new_run_state(config, list(argv) if argv is not None else None),
                                     resuming=False, on_step=on_step, group=group)
        finally:
            if lock is not None:
                lock.release()


def resume_run(save_dir: Path, given: Mapping[str, Any] | None = None, overwrite: bool = False,
               on_step: Optional[Callable[[int], None]] = None, data_parallel: bool = False) -> list[dict[str, Any]]:
    """Continue the run at ``save_dir`` from its last checkpoint (``given``: options given anew, checked
    against the stored ones); a finished run is left as it is and its metrics returned. ``data_parallel``:
    under torchrun, train as this rank (the checkpoint resumes on any number of ranks)."""
    from experiments.training.distributed import run_on_main_first, session

    config, status = resume_config(Path(save_dir), given or {}, overwrite)
    save_dir = Path(save_dir).resolve()
    with session(config.device, config.collective_timeout, enabled=data_parallel) as group:
        if status == "finished":
            if group is not None and not group.is_main:
                return []
            print(f"{save_dir} already finished; nothing to resume (to train it again, run without --resume "
                  "and with --overwrite)", file=sys.stderr)
            return read_json(save_dir / "metrics.json", "metrics")
        from experiments.training.loop import latest_checkpoint

        lock = None

        def prepare() -> dict[str, Any]:
            nonlocal lock
            staging = staging_dir(save_dir)
            checkpoint = latest_checkpoint(staging)
            if checkpoint is None:
                raise UsageError(
                    f"--resume {save_dir}: the interrupted run has no checkpoint (it was started without "
                    "--checkpoint-every or stopped before the first one); start it again without --resume"
                )
            lock = RunLock(staging, save_dir)
            state = read_run_state(staging)
            state["config"] = config.to_dict()  # with the options a resume may change
            state["resumed_from_steps"].append(int(re.findall(r"\d+", checkpoint.name)[0]))
            return state

        try:
            state = run_on_main_first(group, prepare, "preparing the resume")
            return _train_in_staging(config, save_dir, state, resuming=True, on_step=on_step, group=group)
        finally:
            if lock is not None:
                lock.release()


def _train_in_staging(config: RunConfig, save_dir: Path, state: dict[str, Any], resuming: bool,
                      on_step: Optional[Callable[[int], None]] = None, group: Any = None) -> list[dict[str, Any]]:
    from experiments.lm.models import load_model
    from experiments.training.cache import ActivationCache
    from experiments.training.data import make_buffer, make_source
    from experiments.training.evaluate import EvalSample, evaluate_trainer
    from experiments.training.loop import LoopOptions, train
    from experiments.training.plan import plan_trainers, protocol_values, trainer_configs

    staging = staging_dir(save_dir)
    main = group is None or group.is_main
    try:
        if group is not None and config.batch_size % group.world:
            raise UsageError(f"--batch-size {config.batch_size} (the global batch) does not split evenly over "
                             f"{group.world} processes; choose a multiple of {group.world}")
        torch.manual_seed(config.seed)
        if config.activations is None:
            lm = load_model(config.model, layer=config.layer, device=config.device)
            plan = plan_trainers(config)
            configs = trainer_configs(config, plan, lm.d_model, lm.name)
            data = make_buffer(config, lm)
        else:
            # The cache replaces the model's forward passes; the model is still loaded to check the cache's
            # width and hook site, and for the evaluation's loss recovered. Under torchrun rank 0 loads it after
            # training (the other ranks would wait for it in their first collective).
            ActivationCache(config.activations).check_run(config)  # what its manifest says, before the model loads
            lm = load_model(config.model, layer=config.layer, device=config.device) if group is None else None
            plan = plan_trainers(config)
            data = make_source(config, lm)
            configs = trainer_configs(config, plan, data.cache.d_model, data.cache.manifest["model"])
        if main:
            write_json(staging / RUN_STATE, state)
        result = train(
            data, configs, staging,
            LoopOptions(
                steps=config.steps, checkpoint_every=config.checkpoint_every,
                skip_nonfinite=config.skip_nonfinite_batches, normalize_activations=config.normalize_activations,
                device=config.device, autocast_dtype=AUTOCAST_DTYPES[config.autocast_dtype],
                use_wandb=config.wandb, wandb_project=config.wandb_project, log_steps=max(1, config.steps // 20),
                on_step=on_step, distributed=group,
            ),
            resume=resuming,
            variants=[t.variant for t in plan],
        )
        if not main:
            return []  # rank 0 evaluates and writes
        if lm is None:  # a cache under torchrun
            lm = load_model(config.model, layer=config.layer, device=config.device)
            data.cache.check_run(config, lm)
            data.lm = lm
        extra = {"world_size": 1 if group is None else group.world}
        if config.activations is not None:
            extra["activations"] = {"folder": str(data.cache.folder.resolve()), "tokens": data.cache.tokens,
                                    "passes_in_training": data.passes}
        rows = []
        sample = EvalSample.draw(data, config)  # every trainer on the same held-back batches
        for t in plan:
            trainer_dir = staging / t.trainer
            metrics = {"trainer": t.trainer, **evaluate_trainer(trainer_dir, sample, config),
                       "skipped_nonfinite_batches": result.skipped_batches}
            write_json(trainer_dir / "metrics.json", metrics)
            rows.append(metrics)
        write_json(staging / "metrics.json", rows)
        write_json(staging / RUN_RECORD, {
            "argv": state["argv"], "config": state["config"], "model": lm.name, "layer": lm.layer,
            "hook_name": lm.hook_name, "d_model": lm.d_model,
            "trainers": [{"trainer": t.trainer, "architecture": t.architecture, "variant": t.variant, "k": t.k,
                          "label": t.label, "departures": protocol_values(config, t)[1]} for t in plan],
            "train_seconds": result.train_seconds, "tokens_per_step": config.batch_size, "steps": config.steps,
            "norm_factor": result.norm_factor, "skipped_nonfinite_batches": result.skipped_batches,
            "skipped_at_steps": result.skipped_at_steps, "resumed_from_steps": state["resumed_from_steps"],
            **extra,
        })
    except BaseException as err:
        if not main:
            raise  # the folders are rank 0's
        if has_checkpoint(staging):
            err.add_note(
                f"The run's last good checkpoint is kept in {staging}; after fixing the cause, continue "
                f"with: python -m experiments.train --resume {config.save_dir}"
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
    return rows
