"""Data-parallel training under ``torchrun``: N ranks train the same SAEs, each on its slice of every
global batch, with the weights of a 1-process run on the same global batches (up to float rounding).

    torchrun --nproc_per_node 2 -m experiments.train --architectures top_k ... --batch-size 4096

The train CLI under torchrun (``WORLD_SIZE`` > 1; ``train_run(..., data_parallel=True)``) opens a process
group (NCCL on CUDA, gloo on CPU) with a time-out on every collective (``--collective-timeout``). A
1-process run opens none and takes exactly the code path it always took (nothing here is installed, so
its weights are the same bit for bit), as does any other caller of ``train_run`` under torchrun (a sweep
whose ranks are shards training different runs).

The data: every rank reads the same stream (the same seed gives the same live buffer, or the same
shuffled order of a cache) and keeps rows ``[rank * B/N, (rank + 1) * B/N)`` of each global batch of B
rows (``RankSlice``; a cache reads only those rows). The data position is global, so a checkpoint
(written by rank 0) resumes on any number of ranks. Every step the ranks agree on the batch first (one
small all-reduce): a rank whose source ended or returned a short batch, or a batch with NaN/Inf on any
rank, stops (or skips) the step on every rank with one clear error, instead of one rank hanging in the
next collective.

The trainers are not rewritten: ``DataParallelTrainers`` wraps them with hooks, active only while the
loop calls ``trainer.update`` (logging and evaluation see the plain trainers):

* gradients are averaged across ranks (all-reduce SUM, then / N, in one flat float32 buffer per
  trainer) just before they are first read: in ``clip_grad_norm_`` (clipping must see the global
  gradient), else in an optimizer step pre-hook. The decoder-gradient projection before the clip is
  linear, so it commutes with the average.
* everything that reads "the batch" sees the global batch: the geometric-median init of ``b_dec`` at
  step 0 and VSAETopK's resampling run on the gathered batch; the dead-latent counters
  (``LatentActivityTracker`` and TopKTrainer's ``num_tokens_since_fired``) take the union of the ranks'
  fired latents and the global token count, so auxK's dead mask is the 1-process one; auxK's
  normalisation (the residual's variance over the batch) is the global batch's; TopKTrainer's threshold
  EMA reads the gathered top-k activations; free bits clamp the global per-latent KL.
* trainer noise: every rank draws the noise of the whole global batch from the trainer's generator (same
  seed on every rank) and keeps its rows, so the noise is the 1-process run's and the generators stay
  in step.
* the activation norm factor is measured on gathered batches; the kernel choices that depend on the
  batch size (VSAETopK's sparse step, MP-SAE's Gram path) take the global batch size.

dictionary_learning's TopKTrainer needed care in four places, all inside its ``loss``/``update``: the
geometric median at step 0, ``num_tokens_since_fired`` (counted from the local top-k indices),
``get_auxiliary_loss`` (dead mask from those counters, normalised by the local residual variance: it is
re-implemented here with the global one, otherwise line for line) and ``update_threshold`` (an EMA of
the batch mean of each row's smallest top-k activation). BatchTopKTrainer selects its top-(k B) over the
whole batch and is refused, as are resampling StandardTrainers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from dictionary_learning_ext.errors import UsageError, VsaeError

DEFAULT_TIMEOUT_S = 600
"""Seconds a collective waits for the other ranks (``RunConfig.collective_timeout``'s default)."""


class DistributedError(VsaeError, RuntimeError):
    """A collective failed: another rank died, hung or stopped with its own error."""

    exit_code = 1


def world_size_from_env() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place in the process group, and the collectives the training needs, each failing
    with a ``DistributedError`` that says which step of the run waited for the others."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    """Where collective buffers live (the rank's GPU for NCCL, the CPU for gloo)."""
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- errors ------------------------------------------------------------------------------
    def _fail(self, what: str, err: BaseException) -> DistributedError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return DistributedError(
            f"rank {self.rank} of {self.world}: {what} failed ({first[:300]}). Another rank died, hung or stopped "
            f"with its own error (see its output), or did not arrive within --collective-timeout "
            f"{self.timeout_s:g} s"
        )

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as err:  # DistBackendError, gloo's "Connection reset by peer"/"Timed out", ...
            raise self._fail(what, err) from err

    # --- collectives ---------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum", what: str = "all-reduce") -> torch.Tensor:
        """In place (for a tensor on another device than the collectives', through a copy)."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        buf = tensor if tensor.device == self.device else tensor.to(self.device)
        self._run(what, lambda: dist.all_reduce(buf, op=ops[op]))
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def any(self, mask: torch.Tensor, what: str) -> torch.Tensor:
        """Elementwise OR of a bool tensor over the ranks."""
        buf = mask.to(device=self.device, dtype=torch.uint8)
        self._run(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX))
        return buf.to(device=mask.device, dtype=torch.bool)

    def gather_rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """The ranks' tensors concatenated along dim 0 in rank order (equal shapes on every rank: the
        rank slices of one global batch give that batch back)."""
        buf = x.detach().contiguous().to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        self._run(what, lambda: dist.all_gather(parts, buf))
        return torch.cat(parts).to(x.device)

    def broadcast_(self, tensor: torch.Tensor, what: str) -> None:
        """Rank 0's values into ``tensor`` on every rank."""
        buf = tensor.data if tensor.device == self.device else tensor.data.to(self.device)
        self._run(what, lambda: dist.broadcast(buf, src=0))
        if buf is not tensor.data:
            tensor.data.copy_(buf)

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj if self.is_main else None]
        self._run(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self, what: str) -> None:
        if self.backend == "gloo":  # names the ranks that did not arrive
            timeout = datetime.timedelta(seconds=self.timeout_s)
            self._run(what, lambda: dist.monitored_barrier(timeout=timeout, wait_all_ranks=True))
        else:
            self._run(what, lambda: dist.barrier())

    # --- the per-step agreement on the batch --------------------------------------------------
    def agree_on_batch(self, act: Optional[torch.Tensor], expected_rows: Optional[int], step: int) -> bool:
        """Check with every rank that each has a batch of the same size; returns whether any rank's batch
        holds NaN/Inf. Raises (on every rank alike) when a source ended or a batch is short."""
        local = torch.tensor([
            1 if act is None else 0,
            0 if act is None or act.numel() == 0 or bool(torch.isfinite(act).all()) else 1,
            0 if act is None else act.shape[0],
            0 if act is None else -act.shape[0],
        ], dtype=torch.int64)
        self.all_reduce_(local, "max", what=f"agreeing on the batch of step {step}")
        ended, nonfinite, most, fewest = local[0].item(), local[1].item(), local[2].item(), -local[3].item()
        if ended:
            raise DistributedError(
                f"the activation source of a rank ended at step {step}; use a repeating text source, a "
                "cache (--activations), or fewer --steps"
            )
        if most != fewest or (expected_rows is not None and fewest != expected_rows):
            raise DistributedError(
                f"uneven batches at step {step}: the ranks hold between {fewest} and {most} rows, expected "
                f"{expected_rows} each (a short last batch, or shards of unequal size); data-parallel training "
                "needs every global batch full"
            )
        return bool(nonfinite)


