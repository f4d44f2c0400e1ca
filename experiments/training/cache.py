"""An activation cache: one language-model pass written to disk, read by any number of training runs.

    python -m experiments.cache_activations --model default --layer 0 --text local --tokens 2000000 --out cache/
    python -m experiments.train --activations cache/ --model default --layer 0 --architectures top_k ...

A cache folder holds fixed-size shards ``shard_000000.npy`` ... (NumPy ``.npy``, rows of ``d_model``
activations, one per token, in text order) and ``manifest.json``: the model, layer, hook site, tokenizer,
dtype, width, token count, shard size, each shard's sha256 and the text position it starts at. Every file
is written atomically and the manifest after each shard, so a killed writer leaves complete shards only;
running the same command again verifies them and continues after the last good one (the text source is
deterministic: it skips the texts already read and re-runs at most one language-model batch).

The activations are the ones ``ActivationBuffer`` collects (the same nnsight trace, padding dropped by the
attention mask), in the model's dtype or bfloat16 (``--dtype``).

Training (``CachedActivations``) reads the shards in a seeded shuffled order with bounded memory: each pass
over the cache takes the shards in a random order, ``cache_window_shards`` at a time; the rows of such a
window are shuffled together and served in batches (a batch may straddle two windows, or two passes). The
order is a function of the run's seed and the cache alone, so the data position is one number (rows
read), checkpoints stay small and a resume continues bit for bit. Only the shards of the current window
are mapped (memory-mapped: the OS pages in what is read, and ranks on one machine share those pages), and
under data parallelism each rank reads only the rows of its slice. Each shard's sha256 is checked the first
time a process maps it.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch

from dictionary_learning_ext.config import check_field_types
from dictionary_learning_ext.errors import CheckpointError, ConfigError, DataError, MissingFileError, UsageError
from dictionary_learning_ext.io import read_json, remove_stale_temp_files, write_json, write_with

CACHE_FORMAT = "vsae-activation-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
DEFAULT_WINDOW_SHARDS = 4
CacheDtype = Literal["float32", "bfloat16"]
# torch dtype, and the NumPy dtype of the stored bytes (NumPy has no bfloat16: its bits as uint16)
DTYPES = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, np.uint16)}
SOURCE_FIELDS = ("model", "layer", "text", "ctx_len", "refresh_batch_size", "seed", "device")
"""The RunConfig fields a cache is written with (same meaning, same option)."""
IDENTITY = ("model_spec", "layer", "text", "ctx_len", "refresh_batch_size", "seed", "dtype", "shard_tokens")
"""What a continued write must share with the cache it continues (the device may change; the token count grow)."""


@dataclass(frozen=True)
class CacheOptions:
    """The options of an activation cache that a training run does not have (the rest are RunConfig's)."""

    out: Optional[str] = None
    """Cache folder: shards and manifest.json. Running the same command again continues an interrupted write."""
    tokens: Optional[int] = None
    """Activations (one per token) to cache."""
    shard_tokens: int = 65536
    """Activations per shard file (the last may hold fewer); training maps a few shards at a time."""
    dtype: CacheDtype = "float32"
    """Stored dtype: float32 keeps the model's activations exactly; bfloat16 halves the disk and serves only runs
    with --autocast-dtype bfloat16."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.out is None:
            raise UsageError("--out is required: the folder to write the cache into")
        if self.tokens is None or self.tokens <= 0:
            raise UsageError(f"--tokens must be a positive number of activations, got {self.tokens}")
        if self.shard_tokens <= 0:
            raise UsageError(f"--shard-tokens must be a positive integer, got {self.shard_tokens}")


def cache_command(manifest: dict[str, Any], folder: Path) -> str:
    """The command that writes (or continues, or repairs) the cache ``manifest`` describes."""
    return (f"python -m experiments.cache_activations --model {manifest['model_spec']} --layer {manifest['layer']} "
            f"--text {manifest['text']} --tokens {manifest['tokens_requested']} --out {folder} "
            f"--ctx-len {manifest['ctx_len']} --refresh-batch-size {manifest['refresh_batch_size']} "
            f"--seed {manifest['seed']} --shard-tokens {manifest['shard_tokens']} --dtype {manifest['dtype']}")


def canonical_model(name: str) -> str:
    from experiments.lm.models import DEFAULT_ALIASES, DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if name in DEFAULT_ALIASES else name


# --- the language model's activations ------------------------------------------------------------
@torch.no_grad()
def extract_activations(lm: Any, texts: list[str], ctx_len: int) -> torch.Tensor:
    """(tokens, d_model) activations of ``texts`` at ``lm.submodule``, padding dropped: what
    ``ActivationBuffer.refresh`` collects from one batch of texts (same trace, same truncation)."""
    from dictionary_learning.buffer import tracer_kwargs

    with lm.model.trace(texts, **tracer_kwargs, invoker_args={"truncation": True, "max_length": ctx_len}):
        hidden_states = lm.submodule.output.save()
        inputs = lm.model.inputs.save()
        lm.submodule.output.stop()
    attn_mask = inputs.value[1]["attention_mask"]
    hidden_states = hidden_states.value
    if isinstance(hidden_states, tuple):
        hidden_states = hidden_states[0]
    return hidden_states[attn_mask != 0]


def to_numpy(rows: torch.Tensor, dtype: str) -> np.ndarray:
    rows = rows.detach().to(device="cpu", dtype=DTYPES[dtype][0]).contiguous()
    return rows.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else rows.numpy()


def from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class _Hashing:
    """A write-only file that also feeds what it writes to a hash."""

    def __init__(self, fh: Any, digest: Any):
        self.fh, self.digest = fh, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another process is writing the cache {folder}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


# --- writing -------------------------------------------------------------------------------------
def _check_continues(old: dict[str, Any], new: dict[str, Any], folder: Path) -> None:
    if old.get("format") != CACHE_FORMAT:
        raise UsageError(f"--out {folder} holds a {MANIFEST} that is not an activation cache of this project; "
                         "choose another folder")
    if old.get("version") != CACHE_VERSION:
        raise UsageError(f"--out {folder} is a version {old.get('version')} cache; this code writes version "
                         f"{CACHE_VERSION}. Choose another folder")
    diff = [k for k in IDENTITY if old.get(k) != new.get(k)]
    if diff:
        raise UsageError(
            f"--out {folder} holds a cache written with other settings: "
            + "; ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
            + ". Continue it with its own settings, or choose another folder"
        )


def _good_prefix(folder: Path, shards: list[dict[str, Any]], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The listed shards up to the first one that is missing or does not match its sha256."""
    for i, shard in enumerate(shards):
        path = folder / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            log(f"{path} is {'missing' if not path.is_file() else 'corrupted'}; rewriting it and the "
                f"{len(shards) - i - 1} shard(s) after it")
            return shards[:i]
    return shards


def write_cache(source: Any, options: CacheOptions, lm: Any = None,
                on_shard: Optional[Callable[[int], None]] = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or continue) the cache ``options.out`` of the activations ``source`` (a RunConfig: model,
    layer, text, ctx_len, refresh_batch_size, seed, device) describes; returns its manifest.
    ``on_shard(i)`` is called after shard i is complete (manifest included)."""
    from experiments.lm.corpus import text_source
    from experiments.training.data import CountingIterator

    log = log or (lambda message: print(message, file=sys.stderr))
    folder = Path(options.out)
    if not folder.resolve().parent.is_dir():
        raise UsageError(f"--out parent {folder.resolve().parent} does not exist; create it first")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder")
    folder.mkdir(exist_ok=True)
    requested = {"model_spec": source.model, "layer": source.layer, "text": source.text, "ctx_len": source.ctx_len,
                 "refresh_batch_size": source.refresh_batch_size, "seed": source.seed, "dtype": options.dtype,
                 "shard_tokens": options.shard_tokens}
    with _locked(folder):
        remove_stale_temp_files(folder)
        old = read_json(folder / MANIFEST, "cache manifest") if (folder / MANIFEST).is_file() else None
        if old is not None:
            _check_continues(old, requested, folder)
        elif any(p.name != LOCK for p in folder.iterdir()):
            raise UsageError(f"--out {folder} is not empty and holds no {MANIFEST}; choose an empty or new folder")
        if lm is None:
            from experiments.lm.models import load_model

            lm = load_model(source.model, layer=source.layer, device=source.device)
        tokenizer = lm.model.tokenizer
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, **requested,
            "model": lm.name, "hook_name": lm.hook_name, "d_model": lm.d_model, "lm_dtype": str(lm.model.dtype).replace("torch.", ""),
            "tokenizer": {"class": type(tokenizer).__name__, "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
                          "vocab_size": len(tokenizer)},
            "tokens_requested": options.tokens, "tokens": 0, "texts_read": 0, "complete": False,
            "source_exhausted": False, "shards": [],
        }
        shards: list[dict[str, Any]] = []
        if old is not None:
            for key in ("model", "hook_name", "d_model"):
                if old.get(key) != manifest[key]:
                    raise UsageError(f"--out {folder} was written from {key} {old.get(key)!r}, the model loaded now has "
                                     f"{manifest[key]!r}; choose another folder")
            shards = _good_prefix(folder, list(old["shards"]), log)
            manifest["texts_read"] = old.get("texts_read", 0)
            manifest["source_exhausted"] = bool(old.get("source_exhausted")) and len(shards) == len(old["shards"])
        S = options.shard_tokens
        if shards and shards[-1]["tokens"] < S and sum(s["tokens"] for s in shards) < options.tokens \
                and not manifest["source_exhausted"]:
            shards = shards[:-1]  # a short last shard (an earlier, smaller --tokens): rewrite it full
        total = sum(s["tokens"] for s in shards)

        def commit() -> None:
            manifest["shards"], manifest["tokens"] = shards, total
            manifest["complete"] = total >= options.tokens or manifest["source_exhausted"]
            write_json(folder / MANIFEST, manifest)

        if total >= options.tokens or manifest["source_exhausted"]:
            commit()
            return manifest
        start = shards[-1]["end"] if shards else {"texts": 0, "skip": 0}
        texts = CountingIterator(text_source(source.text, tokenizer=tokenizer, seed=source.seed))
        texts.skip(start["texts"])
        rows = None  # the current language-model batch's activations
        batch_at, batch_texts, offset = start["texts"], 0, start["skip"]
        pending: list[torch.Tensor] = []
        pending_rows, shard_start = 0, None
        while total < options.tokens:
            if rows is None or offset == len(rows):
                if rows is not None:
                    batch_at, offset = batch_at + batch_texts, 0
                batch = list(itertools.islice(texts, source.refresh_batch_size))
                if not batch:
                    manifest["source_exhausted"] = True
                    log(f"the text source ended after {texts.count} texts; the cache holds "
                        f"{total + pending_rows} of the {options.tokens} tokens asked for")
                    break
                rows, batch_texts = extract_activations(lm, batch, source.ctx_len), len(batch)
                manifest["texts_read"] = texts.count
                if offset > len(rows):
                    raise DataError(f"the cache continues {offset} rows into a batch of texts that now gives {len(rows)}: "
                                    "the text source or the model changed; write a new cache")
            if shard_start is None:
                shard_start = {"texts": batch_at, "skip": offset}
            take = rows[offset:offset + min(S - pending_rows, options.tokens - total - pending_rows)]
            pending.append(take)
            pending_rows += len(take)
            offset += len(take)
            if pending_rows == S or total + pending_rows == options.tokens:
                end = {"texts": batch_at + batch_texts, "skip": 0} if offset == len(rows) else {"texts": batch_at, "skip": offset}
                shards.append(_write_shard(folder, len(shards), torch.cat(pending), options.dtype, shard_start, end))
                total += pending_rows
                pending, pending_rows, shard_start = [], 0, None
                commit()
                if on_shard is not None:
                    on_shard(len(shards) - 1)
        if pending_rows:  # the source ended: a last, short shard
            end = {"texts": texts.count, "skip": 0}
            shards.append(_write_shard(folder, len(shards), torch.cat(pending), options.dtype, shard_start, end))
            total += pending_rows
        commit()
        return manifest


def _write_shard(folder: Path, index: int, rows: torch.Tensor, dtype: str, start: dict, end: dict) -> dict[str, Any]:
    name = f"shard_{index:06d}.npy"
    array = to_numpy(rows, dtype)
    digest = hashlib.sha256()
    write_with(folder / name, lambda fh: np.lib.format.write_array(_Hashing(fh, digest), array, allow_pickle=False))
    return {"file": name, "tokens": int(array.shape[0]), "sha256": digest.hexdigest(), "start": start, "end": end}


# --- reading -------------------------------------------------------------------------------------
class ActivationCache:
    """A complete cache folder: its manifest, and its shards mapped on demand (each verified against its
    sha256 the first time this process maps it)."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise MissingFileError(
                f"--activations {self.folder}: no {MANIFEST} there; write a cache first with python -m "
                "experiments.cache_activations --out FOLDER ..."
            )
        self.manifest = read_json(self.folder / MANIFEST, "activation cache manifest")
        m = self.manifest
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise DataError(f"--activations {self.folder}: {MANIFEST} is not a version-{CACHE_VERSION} activation cache "
                            "of this project")
        missing = sorted({"complete", "shards", "dtype", "d_model", "model", "layer", "tokens"} - set(m))
        if missing:
            raise DataError(f"--activations {self.folder}: {MANIFEST} lacks {missing}; the folder was edited or damaged")
        if not m["complete"]:
            raise DataError(
                f"--activations {self.folder} is incomplete ({m['tokens']} of {m.get('tokens_requested')} tokens; its "
                f"writer was interrupted); finish it with: {cache_command(m, self.folder)}"
            )
        if not m["shards"]:
            raise DataError(f"--activations {self.folder} holds no activations")
        self.verify = verify
        self._verified: set[int] = set()
        self.dtype: str = m["dtype"]
        self.d_model: int = int(m["d_model"])
        self.sizes = np.array([s["tokens"] for s in m["shards"]], dtype=np.int64)
        self.tokens = int(self.sizes.sum())
        for shard in m["shards"]:
            if not (self.folder / shard["file"]).is_file():
                raise MissingFileError(f"activation cache shard {self.folder / shard['file']} is missing; rewrite it with: "
                                       f"{cache_command(m, self.folder)}")

    @property
    def identity(self) -> str:
        """What a checkpoint records to tell this cache from another: the hash of its shards' hashes."""
        return hashlib.sha256("".join(s["sha256"] for s in self.manifest["shards"]).encode()).hexdigest()

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` memory-mapped, (tokens, d_model)."""
        entry = self.manifest["shards"][index]
        path = self.folder / entry["file"]
        if self.verify and index not in self._verified:
            if file_sha256(path) != entry["sha256"]:
                raise DataError(
                    f"activation cache shard {path} is corrupted (its sha256 differs from the manifest's); rewrite it "
                    f"(and the shards after it) by running the cache's command again: {cache_command(self.manifest, self.folder)}"
                )
            self._verified.add(index)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"activation cache shard {path} cannot be read ({err}); rewrite it with: "
                            f"{cache_command(self.manifest, self.folder)}") from err
        want = (entry["tokens"], self.d_model)
        if array.shape != want or array.dtype != DTYPES[self.dtype][1]:
            raise DataError(f"activation cache shard {path} holds {array.shape} {array.dtype}, the manifest says {want} "
                            f"{self.dtype}; rewrite it with: {cache_command(self.manifest, self.folder)}")
        return array

    def check_run(self, config: Any, lm: Any = None) -> None:
        """Refuse a cache that does not hold the activations the run asks for, naming the field."""
        m, where = self.manifest, f"--activations {self.folder}"
        if canonical_model(config.model) not in (m["model"], canonical_model(m["model_spec"])):
            raise UsageError(f"{where} holds activations of model {m['model']!r}, the run has --model {config.model!r}; "
                             "the model field must match (--model names the model the activations came from)")
        if config.layer != m["layer"]:
            raise UsageError(f"{where} holds activations of layer {m['layer']}, the run has --layer {config.layer}; "
                             "the layer field must match")
        if m["dtype"] != "float32" and m["dtype"] != config.autocast_dtype:
            raise UsageError(f"{where} holds {m['dtype']} activations, the run trains in --autocast-dtype "
                             f"{config.autocast_dtype}; the dtype field must be float32 or the run's")
        if lm is not None:
            if lm.d_model != m["d_model"]:
                raise UsageError(f"{where} holds activations of width (d_model) {m['d_model']}, the model {lm.name!r} "
                                 f"has width {lm.d_model} at --layer {config.layer}; the width field must match")
            if lm.hook_name != m["hook_name"]:
                raise UsageError(f"{where} was read at hook {m['hook_name']!r}, the run reads {lm.hook_name!r}; the "
                                 "hook site must match")
        if self.tokens < config.batch_size:
            raise UsageError(f"{where} holds {self.tokens} activations, fewer than one batch (--batch-size "
                             f"{config.batch_size})")


def _generator(seed: int, *keys: Any) -> torch.Generator:
    """A generator for one shuffle of the stream, from the run's seed and where the shuffle is."""
    digest = hashlib.sha256(":".join(map(str, ("vsae-cache", seed, *keys))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class _Layout:
    """One pass over the cache: its windows (groups of shards) and where each starts in the pass."""

    windows: list[np.ndarray]
    starts: np.ndarray  # (windows + 1,) cumulative rows


class CachedActivations:
    """Training batches from an ``ActivationCache``: the endless stream of its rows in a seeded shuffled
    order (see the module docstring), ``batch_size`` rows at a time, on ``device``. Position: rows read."""

    def __init__(self, cache: ActivationCache, batch_size: int, seed: int, window_shards: int = DEFAULT_WINDOW_SHARDS,
                 device: str = "cpu", lm: Any = None):
        if window_shards < 1:
            raise ConfigError(f"the shuffling window must hold at least one shard, got {window_shards}")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.window_shards, self.device, self.lm = window_shards, device, lm
        self.rows_read = 0
        self._layouts: OrderedDict[int, _Layout] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()
        self._eval_texts: Optional[Iterator[str]] = None

    # --- the order -------------------------------------------------------------------------------
    def _layout(self, epoch: int) -> _Layout:
        if epoch not in self._layouts:
            order = torch.randperm(len(self.cache.sizes), generator=_generator(self.seed, "shards", epoch)).numpy()
            windows = [order[i:i + self.window_shards] for i in range(0, len(order), self.window_shards)]
            starts = np.concatenate([[0], np.cumsum([self.cache.sizes[w].sum() for w in windows])])
            self._layouts[epoch] = _Layout(windows, starts)
            while len(self._layouts) > 2:
                self._layouts.popitem(last=False)
        return self._layouts[epoch]

    def _perm(self, epoch: int, window: int, size: int) -> np.ndarray:
        key = (epoch, window)
        if key not in self._perms:
            self._perms[key] = torch.randperm(size, generator=_generator(self.seed, "rows", epoch, window)).numpy()
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[key]

    def _shard(self, index: int) -> np.ndarray:
        if index in self._mapped:
            self._mapped.move_to_end(index)
        else:
            self._mapped[index] = self.cache.shard(index)
            while len(self._mapped) > 2 * self.window_shards:  # the current window and the next
                self._mapped.popitem(last=False)
        return self._mapped[index]

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows ``[start, start + count)`` of the endless shuffled stream, on ``device``."""
        out = np.empty((count, self.cache.d_model), dtype=DTYPES[self.cache.dtype][1])
        filled = 0
        while filled < count:
            epoch, at = divmod(start + filled, self.cache.tokens)
            layout = self._layout(epoch)
            w = int(np.searchsorted(layout.starts, at, side="right")) - 1
            window = layout.windows[w]
            size = int(layout.starts[w + 1] - layout.starts[w])
            offset = at - int(layout.starts[w])
            n = min(count - filled, size - offset)
            idx = self._perm(epoch, w, size)[offset:offset + n]
            bounds = np.concatenate([[0], np.cumsum(self.cache.sizes[window])])
            which = np.searchsorted(bounds, idx, side="right") - 1
            for j, shard in enumerate(window):
                sel = np.nonzero(which == j)[0]
                if len(sel):
                    local = idx[sel] - bounds[j]
                    order = np.argsort(local, kind="stable")  # ascending reads from the mapped file
                    out[filled + sel[order]] = self._shard(int(shard))[local[order]]
            filled += n
        return from_numpy(out, self.cache.dtype).to(self.device)

    # --- the stream ------------------------------------------------------------------------------
    def __iter__(self) -> "CachedActivations":
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.rows(self.rows_read, self.batch_size)
        self.rows_read += self.batch_size
        return batch

    def next_slice(self, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s rows of the next global batch (``batch_size // world`` of them), reading no others."""
        rows = self.batch_size // world
        part = self.rows(self.rows_read + rank * rows, rows)
        self.rows_read += self.batch_size
        return part

    @property
    def passes(self) -> float:
        """How many times the rows read so far would go through the cache."""
        return self.rows_read / self.cache.tokens

    @property
    def config(self) -> dict[str, Any]:
        """The ``buffer`` entry of each trainer's config.json (ActivationBuffer's keys where they apply)."""
        m = self.cache.manifest
        return {"d_submodule": self.cache.d_model, "io": "out", "n_ctxs": None, "ctx_len": m["ctx_len"],
                "refresh_batch_size": m["refresh_batch_size"], "out_batch_size": self.batch_size, "device": self.device,
                "activations": str(self.cache.folder.resolve()), "cache_tokens": self.cache.tokens,
                "cache_dtype": self.cache.dtype, "window_shards": self.window_shards}

    def state_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "cache": self.cache.identity, "seed": self.seed,
                "window_shards": self.window_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rows_read" not in state:
            raise CheckpointError("the checkpoint was written by a run on a live activation buffer, not on --activations")
        if state["cache"] != self.cache.identity:
            raise CheckpointError(f"the checkpoint read another activation cache than {self.cache.folder} (its shards "
                                  "differ); resume with the --activations the run started with")
        if (state["seed"], state["window_shards"]) != (self.seed, self.window_shards):
            raise CheckpointError("the checkpoint's cache order (seed, window) differs from this run's; resume with "
                                  "the run's own arguments")
        self.rows_read = int(state["rows_read"])

    # --- what the evaluation reads (experiments.training.evaluate.EvalSample.draw) -----------------
    @property
    def buffer(self) -> Any:
        """The language model the evaluation runs (loss recovered), as ``ActivationBuffer`` holds it."""
        if self.lm is None:
            raise ConfigError("evaluating on a cache needs its language model (CachedActivations(..., lm=...))")
        return SimpleNamespace(model=self.lm.model, submodule=self.lm.submodule)

    @contextmanager
    def rng(self) -> Iterator[Any]:
        """For the evaluation: the next batches of the stream (the cache's order needs no RNG) and text
        batches from past the texts the cache was written from."""
        yield _EvalReader(self)

    def text_batch(self, batch_size: int) -> list[str]:
        if self._eval_texts is None:
            from experiments.lm.corpus import text_source
            from experiments.training.data import CountingIterator

            m = self.cache.manifest
            texts = CountingIterator(text_source(m["text"], tokenizer=self.buffer.model.tokenizer, seed=m["seed"]))
            texts.skip(m["texts_read"])  # texts the cache did not read: held out from training
            self._eval_texts = texts
        batch = list(itertools.islice(self._eval_texts, batch_size))
        if not batch:
            raise DataError("the text source ended before the evaluation's texts; use a repeating text source")
        return batch


class _EvalReader:
    def __init__(self, stream: CachedActivations):
        self.stream = stream

    def __next__(self) -> torch.Tensor:
        return next(self.stream)

    def text_batch(self, batch_size: Optional[int] = None) -> list[str]:
        return self.stream.text_batch(batch_size or self.stream.cache.manifest["refresh_batch_size"])
