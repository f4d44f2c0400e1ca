"""Text sources for activation buffers: iterators of strings.

`ActivationBuffer` calls `next(data)` and truncates each string to `ctx_len` tokens, so every
source here yields passages of roughly one context (~128 tokens) of text.

* `local_corpus`: needs no download. The installed Python standard library's own `.py` sources
  (read at run time, never copied into the repo), interleaved with spelling passages in the
  SAEBench absorption format so that a small model can learn first letters.
* `hf_text_stream`: the real path, a streamed Hugging Face dataset (text or token ids).
* `text_source`: parses a spec string (`"local"`, `"hf:<dataset>[:<column>]"`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from dictionary_learning_ext.errors import DataError

# The absorption eval's own template and answer formatter, so the format matches by construction.
from sae_bench.evals.absorption.prompting import VERBOSE_FIRST_LETTER_TEMPLATE, first_letter

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")

PASSAGE_MIN_CHARS = 500  # ~128 BPE tokens of Python source at ~4-5 chars/token
PASSAGE_MAX_CHARS = 700
SPELLING_EXAMPLES = 11  # SAEBench uses 10 ICL examples + the query word
SPELLING_EVERY = 3  # one spelling passage per this many code passages (on average)
SPELLING_SEPARATOR = "\n"  # create_icl_prompt's example_separator; absorption prepends it too
HELDOUT_FILE_BUCKETS = 10  # 1 in 10 stdlib files is held out
HELDOUT_WORD_BUCKETS = 16  # 1 in 16 spelling words is never used in training
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_WORD = re.compile(r"[A-Za-z]+")


def _bucket(key: str, n: int) -> int:
    # sha256 rather than hash(): str hashes are salted per process.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=None)
def stdlib_files(split: Split = "train") -> tuple[Path, ...]:
    """The split's stdlib `.py` files, sorted by path relative to the stdlib root."""
    _check_split(split)
    root = stdlib_root()
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    want_heldout = split == "heldout"
    files = tuple(root / r for r in rels if (_bucket(r, HELDOUT_FILE_BUCKETS) == 0) == want_heldout)
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def passages(text: str) -> Iterator[str]:
    """Chunk text at line boundaries into passages of PASSAGE_MIN..MAX_CHARS characters."""
    buf = ""
    for line in text.splitlines(keepends=True):
        while len(line) > PASSAGE_MAX_CHARS:  # very long lines (data tables) are cut
            yield line[:PASSAGE_MAX_CHARS]
            line = line[PASSAGE_MAX_CHARS:]
        if len(buf) + len(line) > PASSAGE_MAX_CHARS and buf:
            yield buf
            buf = ""
        buf += line
        if len(buf) >= PASSAGE_MIN_CHARS:
            yield buf
            buf = ""
    if buf.strip():
        yield buf


def is_heldout_word(word: str) -> bool:
    return _bucket(word.strip().lower(), HELDOUT_WORD_BUCKETS) == 0


@lru_cache(maxsize=None)
def spelling_words(split: Split = "train") -> tuple[str, ...]:
    """Distinct alphabetic words of the split's files, restricted to the split's word bucket.

    Held-out words never appear in training spelling passages, so first-letter accuracy on them
    measures generalisation (through shared first tokens), not memorisation.
    """
    want_heldout = split == "heldout"
    words = {w for f in stdlib_files(split) for w in _WORD.findall(_read(f))}
    return tuple(sorted(w for w in words if is_heldout_word(w) == want_heldout))


def _spelling_word(words: tuple[str, ...], rng: random.Random) -> str:
    word = rng.choice(words)
    # SAEBench spells every alphabetic *token*, many of which are word pieces ("ing", "attr"):
    # sampling substrings teaches first letters for pieces that never start a whole word.
    if len(word) > 3 and rng.random() < 0.3:
        start = rng.randrange(len(word) - 1)
        word = word[start : start + rng.randint(2, 6)]
    # Absorption words are tokens, with or without a leading space.
    return (" " + word) if rng.random() < 0.5 else word