def init(rank: int, world: int, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
         init_method: Optional[str] = None, local_rank: Optional[int] = None) -> Dist:
    """Join the process group (NCCL for a CUDA ``device``, gloo otherwise)."""
    local_rank = rank if local_rank is None else local_rank
    if device.startswith("cuda"):
        if ":" in device:
            raise UsageError(f"under torchrun give --device cuda, not {device!r}: each rank trains on cuda:LOCAL_RANK")
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU, for the trainers too
        backend, comm_device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, comm_device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local_rank, backend=backend, device=comm_device, timeout_s=timeout_s)


@contextlib.contextmanager
def session(device: str, timeout_s: Optional[float], enabled: bool = True) -> Iterator[Optional[Dist]]:
    """The process group torchrun asked for, left on exit; None (a plain 1-process run) outside torchrun or
    when not ``enabled`` (a caller whose torchrun ranks do other work, e.g. a sharded sweep)."""
    world = world_size_from_env()
    if world <= 1 or not enabled:
        yield None
        return
    rank = int(os.environ["RANK"])
    group = init(rank, world, device, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
                 local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    try:
        yield group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_main_first(group: Optional[Dist], fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on rank 0 (or alone); the other ranks get its result, or raise its error. For the checks and
    folder work that only rank 0 does before every rank starts training."""
    if group is None:
        return fn()
    if group.is_main:
        try:
            result = fn()
        except BaseException as err:
            group.broadcast_object(("error", err), what)
            raise
        group.broadcast_object(("ok", result), what)
        return result
    status, value = group.broadcast_object(None, what)
    if status == "error":
        raise value
    return value


# --- the data ----------------------------------------------------------------------------------
class RankSlice:
    """This rank's rows of every global batch of ``data`` (a stream every rank reads identically); its
    position, config and evaluation are the stream's own. A stream with ``next_slice(rank, world)`` (the
    activation cache) reads only those rows."""

    def __init__(self, data: Any, group: Dist):
        self.data, self.group = data, group
        self.global_rows: Optional[int] = None

    def __iter__(self) -> "RankSlice":
        return self

    def __next__(self) -> torch.Tensor:
        take = getattr(self.data, "next_slice", None)
        if take is not None:
            return take(self.group.rank, self.group.world)
        batch = next(self.data)
        if self.global_rows is None:
            self.global_rows = batch.shape[0]
        # A short batch gives every rank a short slice, which the loop's agreement on the batch reports.
        rows = batch.shape[0] // self.group.world
        return batch[self.group.rank * rows:(self.group.rank + 1) * rows]

    def expected_rows(self) -> Optional[int]:
        """Rows each rank's slice must hold (None until the global batch size is known)."""
        size = getattr(self.data, "batch_size", None) if hasattr(self.data, "next_slice") else self.global_rows
        if size is None:
            return None
        if size % self.group.world:
            raise UsageError(f"the global batch of {size} rows does not split evenly over {self.group.world} ranks; "
                             "choose a --batch-size divisible by the number of processes")
        return size // self.group.world

    @property
    def config(self) -> Any:
        return getattr(self.data, "config", None)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)


