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

The data position: ``BufferStream`` gives the ActivationBuffer its own torch RNG state (the buffer
draws with ``torch.randperm`` on the global RNG, so the data order would otherwise depend on how
much randomness the trainers used), and a checkpoint stores the buffer's unread activations and
the number of texts consumed. Resuming copies those back and skips that many texts (reading text
only; no language-model forward pass), so the cost of a resume does not grow with the run's
length; the price is checkpoint size (at most the buffer, n_ctxs x ctx_len x d_model values).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dictionary_learning_ext import CheckpointError, ConfigError, NonFiniteError
from dictionary_learning_ext.atomic import load_torch, remove_stale_temp_files, save_torch, write_json
from dictionary_learning_ext.trainer_base import check_activations, load_trainer_state_dict, trainer_state_dict

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "vsae-training-checkpoint"
CHECKPOINT_VERSION = 1


# --- data ------------------------------------------------------------------------------
class CountingIterator:
    """An iterator that counts what it yielded, so a fresh copy can be moved to the same place."""

    def __init__(self, it: Iterator[Any]):
        self.it = iter(it)
        self.count = 0

    def __iter__(self) -> "CountingIterator":
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.count += 1
        return item

    def skip(self, n: int) -> None:
        if self.count != 0:
            raise RuntimeError("skip() moves a fresh iterator to a saved position; this one was already read")
        consumed = sum(1 for _ in itertools.islice(self.it, n))
        if consumed != n:
            raise CheckpointError(
                f"the text source ended after {consumed} texts but the checkpoint had read {n}; "
                "resume with the same --text source the run started with"
            )
        self.count = n


