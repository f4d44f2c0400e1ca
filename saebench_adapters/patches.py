"""Temporary changes to SAEBench's and TransformerLens's world while an eval runs, each undone on exit:
attribute patches, an injected model, captured error logs, and the global state the evals change."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from dictionary_learning_ext.errors import EvalError
from dictionary_learning_ext.rng import preserved_rng_state


@contextlib.contextmanager
def preserved_global_state(cwd: Optional[Path] = None) -> Iterator[None]:
    """Run the body in ``cwd`` (created if needed); afterwards restore grad mode, the global random
    generators and the working directory (SCR/TPP leave grad off, absorption turns it on, every eval
    reseeds, and SAEBench reads and writes relative to the working directory)."""
    grad = torch.is_grad_enabled()
    old_cwd = os.getcwd()
    with preserved_rng_state():
        try:
            if cwd is not None:
                cwd.mkdir(parents=True, exist_ok=True)
                os.chdir(cwd)
            yield
        finally:
            os.chdir(old_cwd)
            torch.set_grad_enabled(grad)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration (class attributes restored from ``__dict__``, so an
    inherited attribute is not copied onto the subclass)."""
    sentinel = object()
    old = obj.__dict__.get(name, sentinel) if isinstance(obj, type) else getattr(obj, name, sentinel)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is sentinel:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def injected_models(models: Mapping[str, Any]) -> Iterator[None]:
    """``HookedTransformer.from_pretrained_no_processing(name, ...)`` returns ``models[name]`` (moved to
    the requested device) for the names given; other names go to TransformerLens as usual. SAEBench's
    evals load their model by name, so this is how a model object reaches them."""
    if not models:
        yield
        return
    from transformer_lens import HookedTransformer

    original = HookedTransformer.from_pretrained_no_processing

    def from_pretrained_no_processing(model_name: str, *args: Any, **kwargs: Any):
        if model_name not in models:
            return original(model_name, *args, **kwargs)
        model = models[model_name]
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        if device is not None:
            model = model.to(device)
        if dtype is not None and dtype != model.cfg.dtype:
            raise EvalError(
                f"the eval asked for {model_name} in {dtype} but the injected model is {model.cfg.dtype}; "
                "pass --llm-dtype matching the model"
            )
        return model

    with patched(HookedTransformer, "from_pretrained_no_processing", staticmethod(from_pretrained_no_processing)):
        yield


@contextlib.contextmanager
def captured_logs(logger_name: str) -> Iterator[list[str]]:
    """The messages logged at ERROR or above by ``logger_name`` during the body (SAEBench's core eval
    logs some failures instead of raising them)."""
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Handler(level=logging.ERROR)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators seeded for the duration, their states restored after
    (for SAEBench code that draws from them without seeding them itself)."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
