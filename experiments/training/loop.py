"""A resumable version of dictionary_learning's ``trainSAE`` loop.

dictionary_learning 0.1.0's ``trainSAE`` cannot continue a run (it always enumerates steps from 0,
and the trainers set ``b_dec`` to the geometric median at step 0) and writes its checkpoints with
plain ``torch.save``. This loop keeps everything else of it: the trainers' ``update(step, x)``
interface, ``get_norm_factor`` and ``scale_biases`` for normalised activations, ``log_stats`` and
the wandb worker for logging, and the layout ``save_dir/trainer_i/{ae.pt, config.json}`` with
``{"trainer": ..., "buffer": ...}`` configs, so ``load_dictionary`` and SAEBench read its output.

What it adds:

* ``checkpoints/step_<N>.pt`` every N steps, written atomically (one file per checkpoint: every
  trainer's state, the data position, the RNG states); only the newest is kept.
* Exact resume: a run resumed from a checkpoint produces the same weights, bit for bit on CPU, as
  one that was never interrupted.
* Non-finite activations raise, or are skipped and counted; a non-finite loss raises.
* Logging (wandb/verbose) has no effect on training: ``log_stats`` calls ``trainer.loss``, which
  advances noise generators and dead-latent counters, so that state is restored afterwards.
* Data parallelism (``LoopOptions.distributed``, under torchrun; ``experiments.training.distributed``):
  each rank trains on its slice of every global batch, with hooks that make the step the 1-process one;
  rank 0 writes the configs, checkpoints and weights, and logs (its own slice). Without it the loop is
  exactly the 1-process loop.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from dictionary_learning_ext.errors import CheckpointError, ConfigError, NonFiniteError
from dictionary_learning_ext.io import load_torch, remove_stale_temp_files, save_torch, write_json
from dictionary_learning_ext.registry import by_trainer_class
from dictionary_learning_ext.rng import global_rng_state, set_global_rng_state
from dictionary_learning_ext.trainer_base import check_activations, load_trainer_state_dict, trainer_state_dict

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "vsae-training-checkpoint"
CHECKPOINT_VERSION = 1


# --- trainer state -----------------------------------------------------------------------
def get_trainer_state(trainer: Any) -> dict[str, Any]:
    """Our trainers define state_dict(); dictionary_learning's are captured attribute by attribute."""
    own = getattr(trainer, "state_dict", None)
    return own() if callable(own) else trainer_state_dict(trainer)


def set_trainer_state(trainer: Any, state: dict[str, Any]) -> None:
    own = getattr(trainer, "load_state_dict", None)
    own(state) if callable(own) else load_trainer_state_dict(trainer, state)


def _side_effect_state(trainer: Any) -> dict[str, Any]:
    """What ``trainer.loss`` may change (not parameters or optimiser): used to undo logging."""
    state = trainer_state_dict(trainer, exclude=("ae", "optimizer", "scheduler"))
    return {"state": state, "ae_buffers": {n: b.clone() for n, b in trainer.ae.named_buffers()}}


def _restore_side_effect_state(trainer: Any, saved: dict[str, Any]) -> None:
    state = saved["state"]
    for attr, sub in state["objects"].items():
        getattr(trainer, attr).load_state_dict(sub)
    for attr, gen_state in state["generators"].items():
        getattr(trainer, attr).set_state(gen_state)
    for attr, value in state["tensors"].items():
        current = getattr(trainer, attr, None)
        device = current.device if isinstance(current, torch.Tensor) else value.device
        setattr(trainer, attr, value.to(device))
    for attr, value in state["plain"].items():
        setattr(trainer, attr, value)
    buffers = dict(trainer.ae.named_buffers())
    with torch.no_grad():
        for name, value in saved["ae_buffers"].items():
            buffers[name].copy_(value)


