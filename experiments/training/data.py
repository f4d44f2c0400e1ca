"""The activation stream a run trains on: dictionary_learning's ``ActivationBuffer`` with its own RNG
and a saveable position.

The buffer draws with ``torch.randperm`` on the global RNG, so the data order would otherwise depend on
how much randomness the trainers used; ``BufferStream`` runs it on an RNG of its own. A checkpoint stores
the buffer's unread activations and the number of texts consumed; resuming copies those back and skips
that many texts (reading text only; no language-model forward pass), so the cost of a resume does not
grow with the run's length; the price is checkpoint size (at most the buffer, n_ctxs x ctx_len x d_model).

A run with ``--activations`` reads a cache instead (``experiments.training.cache``); ``make_source`` picks.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from dictionary_learning_ext.errors import CheckpointError


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


def make_buffer(config, lm) -> BufferStream:
    """dictionary_learning's ActivationBuffer for a ``RunConfig`` on a loaded model, wrapped with its own
    RNG and a saveable position."""
    from dictionary_learning import ActivationBuffer

    from experiments.lm.corpus import text_source

    texts = CountingIterator(text_source(config.text, tokenizer=lm.model.tokenizer, seed=config.seed,
                                         ctx_len=config.ctx_len))
    buffer = ActivationBuffer(
        data=texts,
        model=lm.model,
        submodule=lm.submodule,
        d_submodule=lm.d_model,
        n_ctxs=config.n_ctxs,
        ctx_len=config.ctx_len,
        refresh_batch_size=config.refresh_batch_size,
        out_batch_size=config.batch_size,
        device=config.device,
    )
    return BufferStream(buffer, texts, seed=config.seed)


def make_source(config, lm=None):
    """The run's activation stream: the live buffer on ``lm`` (a ``LoadedModel``), or, with
    ``config.activations``, that cache, checked against the run (``lm``, when given, also for the width and
    the hook site, and for the evaluation's loss recovered)."""
    if config.activations is None:
        return make_buffer(config, lm)
    from experiments.training.cache import DEFAULT_WINDOW_SHARDS, ActivationCache, CachedActivations

    cache = ActivationCache(config.activations)
    cache.check_run(config, lm)
    window = config.cache_window_shards if config.cache_window_shards is not None else DEFAULT_WINDOW_SHARDS
    return CachedActivations(cache, config.batch_size, seed=config.seed, window_shards=window, device=config.device,
                             lm=lm)