def spelling_passage(words: tuple[str, ...], rng: random.Random, n: int = SPELLING_EXAMPLES,
                     exact: bool = False) -> str:
    """A passage like SAEBench's ICL prompts: '\\n{word} has the first letter: {W}' repeated.

    `exact=True` spells the given words as they are (e.g. vocabulary tokens), with no substring
    sampling or added leading space.
    """
    lines = []
    for _ in range(n):
        word = rng.choice(words) if exact else _spelling_word(words, rng)
        lines.append(VERBOSE_FIRST_LETTER_TEMPLATE.format(word=word) + first_letter(word))
    return SPELLING_SEPARATOR + SPELLING_SEPARATOR.join(lines)


def local_corpus(split: Split = "train", seed: int = 0, repeat: bool = True) -> Iterator[str]:
    """Passages of stdlib source interleaved with spelling passages; deterministic given seed.

    With `repeat=True` it cycles forever, reshuffling the file order each epoch.
    """
    _check_split(split)
    files = stdlib_files(split)
    words = spelling_words(split)
    epoch = 0
    while True:
        rng = random.Random(f"{seed}:{split}:{epoch}")
        order = list(files)
        rng.shuffle(order)
        for path in order:
            for passage in passages(_read(path)):
                yield passage
                if rng.randrange(SPELLING_EVERY) == 0:
                    yield spelling_passage(words, rng)
        epoch += 1
        if not repeat:
            return