# --- checkpoints ---------------------------------------------------------------------------
def checkpoint_path(save_dir: Path, step: int) -> Path:
    return save_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def latest_checkpoint(save_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint. Writes are atomic, so a file with a final name is complete;
    temp files of a writer that was killed are removed here."""
    folder = save_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    remove_stale_temp_files(folder)
    found = sorted(folder.glob("step_*.pt"))
    return found[-1] if found else None


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None), list, dict)) else str(v))
            for k, v in config.items()}


def load_checkpoint(path: Path, trainers: Sequence[Any]) -> dict[str, Any]:
    """Read and check a checkpoint against the trainers it is meant for (not yet applied)."""
    state = load_torch(path, what="checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no format tag {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')}; this code reads version {CHECKPOINT_VERSION}"
        )
    saved_configs = state["trainer_configs"]
    if len(saved_configs) != len(trainers):
        raise CheckpointError(
            f"{path} holds {len(saved_configs)} trainers but the run defines {len(trainers)}; "
            "resume with the arguments the run started with"
        )
    for i, (saved, trainer) in enumerate(zip(saved_configs, trainers)):
        now = _jsonable(trainer.config)
        diff = sorted(k for k in set(saved) | set(now) if k != "norm_factor" and saved.get(k) != now.get(k))
        if diff:
            raise CheckpointError(
                f"{path}: trainer_{i}'s config differs from the checkpoint's in {diff} "
                f"(checkpoint {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]}); "
                "resume with the arguments the run started with"
            )
    return state


# --- the loop ------------------------------------------------------------------------------
@dataclass
class LoopOptions:
    steps: int
    checkpoint_every: Optional[int] = None
    """Write a checkpoint after every this many steps (and after the last one); None: never."""
    skip_nonfinite: bool = False
    """Skip (and count) activation batches containing NaN/Inf instead of stopping."""
    max_consecutive_skips: int = 100
    """More skipped batches in a row than this means the data itself is broken: stop."""
    normalize_activations: bool = False
    norm_factor_batches: int = 100
    device: str = "cpu"
    autocast_dtype: torch.dtype = torch.float32
    use_wandb: bool = False
    wandb_project: str = ""
    wandb_entity: str = ""
    verbose: bool = False
    log_steps: Optional[int] = None
    on_step: Optional[Callable[[int], None]] = None
    """Called with the number of steps done after every step (progress reporting)."""
    distributed: Optional[Any] = None
    """An ``experiments.training.distributed.Dist``: train data-parallel as this rank (``data`` is then the
    stream of global batches every rank reads alike); None: one process."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        if self.checkpoint_every is not None and (
            isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 1
        ):
            raise ConfigError(f"checkpoint_every must be a positive int or None, got {self.checkpoint_every!r}")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if (self.use_wandb or self.verbose) and not self.log_steps:
            raise ConfigError("log_steps must be set when logging (use_wandb or verbose)")


@dataclass
class LoopResult:
    trainers: list[Any]
    steps: int
    skipped_batches: int
    norm_factor: Optional[float]
    resumed_from_step: Optional[int]
    train_seconds: float
    """Training time over every segment of the run (resumes included)."""
    skipped_at_steps: list[int] = field(default_factory=list)


def build_trainers(trainer_configs: Sequence[dict[str, Any]]) -> list[Any]:
    """Construct trainers as trainSAE does (including its ``_trainer_i`` wandb-name suffix)."""
    trainers = []
    for i, config in enumerate(trainer_configs):
        config = dict(config)
        if "wandb_name" in config:
            config["wandb_name"] = f"{config['wandb_name']}_trainer_{i}"
        trainer_class = config.pop("trainer")
        trainers.append(trainer_class(**config))
    return trainers