class Gathered:
    """Global batches from the ranks' slices (every rank calls ``next`` together): for statistics that a
    1-process run computes on whole batches, e.g. ``get_norm_factor``."""

    def __init__(self, data: RankSlice, group: Dist, first_step: int = 0):
        self.data, self.group, self.step = data, group, first_step

    def __iter__(self) -> "Gathered":
        return self

    def __next__(self) -> torch.Tensor:
        try:
            act = next(self.data)
        except StopIteration:
            act = None
        self.group.agree_on_batch(act, self.data.expected_rows(), self.step)
        self.step += 1
        return self.group.gather_rows(act, "gathering a batch for the norm factor")


# --- the trainers ------------------------------------------------------------------------------
SUPPORTED = ("TopKTrainer", "VSAETopKTrainer", "MPSAETrainer", "VSAETrainer", "StandardTrainer",
             "StandardTrainerAprilUpdate")


def check_supported(trainers: Sequence[Any]) -> None:
    for i, trainer in enumerate(trainers):
        name = type(trainer).__name__
        if name not in SUPPORTED:
            raise UsageError(
                f"trainer_{i} ({name}) cannot train data-parallel: its update reads statistics of the whole batch "
                f"that are not synchronised across ranks. Architectures that can: {list(SUPPORTED)}; train this one "
                "in a single process"
            )
        if getattr(trainer, "resample_steps", None) is not None and name.startswith("Standard"):
            raise UsageError(f"trainer_{i} ({name}) resamples neurons from the local batch; data-parallel training "
                             "supports StandardTrainer without resample_steps only")


