import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random
import re
from itertools import islice
from pathlib import Path

import pandas as pd
import pytest
from sae_bench.evals.absorption.prompting import VERBOSE_FIRST_LETTER_TEMPLATE, create_icl_prompt
from transformers import AutoTokenizer

from experiments.lm import corpus
from experiments.lm.models import ASSETS_DIR

SPELL_LINE = re.compile(r"^( ?)([A-Za-z]+) has the first letter: ([A-Z])$")


def test_splits_are_disjoint_stdlib_sources():
    train, held = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    assert len(train) > 300 and len(held) > 20
    assert not set(train) & set(held)
    root = corpus.stdlib_root()
    for f in train + held:
        parts = f.relative_to(root).parts
        assert f.suffix == ".py" and not {"test", "tests", "site-packages"} & set(parts)
    assert not set(corpus.spelling_words("train")) & set(corpus.spelling_words("heldout"))
    assert all(corpus.is_heldout_word(w) for w in corpus.spelling_words("heldout"))


def test_deterministic_and_seeded():
    a = list(islice(corpus.local_corpus("train", seed=0), 50))
    b = list(islice(corpus.local_corpus("train", seed=0), 50))
    c = list(islice(corpus.local_corpus("train", seed=1), 50))
    assert a == b and a != c
    assert all(isinstance(x, str) and x for x in a)


def test_passage_lengths_and_mix():
    items = list(islice(corpus.local_corpus("train"), 400))
    spelling = [x for x in items if x.startswith(corpus.SPELLING_SEPARATOR) and " has the first letter: " in x]
    code = [x for x in items if x not in spelling]
    assert 0.15 < len(spelling) / len(items) < 0.4
    assert all(len(x) <= corpus.PASSAGE_MAX_CHARS for x in code)
    assert sum(len(x) >= corpus.PASSAGE_MIN_CHARS for x in code) > 0.8 * len(code)


def test_spelling_passage_matches_saebench_icl_format():
    rng = random.Random(0)
    passage = corpus.spelling_passage(corpus.spelling_words("train"), rng)
    lines = passage.split("\n")
    assert lines[0] == ""  # absorption prepends the separator to the first example
    words = []
    for line in lines[1:]:
        m = SPELL_LINE.match(line)
        assert m, line
        assert m.group(3) == m.group(2)[0].upper()
        words.append(m.group(1) + m.group(2))
    assert len(words) == corpus.SPELLING_EXAMPLES
    # Rebuild the same text with SAEBench's own prompt builder: ICL examples + query + answer.
    p = create_icl_prompt(words[-1], words[:-1], base_template=VERBOSE_FIRST_LETTER_TEMPLATE,
                          shuffle_examples=False, check_contamination=False,
                          prepend_separator_to_first_example=True)
    assert p.base + p.answer == passage


def test_repeat_cycles_with_reshuffle():
    one_epoch = list(corpus.local_corpus("heldout", seed=3, repeat=False))
    assert len(one_epoch) > 100
    cycled = list(islice(corpus.local_corpus("heldout", seed=3, repeat=True), 2 * len(one_epoch) + 5))
    assert cycled[: len(one_epoch)] == one_epoch
    assert cycled[len(one_epoch) : 2 * len(one_epoch)] != one_epoch  # next epoch reshuffled
    assert len(cycled) == 2 * len(one_epoch) + 5


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS_DIR)


@pytest.fixture
def parquet_dir(tmp_path: Path, tok) -> tuple[Path, list[str]]:
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(7)]
    df = pd.DataFrame({"text": texts, "tokens": [tok(t)["input_ids"] for t in texts]})
    (tmp_path / "data").mkdir()
    df.to_parquet(tmp_path / "data" / "train-00000.parquet")
    return tmp_path, texts


def test_hf_stream_text_and_token_columns(parquet_dir, tok):
    path, texts = parquet_dir
    assert list(corpus.hf_text_stream(str(path))) == texts
    assert list(corpus.hf_text_stream(str(path), text_column="tokens", tokenizer=tok)) == texts
    with pytest.raises(ValueError, match="token ids"):
        next(corpus.hf_text_stream(str(path), text_column="tokens"))
    with pytest.raises(KeyError, match="nope"):
        next(corpus.hf_text_stream(str(path), text_column="nope"))
    again = list(islice(corpus.hf_text_stream(str(path), repeat=True), 10))
    assert again == texts + texts[:3]


def test_text_source_specs(parquet_dir, tok):
    path, texts = parquet_dir
    assert next(corpus.text_source("local")) == next(corpus.local_corpus("train"))
    assert next(corpus.text_source("local:heldout")) == next(corpus.local_corpus("heldout"))
    assert list(corpus.text_source(f"hf:{path}:tokens", tokenizer=tok)) == texts
    assert list(corpus.text_source(f"hf:{path}")) == texts
    for bad in ["", "pile", "hf:", f"hf:{path}:", "local:test"]:
        with pytest.raises(ValueError, match=r"hf:<dataset>\[:<column>\]"):
            corpus.text_source(bad)