def write_trainer_configs(save_dir: Path, trainers: Sequence[Any], buffer_config: Optional[dict],
                          norm_factor: Optional[float], variants: Optional[Sequence[str]] = None) -> None:
    """``trainer_i/config.json``: dictionary_learning's ``{"trainer": ..., "buffer": ...}``, the trainer part
    also naming the registered architecture (and its variant, when known) next to ``trainer_class``."""
    for i, trainer in enumerate(trainers):
        record = {"architecture": by_trainer_class(type(trainer).__name__).name}
        if variants is not None:
            record["variant"] = variants[i]
        trainer_config = {**record, **trainer.config}
        if norm_factor is not None:
            # dictionary_learning's own trainers rebuild .config on each access, so trainSAE's
            # config["norm_factor"] write is lost for them; it is added here instead.
            trainer_config["norm_factor"] = norm_factor
        config = {"trainer": _jsonable(trainer_config)}
        if buffer_config is not None:
            config["buffer"] = buffer_config
        write_json(save_dir / f"trainer_{i}" / "config.json", config)


def _start_wandb(trainers: Sequence[Any], options: LoopOptions):
    import torch.multiprocessing as mp
    from dictionary_learning.training import new_wandb_process

    queues, processes = [], []
    for trainer in trainers:
        queue = mp.Queue()
        config = {k: v.cpu().item() if isinstance(v, torch.Tensor) else v for k, v in trainer.config.items()}
        process = mp.Process(target=new_wandb_process, args=(config, queue, options.wandb_entity, options.wandb_project))
        process.start()
        queues.append(queue)
        processes.append(process)
    return queues, processes


@dataclass
class _Progress:
    """Where the loop stands: what a checkpoint restores and the result reports."""

    step: int = 0
    skipped_at: list[int] = field(default_factory=list)
    norm_factor: Optional[float] = None
    seconds_before: float = 0.0
    """Training time of earlier segments of the run (before a resume)."""
    resumed_from: Optional[int] = None


def _resume(trainers: Sequence[Any], data: Any, save_dir: Path, group: Any = None) -> _Progress:
    """Load the newest checkpoint under ``save_dir`` into the trainers, the data and the global RNGs (every
    rank loads the file rank 0 found)."""
    from experiments.training.distributed import run_on_main_first

    def find() -> Path:
        path = latest_checkpoint(save_dir)  # removes a killed writer's temp files: rank 0 only
        if path is None:
            raise CheckpointError(f"no checkpoint under {save_dir / CHECKPOINT_DIR}; nothing to resume from")
        return path

    path = run_on_main_first(group, find, "finding the checkpoint to resume from")
    state = load_checkpoint(path, trainers)
    for trainer, trainer_state in zip(trainers, state["trainers"]):
        set_trainer_state(trainer, trainer_state)
    if state["data"] is not None:
        if not hasattr(data, "load_state_dict"):
            raise CheckpointError(f"{path} stores a data position but the data source cannot restore one")
        data.load_state_dict(state["data"])
    set_global_rng_state(state["rng"])
    return _Progress(step=state["step"], skipped_at=list(state["skipped_at_steps"]), norm_factor=state["norm_factor"],
                     seconds_before=state["train_seconds"], resumed_from=state["step"])


def _save_checkpoint(trainers: Sequence[Any], data: Any, save_dir: Path, progress: _Progress, seconds: float) -> None:
    """One file with everything the run needs to continue; only the newest is kept."""
    path = checkpoint_path(save_dir, progress.step)
    save_torch({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": progress.step,
        "trainer_configs": [_jsonable(t.config) for t in trainers],
        "trainers": [get_trainer_state(t) for t in trainers],
        "data": data.state_dict() if hasattr(data, "state_dict") else None,
        "rng": global_rng_state(), "norm_factor": progress.norm_factor,
        "skipped_at_steps": list(progress.skipped_at), "train_seconds": seconds,
    }, path)
    for older in (save_dir / CHECKPOINT_DIR).glob("step_*.pt"):
        if older != path:
            older.unlink()


