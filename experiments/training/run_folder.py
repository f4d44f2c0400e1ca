"""A run's folders and their states: the staging folder a run trains in, its lock, its stored state,
and which configuration a ``--resume`` continues with.

A run trains in ``.<save_dir name>.partial`` beside ``save_dir`` (deterministic, so ``--resume`` finds
it) and is renamed into place only when every trainer finished. ``run_state.json`` in the staging folder
and ``run.json`` in a finished run store the run's ``RunConfig``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Mapping

from dictionary_learning_ext.errors import UsageError
from dictionary_learning_ext.io import read_json

from experiments.training.config import FIELDS, RESUME_MUTABLE, RunConfig, flag

RUN_STATE = "run_state.json"
RUN_STATE_FORMAT = "vsae-run-state"
RUN_RECORD = "run.json"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"

RunStatus = Literal["interrupted", "finished", "missing", "not_a_run"]


def staging_dir(save_dir: Path) -> Path:
    """Where a run trains until it finishes."""
    save_dir = Path(save_dir).resolve()
    return save_dir.parent / f".{save_dir.name}.partial"


def run_status(save_dir: Path) -> RunStatus:
    """"interrupted" (a staging folder with run state), "finished" (a run.json), "missing", or
    "not_a_run"; for scripts that decide between a fresh run and --resume."""
    save_dir = Path(save_dir)
    if (staging_dir(save_dir) / RUN_STATE).is_file():
        return "interrupted"
    if (save_dir / RUN_RECORD).is_file():
        return "finished"
    return "not_a_run" if save_dir.exists() else "missing"


def has_checkpoint(staging: Path) -> bool:
    return any((staging / CHECKPOINT_DIR).glob("step_*.pt"))


def clear(folder: Path, keep: str) -> None:
    for child in folder.iterdir():
        if child.name == keep:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def check_save_dir(config: RunConfig, overwrite: bool) -> Path:
    """The save dir of a fresh run, checked before anything is loaded or written."""
    if not config.architectures:
        raise UsageError("--architectures is required (or --resume SAVE_DIR to continue a run)")
    if config.save_dir is None:
        raise UsageError("--save-dir is required (or --resume SAVE_DIR to continue a run)")
    save_dir = Path(config.save_dir)
    parent = save_dir.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--save-dir parent {parent} does not exist; create it first or choose another path")
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save-dir {save_dir} is a file, not a folder; choose another path")
    if save_dir.exists() and not overwrite:
        raise UsageError(f"--save-dir {save_dir} already exists; pass --overwrite or choose a new folder")
    return save_dir


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


def new_run_state(config: RunConfig, argv: list[str] | None) -> dict[str, Any]:
    return {"format": RUN_STATE_FORMAT, "config": config.to_dict(), "argv": argv, "resumed_from_steps": []}


def read_run_state(staging: Path) -> dict[str, Any]:
    state = read_json(staging / RUN_STATE, "run state")
    if state.get("format") != RUN_STATE_FORMAT:
        raise UsageError(f"{staging / RUN_STATE} was not written by this CLI; cannot resume from it")
    return state


def _stored_config(save_dir: Path, status: RunStatus) -> dict[str, Any]:
    if status == "interrupted":
        return read_run_state(staging_dir(save_dir))["config"]
    if status == "finished":
        stored = read_json(save_dir / RUN_RECORD, "run record").get("config")
        if stored is None:
            raise UsageError(f"{save_dir}/{RUN_RECORD} has no stored arguments (written by an older version); "
                             "it cannot be resumed. Start a new run instead")
        return stored
    if status == "missing":
        raise UsageError(f"--resume {save_dir}: no such run (neither {save_dir} nor an interrupted run at "
                         f"{staging_dir(save_dir)}); start it without --resume")
    raise UsageError(f"--resume {save_dir}: this folder is not a training run (no {RUN_RECORD}, no interrupted "
                     f"run at {staging_dir(save_dir)}); pass the --save-dir of a run of this CLI")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def resume_config(save_dir: Path, given: Mapping[str, Any], overwrite: bool = False) -> tuple[RunConfig, RunStatus]:
    """The stored configuration of the run at ``save_dir``, with the options ``given`` anew applied where
    a resumed run may change them (``RESUME_MUTABLE``); any other given option must equal the stored one.
    Returns it with the run's status ("interrupted" or "finished")."""
    if overwrite:
        raise UsageError("--resume continues a run and --overwrite discards one; pass only one of them")
    save_dir = Path(save_dir)
    status = run_status(save_dir)
    stored = _stored_config(save_dir, status)
    unknown = sorted(set(stored) - set(FIELDS))
    if unknown:
        raise UsageError(f"{save_dir}: stored arguments {unknown} are unknown to this version; resume with the "
                         "version that started the run")
    stored_config = RunConfig.from_dict(stored)
    conflicts = []
    for key in sorted(set(given) - RESUME_MUTABLE):
        if key == "save_dir":
            if Path(given[key]).resolve() != save_dir.resolve():
                conflicts.append(f"--save-dir {given[key]} (resuming {save_dir})")
        elif _as_json(given[key]) != _as_json(getattr(stored_config, key)):
            conflicts.append(f"{flag(key)} {_as_json(given[key])!r} (the run has {_as_json(getattr(stored_config, key))!r})")
    if conflicts:
        raise UsageError(
            f"--resume {save_dir}: {'; '.join(conflicts)}. A resumed run keeps its original arguments (only "
            f"{sorted(flag(k) for k in RESUME_MUTABLE)} may change); drop the conflicting options, or start a "
            "new run in another --save-dir"
        )
    changes = {key: given[key] for key in RESUME_MUTABLE & set(given)}
    return stored_config.replace(**changes, save_dir=str(save_dir)), status
