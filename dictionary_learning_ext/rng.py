"""Save and restore the global random state (torch, CUDA, Python, NumPy) in one place: used by
training checkpoints and to keep third-party code (SAEBench's evals reseed) from changing it."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def global_rng_state() -> dict[str, Any]:
    """A torch-saveable (``weights_only``) snapshot of every global generator."""
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


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Whatever the body draws or reseeds, the global generators are as before afterwards."""
    state = global_rng_state()
    try:
        yield
    finally:
        set_global_rng_state(state)