def _next_batch(data: Any, width: int, options: LoopOptions, progress: _Progress) -> Optional[torch.Tensor]:
    """The next activation batch, scaled and checked; None when it is skipped (non-finite, with
    ``skip_nonfinite``)."""
    group = options.distributed
    try:
        act = next(data)
    except StopIteration:
        if group is None:
            raise RuntimeError(
                f"the activation source ended at step {progress.step} of {options.steps}; use a repeating "
                "text source or fewer --steps"
            ) from None
        act = None
    if group is not None:
        return _agreed_batch(act, data, width, options, progress)
    act = act.to(dtype=options.autocast_dtype)
    if progress.norm_factor is not None:
        act = act / progress.norm_factor
    if options.skip_nonfinite and act.ndim == 2 and act.shape[-1] == width and not torch.isfinite(act).all():
        progress.skipped_at.append(progress.step)
        return None
    check_activations(act, width, progress.step)
    return act


def _agreed_batch(act: Optional[torch.Tensor], data: Any, width: int, options: LoopOptions,
                  progress: _Progress) -> Optional[torch.Tensor]:
    """``_next_batch`` of a rank: the ranks first agree that each has a full slice, and skip or stop together
    when any slice holds NaN/Inf (a rank stopping alone would leave the others waiting)."""
    group = options.distributed
    if act is not None:
        act = act.to(dtype=options.autocast_dtype)
        if progress.norm_factor is not None:
            act = act / progress.norm_factor
    nonfinite = group.agree_on_batch(act, data.expected_rows(), progress.step)
    if nonfinite:
        if options.skip_nonfinite and act.ndim == 2 and act.shape[-1] == width:
            progress.skipped_at.append(progress.step)
            return None
        raise NonFiniteError(
            f"activation batch at step {progress.step} contains NaN/Inf (on at least one of the {group.world} "
            "ranks); the model or buffer produced non-finite activations (check the model dtype)."
        )
    check_activations(act, width, progress.step)
    return act


def _log(trainers: Sequence[Any], step: int, act: torch.Tensor, options: LoopOptions, queues: list) -> None:
    """dictionary_learning's log_stats, which calls ``trainer.loss`` and so advances noise generators and
    dead-latent counters: that state is restored afterwards, so logging never changes training."""
    from dictionary_learning.training import log_stats

    saved = [_side_effect_state(t) for t in trainers]
    log_stats(trainers, step, act, False, False, log_queues=queues, verbose=options.verbose)
    for trainer, s in zip(trainers, saved):
        _restore_side_effect_state(trainer, s)


def _update(trainers: Sequence[Any], step: int, act: torch.Tensor, autocast: Any) -> None:
    for i, trainer in enumerate(trainers):
        with autocast:
            loss = trainer.update(step, act)
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteError(
                f"trainer_{i} ({type(trainer).__name__}): loss became {loss} at step {step}; "
                "training stopped and this step's weights are discarded. Lower the learning "
                "rate or check the activations."
            )