class BufferStream:
    """dictionary_learning's ActivationBuffer with its own RNG and a saveable position."""

    def __init__(self, buffer: Any, texts: CountingIterator, seed: int):
        if buffer.data is not texts:
            raise ValueError("the buffer must read its texts from the CountingIterator given here")
        self.buffer = buffer
        self.texts = texts
        self.device = torch.device(buffer.device)
        self._rng = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            self._rng["cuda"] = torch.Generator(device=self.device).manual_seed(seed).get_state()

    @contextmanager
    def rng(self):
        """Run buffer code (draws, refreshes, evaluation) on the data RNG instead of the global one."""
        outer = {"cpu": torch.get_rng_state()}
        torch.set_rng_state(self._rng["cpu"])
        if "cuda" in self._rng:
            outer["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._rng["cuda"], self.device)
        try:
            yield self.buffer
        finally:
            self._rng["cpu"] = torch.get_rng_state()
            torch.set_rng_state(outer["cpu"])
            if "cuda" in self._rng:
                self._rng["cuda"] = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer["cuda"], self.device)

    def __iter__(self) -> "BufferStream":
        return self

    def __next__(self) -> torch.Tensor:
        with self.rng() as buffer:
            return next(buffer)

    @property
    def config(self) -> dict[str, Any]:
        return self.buffer.config

    def state_dict(self) -> dict[str, Any]:
        b = self.buffer
        # Only the unread rows matter: the buffer discards read rows at its next refresh and draws
        # from the unread ones in index order, so the compacted copy continues identically.
        return {"unread": b.activations[~b.read.to(b.activations.device)].cpu().clone(),
                "texts_read": self.texts.count, "rng": dict(self._rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unread = state["unread"]
        if unread.ndim != 2 or unread.shape[1] != self.buffer.d_submodule:
            raise CheckpointError(
                f"checkpointed activations have shape {tuple(unread.shape)}, the buffer holds width "
                f"{self.buffer.d_submodule}; the checkpoint belongs to a different model or layer"
            )
        self.texts.skip(state["texts_read"])
        self.buffer.activations = unread.to(device=self.buffer.device, dtype=self.buffer.activations.dtype)
        self.buffer.read = torch.zeros(len(unread), dtype=torch.bool, device=self.buffer.device)
        self._rng = dict(state["rng"])


# --- RNG and trainer state --------------------------------------------------------------
def global_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


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
                          norm_factor: Optional[float]) -> None:
    for i, trainer in enumerate(trainers):
        trainer_config = dict(trainer.config)
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


def train(
    data: Any,
    trainer_configs: Sequence[dict[str, Any]],
    save_dir: Path,
    options: LoopOptions,
    resume: bool = False,
) -> LoopResult:
    """Train every trainer on ``data`` for ``options.steps`` steps and write ``save_dir/trainer_i``.

    ``data`` yields activation batches; if it has ``state_dict``/``load_state_dict`` (BufferStream)
    its position is checkpointed. With ``resume`` the newest checkpoint under ``save_dir`` is loaded
    (it must exist).
    """
    from dictionary_learning.training import get_norm_factor, log_stats

    save_dir = Path(save_dir)
    trainers = build_trainers(trainer_configs)
    widths = {int(t.ae.activation_dim) for t in trainers}
    if len(widths) != 1:
        raise ConfigError(f"trainers of one run must share activation_dim; got {sorted(widths)}")
    width = widths.pop()
    buffer_config = getattr(data, "config", None)

    start_step, skipped_at, norm_factor, seconds_before, resumed_from = 0, [], None, 0.0, None
    if resume:
        path = latest_checkpoint(save_dir)
        if path is None:
            raise CheckpointError(f"no checkpoint under {save_dir / CHECKPOINT_DIR}; nothing to resume from")
        state = load_checkpoint(path, trainers)
        for trainer, trainer_state in zip(trainers, state["trainers"]):
            set_trainer_state(trainer, trainer_state)
        if state["data"] is not None:
            if not hasattr(data, "load_state_dict"):
                raise CheckpointError(f"{path} stores a data position but the data source cannot restore one")
            data.load_state_dict(state["data"])
        set_global_rng_state(state["rng"])
        start_step, skipped_at = state["step"], list(state["skipped_at_steps"])
        norm_factor, seconds_before = state["norm_factor"], state["train_seconds"]
        resumed_from = start_step
    else:
        write_trainer_configs(save_dir, trainers, buffer_config, None)
        if options.normalize_activations:
            norm_factor = get_norm_factor(data, steps=options.norm_factor_batches)
            for trainer in trainers:
                trainer.ae.scale_biases(1.0)  # fails early if a dictionary cannot fold the factor in
    if norm_factor is not None:
        for trainer in trainers:
            if isinstance(trainer.config, dict):
                trainer.config["norm_factor"] = norm_factor

    def save_checkpoint(step: int, seconds: float) -> None:
        path = checkpoint_path(save_dir, step)
        save_torch({
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "trainer_configs": [_jsonable(t.config) for t in trainers],
            "trainers": [get_trainer_state(t) for t in trainers],
            "data": data.state_dict() if hasattr(data, "state_dict") else None,
            "rng": global_rng_state(), "norm_factor": norm_factor, "skipped_at_steps": list(skipped_at),
            "train_seconds": seconds,
        }, path)
        for older in (save_dir / CHECKPOINT_DIR).glob("step_*.pt"):
            if older != path:
                older.unlink()

    # trainSAE autocasts only on CUDA, but it also casts the activations to autocast_dtype, which on
    # CPU meets float32 weights unconverted; autocasting on CPU too makes bfloat16 work there.
    device_type = "cuda" if "cuda" in options.device else "cpu"
    autocast = (nullcontext() if options.autocast_dtype == torch.float32
                else torch.autocast(device_type=device_type, dtype=options.autocast_dtype))
    queues, processes = _start_wandb(trainers, options) if options.use_wandb else ([], [])
    started = time.time()
    step, consecutive_skips = start_step, 0
    try:
        with tqdm(total=options.steps, initial=start_step) as progress:
            while step < options.steps:
                try:
                    act = next(data)
                except StopIteration:
                    raise RuntimeError(
                        f"the activation source ended at step {step} of {options.steps}; use a repeating "
                        "text source or fewer --steps"
                    ) from None
                act = act.to(dtype=options.autocast_dtype)
                if norm_factor is not None:
                    act = act / norm_factor
                if options.skip_nonfinite and act.ndim == 2 and act.shape[-1] == width and not torch.isfinite(act).all():
                    skipped_at.append(step)
                    consecutive_skips += 1
                    if consecutive_skips > options.max_consecutive_skips:
                        raise NonFiniteError(
                            f"{consecutive_skips} activation batches in a row contained NaN/Inf (at step {step}); "
                            "the data source itself is broken (check the model dtype and inputs)"
                        )
                    continue
                check_activations(act, width, step)
                consecutive_skips = 0
                if (options.use_wandb or options.verbose) and step % options.log_steps == 0:
                    saved = [_side_effect_state(t) for t in trainers]
                    log_stats(trainers, step, act, False, False, log_queues=queues, verbose=options.verbose)
                    for trainer, s in zip(trainers, saved):
                        _restore_side_effect_state(trainer, s)
                for i, trainer in enumerate(trainers):
                    with autocast:
                        loss = trainer.update(step, act)
                    if loss is not None and not math.isfinite(loss):
                        raise NonFiniteError(
                            f"trainer_{i} ({type(trainer).__name__}): loss became {loss} at step {step}; "
                            "training stopped and this step's weights are discarded. Lower the learning "
                            "rate or check the activations."
                        )
                step += 1
                progress.update(1)
                if options.checkpoint_every and (step % options.checkpoint_every == 0 or step == options.steps):
                    save_checkpoint(step, seconds_before + time.time() - started)
    finally:
        for queue in queues:
            queue.put("DONE")
        for process in processes:
            process.join()

    for i, trainer in enumerate(trainers):
        if norm_factor is not None:
            trainer.ae.scale_biases(norm_factor)
        save_torch({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, save_dir / f"trainer_{i}" / "ae.pt")
    write_trainer_configs(save_dir, trainers, buffer_config, norm_factor)
    return LoopResult(
        trainers=trainers, steps=step, skipped_batches=len(skipped_at), norm_factor=norm_factor,
        resumed_from_step=resumed_from, train_seconds=seconds_before + time.time() - started,
        skipped_at_steps=skipped_at,
    )