class DataParallelTrainers:
    """The hooks that make N ranks' ``trainer.update(step, local_slice)`` calls the 1-process
    ``trainer.update(step, global_batch)`` (see the module docstring). Active only inside ``step()``."""

    def __init__(self, group: Dist, trainers: Sequence[Any]):
        check_supported(trainers)
        self.group, self.trainers = group, list(trainers)
        self.active = False
        self.local_rows = 0
        self._synced: set[int] = set()
        self._owner: dict[int, Any] = {}
        for trainer in self.trainers:
            self._install(trainer)

    @property
    def global_rows(self) -> int:
        return self.local_rows * self.group.world

    # --- setup ----------------------------------------------------------------------------------
    def broadcast_state(self) -> None:
        """Rank 0's weights and buffers on every rank (they are equal already: same seed, or the same
        checkpoint; this makes sure, as DDP does)."""
        for i, trainer in enumerate(self.trainers):
            for name, value in trainer.ae.state_dict(keep_vars=True).items():
                self.group.broadcast_(value, f"sharing trainer_{i}.ae.{name}")

    def _install(self, trainer: Any) -> None:
        for p in trainer.ae.parameters():
            self._owner[id(p)] = trainer
        trainer.optimizer.register_step_pre_hook(lambda *_, t=trainer: self._sync_grads(t) if self.active else None)
        trainer.optimizer.register_step_post_hook(lambda *_, t=trainer: self._synced.discard(id(t)))
        activity = getattr(trainer, "activity", None)
        if activity is not None:
            activity.update = self._wrap_activity(activity.update)
        name = type(trainer).__name__
        if name == "TopKTrainer":
            self._install_topk(trainer)
        if name == "VSAETopKTrainer":
            self._install_vsae_topk(trainer)
        if hasattr(trainer.ae, "uses_gram"):  # MP-SAE: the kernel choice depends on the batch size
            orig_uses_gram = trainer.ae.uses_gram
            trainer.ae.uses_gram = lambda batch_size, steps: orig_uses_gram(
                batch_size * self.group.world if self.active else batch_size, steps)

    def _wrap_activity(self, orig: Callable) -> Callable:
        def update(fired_F: torch.Tensor, num_tokens: int) -> None:
            if self.active:
                fired_F = self.group.any(fired_F, "sharing which latents fired")
                num_tokens = num_tokens * self.group.world
            return orig(fired_F, num_tokens)
        return update

    def _install_topk(self, trainer: Any) -> None:
        orig_loss, orig_aux, orig_threshold = trainer.loss, trainer.get_auxiliary_loss, trainer.update_threshold
        pending: dict[str, int] = {}

        def sync_counts() -> None:
            # Its loss() just did n += b_local; n[fired locally] = 0. A latent is at 0 exactly when it fired
            # here (b_local > 0), so the 1-process counters follow: n += B - b_local; n[fired anywhere] = 0.
            b_local = pending.pop("rows")
            n = trainer.num_tokens_since_fired
            fired = self.group.any(n == 0, "sharing which latents fired")
            n.add_(self.global_rows - b_local).masked_fill_(fired, 0)

        def loss(x, step=None, logging=False):
            if not self.active:
                return orig_loss(x, step=step, logging=logging)
            pending["rows"] = x.shape[0]
            out = orig_loss(x, step=step, logging=logging)
            if "rows" in pending:  # auxK off: nothing read the counters inside loss()
                sync_counts()
            return out

        def get_auxiliary_loss(residual_BD, post_relu_acts_BF):
            if not self.active:
                return orig_aux(residual_BD, post_relu_acts_BF)
            if "rows" in pending:
                sync_counts()
            return _topk_auxiliary_loss(trainer, residual_BD, post_relu_acts_BF, self._residual_variance)

        def update_threshold(top_acts_BK):
            if self.active:
                top_acts_BK = self.group.gather_rows(top_acts_BK, "gathering top-k activations for the threshold")
            return orig_threshold(top_acts_BK)

        trainer.loss, trainer.get_auxiliary_loss, trainer.update_threshold = loss, get_auxiliary_loss, update_threshold

    def _install_vsae_topk(self, trainer: Any) -> None:
        orig_resample, orig_sparse, orig_kl = trainer.resample_dead_latents, trainer.uses_sparse_step, trainer.kl_loss

        def resample_dead_latents(x_BD):
            if self.active:
                x_BD = self.group.gather_rows(x_BD, "gathering the batch for resampling")
            return orig_resample(x_BD)

        def uses_sparse_step(batch_size):
            return orig_sparse(batch_size * self.group.world if self.active else batch_size)

        def kl_loss(kl_BX, idx_BK):
            if not self.active or trainer.cfg.free_bits <= 0:
                return orig_kl(kl_BX, idx_BK)
            return self._free_bits_kl(trainer, kl_BX, idx_BK)

        trainer.resample_dead_latents, trainer.uses_sparse_step, trainer.kl_loss = (
            resample_dead_latents, uses_sparse_step, kl_loss)

    # --- the step -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, local_rows: int) -> Iterator[None]:
        """Hooks on for one ``update`` of every trainer on a local slice of ``local_rows`` rows."""
        import dictionary_learning.trainers.top_k as dl_top_k

        import dictionary_learning_ext.auxk as auxk
        import dictionary_learning_ext.gaussian as gaussian
        import dictionary_learning_ext.trainer_base as trainer_base
        import dictionary_learning_ext.vsae_topk as vsae_topk
        import dictionary_learning_ext.vsae_topk_sparse as vsae_topk_sparse

        patches = [
            (trainer_base, "geometric_median", self._gathered(trainer_base.geometric_median, "geometric median")),
            (dl_top_k, "geometric_median", self._gathered(dl_top_k.geometric_median, "geometric median")),
            (auxk, "normalized_aux_mse", self._normalized_aux_mse),
            (vsae_topk_sparse, "normalized_aux_mse", self._normalized_aux_mse),
            (gaussian, "sample_noise", self._sample_noise),
            (vsae_topk, "sample_noise", self._sample_noise),
            (torch.nn.utils, "clip_grad_norm_", self._clip_grad_norm(torch.nn.utils.clip_grad_norm_)),
        ]
        saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
        for module, name, value in patches:
            setattr(module, name, value)
        self.local_rows, self.active = local_rows, True
        try:
            yield
        finally:
            self.active = False
            self._synced.clear()
            for module, name, value in saved:
                setattr(module, name, value)

    def _sync_grads(self, trainer: Any) -> None:
        """Average this trainer's gradients over the ranks (once per step): SUM, then / N."""
        if id(trainer) in self._synced:
            return
        params = list(trainer.ae.parameters())
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        flat = torch.zeros(total + len(params), dtype=torch.float32, device=self.group.device)
        offset = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                flat[offset:offset + n] = p.grad.detach().reshape(-1)
                flat[total + i] = 1
            offset += n
        self.group.all_reduce_(flat, "sum", what=f"averaging the gradients of {type(trainer).__name__}")
        offset = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            have = int(flat[total + i].item())
            if have not in (0, self.group.world):
                raise DistributedError(f"{type(trainer).__name__}: a parameter got a gradient on {have} of "
                                       f"{self.group.world} ranks; the ranks' steps diverged")
            if have:
                mean = (flat[offset:offset + n] / self.group.world).view(p.shape)
                p.grad.copy_(mean.to(device=p.grad.device, dtype=p.grad.dtype))
            offset += n
        self._synced.add(id(trainer))

    def _clip_grad_norm(self, orig: Callable) -> Callable:
        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            owner = self._owner.get(id(params[0])) if params else None
            if owner is not None:
                self._sync_grads(owner)  # the norm is the global gradient's
            return orig(params, max_norm, *args, **kwargs)
        return clip_grad_norm_

    def _gathered(self, orig: Callable, what: str) -> Callable:
        def on_global_batch(points, *args, **kwargs):
            return orig(self.group.gather_rows(points, f"gathering the first batch for the {what}"), *args, **kwargs)
        return on_global_batch

    def _sample_noise(self, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The rows of this rank in the noise a 1-process run draws for the global batch."""
        if like.ndim == 0 or like.shape[0] != self.local_rows:
            raise DistributedError(f"noise of shape {tuple(like.shape)} is not one row per token of the batch "
                                   f"({self.local_rows} rows on this rank); it cannot be split across ranks")
        full = torch.randn((self.global_rows, *like.shape[1:]), generator=generator, device=like.device,
                           dtype=like.dtype)
        return full[self.group.rank * self.local_rows:(self.group.rank + 1) * self.local_rows]

    def _residual_variance(self, residual_BD: torch.Tensor) -> torch.Tensor:
        """Mean over the global batch of ||r - mean(r)||^2 (two all-reduces; no gradient)."""
        residual_BD = residual_BD.detach().float()
        total_D = self.group.all_reduce_(residual_BD.sum(dim=0), what="auxK's residual mean")
        mean_D = total_D / self.global_rows
        spread = self.group.all_reduce_((residual_BD - mean_D).square().sum().reshape(1), what="auxK's residual variance")
        return spread[0] / self.global_rows

    def _normalized_aux_mse(self, residual_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
        """``auxk.normalized_aux_mse`` with the global batch's residual variance as the denominator."""
        residual_BD = residual_BD.detach().float()
        l2 = (residual_BD - recon_BD.float()).square().sum(dim=-1).mean()
        denom = self._residual_variance(residual_BD)
        return (l2 / denom.clamp_min(1e-12)).nan_to_num(0.0)

    def _free_bits_kl(self, trainer: Any, kl_BX: torch.Tensor, idx_BK: Optional[torch.Tensor]) -> torch.Tensor:
        """VSAETopK's free-bits KL, sum_j max(mean over the global batch of kl_j, floor): the value of the
        global batch, with a gradient whose average over the ranks is the 1-process gradient."""
        floor = trainer.cfg.free_bits
        if idx_BK is None:
            local_F = kl_BX.sum(dim=0)
        else:
            local_F = torch.zeros(trainer.cfg.dict_size, dtype=kl_BX.dtype, device=kl_BX.device)
            local_F = local_F.index_add(0, idx_BK.reshape(-1), kl_BX.reshape(-1))
        global_F = self.group.all_reduce_(local_F.detach().clone(), what="the free-bits KL") / self.global_rows
        open_F = (global_F >= floor).to(local_F.dtype)  # where clamp_min passes the gradient
        surrogate = (open_F * local_F).sum() / self.local_rows
        kl = global_F.clamp_min(floor).sum() + surrogate - surrogate.detach()
        return kl / kl_BX.shape[-1] if trainer.cfg.kl_normalize else kl


def _topk_auxiliary_loss(trainer: Any, residual_BD: torch.Tensor, post_relu_acts_BF: torch.Tensor,
                         residual_variance: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """dictionary_learning 0.1.0's ``TopKTrainer.get_auxiliary_loss`` line for line, with the normalising
    variance computed by ``residual_variance`` (the global batch's under data parallelism)."""
    dead_features = trainer.num_tokens_since_fired >= trainer.dead_feature_threshold
    trainer.dead_features = int(dead_features.sum())
    if trainer.dead_features > 0:
        k_aux = min(trainer.top_k_aux, trainer.dead_features)
        auxk_latents = torch.where(dead_features[None], post_relu_acts_BF, -torch.inf)
        auxk_acts, auxk_indices = auxk_latents.topk(k_aux, sorted=False)
        auxk_buffer_BF = torch.zeros_like(post_relu_acts_BF)
        auxk_acts_BF = auxk_buffer_BF.scatter_(dim=-1, index=auxk_indices, src=auxk_acts)
        x_reconstruct_aux = trainer.ae.decoder(auxk_acts_BF)
        l2_loss_aux = (residual_BD.float() - x_reconstruct_aux.float()).pow(2).sum(dim=-1).mean()
        trainer.pre_norm_auxk_loss = l2_loss_aux
        normalized_auxk_loss = l2_loss_aux / residual_variance(residual_BD)
        return normalized_auxk_loss.nan_to_num(0.0)
    trainer.pre_norm_auxk_loss = -1
    return torch.tensor(0, dtype=residual_BD.dtype, device=residual_BD.device)