class MissingColumnError(DataError, KeyError):
    """A dataset without the requested column (a KeyError for lookups, a DataError for the CLI)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class EmptySourceError(DataError):
    """A text source that yields nothing."""


# A token dataset's rows, decoded, must be read by the tokenizer that made them.
KNOWN_TOKENIZERS = {"NeelNanda/c4-code-tokenized-2b": "NeelNanda/gpt-neox-tokenizer-digits"}  # gelu-1l's
# The last row of every block of this many rows of a hub dataset is held out: the training stream skips it,
# the analyses read it.
HELDOUT_ROW_BUCKETS = 100


def check_token_dataset(dataset_name: str, ids: list[int], tokenizer: Any) -> None:
    """Refuse token ids the model's tokenizer did not make: ids beyond its vocabulary, or a dataset known to
    come from another tokenizer (decoding would give garbage)."""
    vocab = len(tokenizer)
    if ids and max(ids) >= vocab:
        raise DataError(f"{dataset_name!r} holds token id {max(ids)} but the model's tokenizer has {vocab} tokens: "
                        "the dataset was tokenized for another model; pick a text dataset or the model it was made for")
    expected = KNOWN_TOKENIZERS.get(dataset_name)
    have = getattr(tokenizer, "name_or_path", None)
    if expected is not None and have != expected:
        raise DataError(f"{dataset_name!r} was tokenized with {expected!r}, but the model's tokenizer is {have!r}: "
                        "decoding would give other text; use the model it was made for (e.g. gelu-1l) or a text dataset")


def _token_windows(ids: list[int], tokenizer: Any, ctx_len: Optional[int]) -> Iterator[str]:
    """A token row cut into contexts of ``ctx_len`` tokens (all of it, not only the first context), each
    decoded with its special tokens (document separators stay, and re-tokenise to themselves)."""
    step = ctx_len or len(ids) or 1
    for start in range(0, len(ids), step):
        yield tokenizer.decode(ids[start:start + step], skip_special_tokens=False)


def _row_texts(value: Any, tokenizer: Any, column: str, dataset_name: str, ctx_len: Optional[int]) -> Iterator[str]:
    if isinstance(value, str):
        yield value
        return
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        if tokenizer is None:
            raise DataError(f"column {column!r} holds token ids; pass the tokenizer that made them")
        ids = value.tolist() if hasattr(value, "tolist") else list(value)
        check_token_dataset(dataset_name, ids, tokenizer)
        yield from _token_windows(ids, tokenizer, ctx_len)
        return
    raise DataError(f"column {column!r} holds {type(value).__name__}, expected str or token ids")


def hf_text_stream(
    dataset_name: str,
    split: str = "train",
    text_column: str = "text",
    tokenizer: Any = None,
    repeat: bool = False,
    heldout: bool = False,
    ctx_len: Optional[int] = None,
    **load_kwargs: Any,
) -> Iterator[str]:
    """Stream a Hugging Face dataset (`datasets.load_dataset(..., streaming=True)`) as strings.

    One row in HELDOUT_ROW_BUCKETS is held out: the default stream skips those rows, `heldout=True` yields
    only them (the analyses' sample, never trained on). Pre-tokenized datasets (e.g. gelu-1l's
    `NeelNanda/c4-code-tokenized-2b`, column `tokens`, rows of 1,024 tokens) are checked against `tokenizer`
    and cut into `ctx_len`-token contexts, each decoded. A local folder of parquet files also works as
    `dataset_name`.
    """
    from datasets import load_dataset  # heavy import, only on this path

    while True:
        try:
            ds = load_dataset(dataset_name, split=split, streaming=True, **load_kwargs)
        except (ConnectionError, FileNotFoundError, ValueError) as err:  # what `datasets` raises for a missing one
            raise DataError(
                f"cannot open the dataset {dataset_name!r} ({type(err).__name__}: {str(err).splitlines()[0]}); check "
                "its name and split, and run where the hub is reachable (or give a local folder of parquet files)"
            ) from err
        n = 0
        for i, row in enumerate(ds):
            if (i % HELDOUT_ROW_BUCKETS == HELDOUT_ROW_BUCKETS - 1) != heldout:
                continue
            if text_column not in row:
                raise MissingColumnError(
                    f"{dataset_name!r} has no column {text_column!r}; columns: {sorted(row)}. "
                    f"Name one with --text hf:{dataset_name}:<column>"
                )
            yield from _row_texts(row[text_column], tokenizer, text_column, dataset_name, ctx_len)
            n += 1
        if not repeat or n == 0:
            return


SPEC_FORMS = '"local", "local:heldout", or "hf:<dataset>[:<column>]" (e.g. "hf:monology/pile-uncopyrighted")'


def parse_text_spec(spec: str) -> tuple[str, str, str]:
    """("local", split, "") or ("hf", dataset, column); raises ValueError naming the accepted forms."""
    if spec in ("local", "local:heldout"):
        return "local", "heldout" if spec.endswith(":heldout") else "train", ""
    if spec.startswith("hf:"):
        name, sep, column = spec[3:].partition(":")
        if name and not (sep and not column):  # "hf:x:" (empty column) is a typo, not "text"
            return "hf", name, column or "text"
    raise DataError(f"unknown text source {spec!r}; accepted forms: {SPEC_FORMS}")


def text_source(spec: str, tokenizer: Any = None, seed: int = 0, heldout: bool = False,
                ctx_len: Optional[int] = None) -> Iterator[str]:
    """Build a text iterator from a spec string (see SPEC_FORMS). ``heldout``: the rows (hub) or files (local)
    training never reads; ``ctx_len``: token datasets are cut into contexts of this many tokens."""
    kind, name, column = parse_text_spec(spec)
    if kind == "local":
        return local_corpus("heldout" if heldout else name, seed=seed)
    stream = hf_text_stream(name, text_column=column, tokenizer=tokenizer, heldout=heldout, ctx_len=ctx_len)
    # Read the first row now: a missing column or an empty dataset is reported before any
    # model or training work, not from inside the activation buffer's refresh.
    try:
        first = next(stream)
    except StopIteration:
        raise EmptySourceError(f"text source {spec!r} yields no rows; check the dataset name and split") from None
    return itertools.chain([first], stream)