def _save_final(trainers: Sequence[Any], save_dir: Path, buffer_config: Optional[dict], norm_factor: Optional[float],
                variants: Optional[Sequence[str]]) -> None:
    """The trained dictionaries at the raw activation scale (normalisation folded back in) and their configs."""
    for i, trainer in enumerate(trainers):
        if norm_factor is not None:
            trainer.ae.scale_biases(norm_factor)
        save_torch({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, save_dir / f"trainer_{i}" / "ae.pt")
    write_trainer_configs(save_dir, trainers, buffer_config, norm_factor, variants)


def _autocast(options: LoopOptions):
    # trainSAE autocasts only on CUDA, but it also casts the activations to autocast_dtype, which on
    # CPU meets float32 weights unconverted; autocasting on CPU too makes bfloat16 work there.
    if options.autocast_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda" if "cuda" in options.device else "cpu", dtype=options.autocast_dtype)


def train(
    data: Any,
    trainer_configs: Sequence[dict[str, Any]],
    save_dir: Path,
    options: LoopOptions,
    resume: bool = False,
    variants: Optional[Sequence[str]] = None,
) -> LoopResult:
    """Train every trainer on ``data`` for ``options.steps`` steps and write ``save_dir/trainer_i``.

    ``data`` yields activation batches; if it has ``state_dict``/``load_state_dict`` (BufferStream)
    its position is checkpointed. With ``resume`` the newest checkpoint under ``save_dir`` is loaded
    (it must exist). ``variants``: the registry variant of each trainer, recorded in its config.json.
    """
    from dictionary_learning.training import get_norm_factor

    save_dir = Path(save_dir)
    trainers = build_trainers(trainer_configs)
    widths = {int(t.ae.activation_dim) for t in trainers}
    if len(widths) != 1:
        raise ConfigError(f"trainers of one run must share activation_dim; got {sorted(widths)}")
    width = widths.pop()
    buffer_config = getattr(data, "config", None)
    group, hooks = options.distributed, None
    main = group is None or group.is_main
    if group is not None:
        from experiments.training.distributed import DataParallelTrainers, Gathered, RankSlice

        hooks = DataParallelTrainers(group, trainers)
        data = RankSlice(data, group)

    if resume:
        progress = _resume(trainers, data, save_dir, group)
    else:
        progress = _Progress()
        if main:
            write_trainer_configs(save_dir, trainers, buffer_config, None, variants)
        if options.normalize_activations:
            source = data if group is None else Gathered(data, group)
            progress.norm_factor = get_norm_factor(source, steps=options.norm_factor_batches)
            for trainer in trainers:
                trainer.ae.scale_biases(1.0)  # fails early if a dictionary cannot fold the factor in
    if hooks is not None:
        hooks.broadcast_state()
    if progress.norm_factor is not None:
        for trainer in trainers:
            if isinstance(trainer.config, dict):
                trainer.config["norm_factor"] = progress.norm_factor

    autocast = _autocast(options)
    queues, processes = _start_wandb(trainers, options) if options.use_wandb and main else ([], [])
    started = time.time()
    consecutive_skips = 0
    try:
        with tqdm(total=options.steps, initial=progress.step, disable=not main) as bar:
            while progress.step < options.steps:
                act = _next_batch(data, width, options, progress)
                if act is None:
                    consecutive_skips += 1
                    if consecutive_skips > options.max_consecutive_skips:
                        raise NonFiniteError(
                            f"{consecutive_skips} activation batches in a row contained NaN/Inf (at step "
                            f"{progress.step}); the data source itself is broken (check the model dtype and inputs)"
                        )
                    continue
                consecutive_skips = 0
                if (options.use_wandb or options.verbose) and progress.step % options.log_steps == 0 and main:
                    _log(trainers, progress.step, act, options, queues)
                with hooks.step(act.shape[0]) if hooks is not None else nullcontext():
                    _update(trainers, progress.step, act, autocast)
                progress.step += 1
                bar.update(1)
                if options.on_step is not None:
                    options.on_step(progress.step)
                every = options.checkpoint_every
                if every and (progress.step % every == 0 or progress.step == options.steps):
                    if main:
                        _save_checkpoint(trainers, data, save_dir, progress,
                                         progress.seconds_before + time.time() - started)
                    if group is not None:
                        group.barrier(f"waiting for rank 0 to write the checkpoint of step {progress.step}")
    finally:
        for queue in queues:
            queue.put("DONE")
        for process in processes:
            process.join()

    if main:
        _save_final(trainers, save_dir, buffer_config, progress.norm_factor, variants)
    if group is not None:
        group.barrier("waiting for rank 0 to write the trained weights")
    return LoopResult(
        trainers=trainers, steps=progress.step, skipped_batches=len(progress.skipped_at),
        norm_factor=progress.norm_factor, resumed_from_step=progress.resumed_from,
        train_seconds=progress.seconds_before + time.time() - started, skipped_at_steps=progress.skipped_at,
    )
