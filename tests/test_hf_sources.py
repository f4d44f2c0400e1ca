"""Hub text sources (issue 17.5): held-out rows the training never reads, token datasets cut into contexts
whole (separators kept), and token ids refused when the model's tokenizer did not make them."""

from itertools import islice

import pandas as pd
import pytest
from transformers import AutoTokenizer

from dictionary_learning_ext.errors import DataError
from experiments.lm import corpus
from experiments.lm.models import ASSETS_DIR


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS_DIR)


def write_rows(folder, rows):
    (folder / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "data" / "train-00000.parquet")
    return folder


def test_held_out_rows_are_never_in_the_training_stream(tmp_path):
    texts = [f"row {i} text" for i in range(250)]
    path = write_rows(tmp_path, {"text": texts})
    train = list(corpus.text_source(f"hf:{path}"))
    heldout = list(corpus.text_source(f"hf:{path}", heldout=True))
    assert heldout == [texts[99], texts[199]]
    assert set(train).isdisjoint(heldout) and len(train) == 248


def test_token_rows_are_cut_into_contexts_and_used_whole(tmp_path, tok):
    doc_a = "def first(x):\n    return x + 1\n" * 30
    doc_b = "class Second:\n    pass\n" * 30
    ids = tok(doc_a)["input_ids"] + [tok.eos_token_id] + tok(doc_b)["input_ids"]
    path = write_rows(tmp_path, {"tokens": [ids]})
    windows = list(corpus.text_source(f"hf:{path}:tokens", tokenizer=tok, ctx_len=128))
    assert len(windows) == -(-len(ids) // 128)  # every token of the row, not only the first context
    assert "".join(windows) == doc_a + tok.eos_token + doc_b  # the document separator stays
    assert sum(len(tok(w)["input_ids"]) for w in windows) >= len(ids) - len(windows)  # re-tokenises to ~the same


def test_token_ids_from_another_tokenizer_are_refused(tmp_path, tok):
    path = write_rows(tmp_path, {"tokens": [[1, 2, len(tok) + 5]]})
    with pytest.raises(DataError, match=rf"token id {len(tok) + 5} but the model's tokenizer has {len(tok)} tokens"):
        list(corpus.text_source(f"hf:{path}:tokens", tokenizer=tok))
    with pytest.raises(DataError, match="was tokenized with 'NeelNanda/gpt-neox-tokenizer-digits'"):
        corpus.check_token_dataset("NeelNanda/c4-code-tokenized-2b", [1, 2, 3], tok)


def test_a_missing_dataset_is_one_clear_error():
    with pytest.raises(DataError, match="cannot open the dataset 'nobody/no-such-dataset-xyz'"):
        next(islice(corpus.hf_text_stream("nobody/no-such-dataset-xyz"), 1))
