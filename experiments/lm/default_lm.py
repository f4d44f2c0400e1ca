"""Train the embedded offline default language model ("vsae-gelu-2l": 2 layers, GELU, d_model 256).

    python -m experiments.train_default_lm --out experiments/assets/default_lm
    python -m experiments.train_default_lm --check   # retrain in a temp dir, compare checksums

A byte-level BPE tokenizer and a 2-layer GELU GPT-2 (d_model 256; a small stand-in for Neel Nanda's
gelu-1l/gelu-2l) trained on CPU from text every machine has: the Python standard library's own
sources (`experiments.lm.corpus.local_corpus`) and generated spelling passages in SAEBench's
absorption format. The recipe is built so that SAEBench's absorption eval can run on it: its
ground-truth probe must read the first letter of every alphabetic token linearly from the residual
stream at the word token (F1 > min_GT_probe_f1 for at least 20 of 26 letters). Three things get it there:
* half of every batch is spelling passages laid out as SAEBench's ICL prompts, mostly over the
  tokenizer's own alphabetic tokens, with the letter answers weighted up in the loss;
* the tokenizer also sees letter-balanced word text, so rare first letters (j, k, q, x, y, z) get
  enough tokens for the probe's per-letter test split;
* the input embeddings (where the letter lives) are scaled up (`EMBED_SCALE`, untied from the
  unembedding), so they are not drowned by the much larger MLP outputs in the residual stream.
`training_info.json` records the probe's F1 per letter at each layer and the recommended SAE site.
Bitwise reproduction (the --check) holds only with the same Python stdlib (version),
torch/tokenizers/transformers versions and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sae_bench.evals.absorption.vocab import get_alpha_tokens

from dictionary_learning_ext.io import write_bytes
from experiments.lm import corpus
from experiments.lm.models import DEFAULT_MODEL_NAME
from experiments.lm.assets import ASSETS_DIR, read_checksums, write_checksums

DEFAULT_OUT = ASSETS_DIR
EOS = "<|endoftext|>"
# Tokens the SAEBench absorption prompt "{word} has the first letter: X" needs to be single.
REQUIRED_SINGLE_TOKENS = [f" {c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + [" has", " the", " first", " letter", ":"]
THREADS = 2
MIN_GT_PROBE_F1 = 0.3  # the "quick" eval profile's absorption min_GT_probe_f1 (SAEBench's tests use it too)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Extra tokenizer text: the TOKENIZER_WORDS_PER_LETTER most frequent words of the training sources
# for each first letter, each repeated TOKENIZER_WORD_REPEAT times. Python code alone gives a 4096-token
# vocabulary only ~10 alphabetic tokens starting with j or z (~25 with q, x, y); SAEBench's absorption
# probe is scored on 20% of the alphabetic tokens per letter, so rare letters need more tokens.
# The training recipe (defaults of `train` and the command line).
STEPS = 600
SPELLING_ROWS = 16  # of 32 rows per batch
SPELLING_PASSAGES = 40000
WORD_SPELLING_SHARE = 0.3
ANSWER_WEIGHT = 5.0
EMBED_SCALE = 20.0
TOKENIZER_WORDS_PER_LETTER = 60
TOKENIZER_WORD_REPEAT = 300


def letter_balanced_words(per_letter: int = TOKENIZER_WORDS_PER_LETTER,
                          repeat: int = TOKENIZER_WORD_REPEAT) -> list[str]:
    """Texts of repeated frequent training words, the same number of words for every first letter
    (held-out spelling words excluded), for the tokenizer only."""
    counts: dict[str, int] = {}
    for f in corpus.stdlib_files("train"):
        for w in corpus._WORD.findall(corpus._read(f)):
            counts[w] = counts.get(w, 0) + 1
    texts = []
    for c in LETTERS:
        words = sorted((w for w in counts if w[0].lower() == c and len(w) > 1 and not corpus.is_heldout_word(w)),
                       key=lambda w: (-counts[w], w))[:per_letter]
        for w in words:
            texts += [" ".join([w] * repeat)] * 2
    return texts


def train_tokenizer(vocab_size: int, balance_letters: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on one pass over the training corpus (plus, with
    `balance_letters`, `letter_balanced_words`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    texts = itertools.chain(corpus.local_corpus("train", seed=0, repeat=False),
                            letter_balanced_words() if balance_letters else [])
    tok.train_from_iterator(texts, trainer)
    # pad = eos (as GPT-2 users do), right padding so absolute positions of real tokens never shift.
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        padding_side="right", model_max_length=128,
    )
    check_tokenizer(hf)
    return hf


def check_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    multi = {s: tok.tokenize(s) for s in REQUIRED_SINGLE_TOKENS if len(tok.encode(s)) != 1}
    if multi:
        raise AssertionError(f"SAEBench absorption needs these as single tokens, got: {multi}")


def spelling_vocab(tok: PreTrainedTokenizerFast) -> tuple[str, ...]:
    """The tokenizer's alphabetic tokens (the words SAEBench absorption spells), held-out words left out."""
    # sorted: tok.vocab comes from a Rust hash map whose order changes between processes.
    return tuple(sorted(w for w in get_alpha_tokens(tok) if not corpus.is_heldout_word(w)))


def spelling_passages(tok: PreTrainedTokenizerFast, n: int, seed: int, word_share: float) -> list[str]:
    """`n` spelling passages in the layout of SAEBench's probe prompts (separator first, then
    '{word} has the first letter: X' lines). A `word_share` of them spell training-source words as
    `local_corpus` does (multi-token words, word pieces, with or without a leading space), so the model
    learns to spell words it has no single token for; the rest spell the tokenizer's own alphabetic
    tokens drawn uniformly (as SAEBench draws its ICL examples), so every such token embedding learns
    its first letter. Held-out words are left out of both."""
    alpha = spelling_vocab(tok)
    words = corpus.spelling_words("train")
    rng = random.Random(f"vocab-spelling:{seed}")
    return [corpus.spelling_passage(words, rng) if rng.random() < word_share
            else corpus.spelling_passage(alpha, rng, exact=True) for _ in range(n)]


def token_stream(tok: PreTrainedTokenizerFast, split: str | None, seed: int, extra: list[str] = ()) -> torch.Tensor:
    """One epoch of the split (None: no corpus) + extra passages, each preceded by EOS (the model
    also sees EOS as a BOS). Training samples random windows, so passage order does not matter."""
    ids: list[int] = []
    texts = (list(corpus.local_corpus(split, seed=seed, repeat=False)) if split else []) + list(extra)
    for enc in tok(texts, verbose=False)["input_ids"]:  # long passages are fine here: we window them
        ids.append(tok.eos_token_id)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, n: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - ctx, (n,), generator=gen)
    return torch.stack([stream[s : s + ctx] for s in starts.tolist()])


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, batches: torch.Tensor, bs: int = 32) -> float:
    """Mean next-token cross-entropy in nats/token over rows of `batches`."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches.split(bs)]
    return sum(losses) / len(losses)


@torch.no_grad()
def first_letter_accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerFast, words: list[str],
                          icl_words: list[str], seed: int = 0) -> float:
    """Argmax accuracy of the letter after SAEBench's ICL prompt '...\\n{word} has the first letter:'."""
    from sae_bench.evals.absorption.prompting import VERBOSE_FIRST_LETTER_TEMPLATE, create_icl_prompt

    random.seed(seed)  # create_icl_prompt samples ICL examples from the global `random`
    prompts = [create_icl_prompt(w, icl_words, base_template=VERBOSE_FIRST_LETTER_TEMPLATE,
                                 max_icl_examples=10, prepend_separator_to_first_example=True)
               for w in words]
    model.eval()
    n_ctx = model.config.n_positions
    correct = 0
    for i in range(0, len(prompts), 64):
        chunk = prompts[i : i + 64]
        # BOS + the last n_ctx-1 prompt tokens: multi-token words can push 10 ICL examples past n_ctx.
        rows = [[tok.bos_token_id] + tok(p.base, verbose=False)["input_ids"][-(n_ctx - 1):] for p in chunk]
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1  # right padding: last real token
        pred = logits[torch.arange(len(chunk)), last].argmax(-1)
        answers = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(p.answer))[0] for p in chunk])
        correct += (pred == answers).sum().item()
    return correct / len(prompts)


def saebench_first_letter_probe_f1(tl: Any, layer: int, seed: int = 0, n_words: int | None = None) -> dict[str, float]:
    """F1 per letter of SAEBench absorption's ground-truth first-letter probe at blocks.{layer}.hook_resid_post.

    SAEBench's own code, as `run_eval` runs it through `train_and_save_probes`: its word list (every
    alphabetic token, `get_alpha_tokens`), its 80/20 train/test split of the words and 10-example ICL
    prompts (`create_dataset_probe_training`), activations at the word token, its one-vs-rest logistic
    probe and its training settings (`create_and_train_probe`); then, on the test words, the F1 of
    `probe(x) > 0`: the `f1_probe` that `run_eval` compares with `min_GT_probe_f1`.

    Two differences, both for reproducibility: the word list is sorted first (SAEBench takes the
    tokenizer's hash-map order, which changes between processes), and `n_words` (if given) probes a
    seeded sample of it. `seed` seeds the global `random` (split, ICL examples) and torch (probe init,
    batch order) generators. `tl` is a HookedTransformer.
    """
    from sae_bench.evals.absorption.common import (
        create_and_train_probe, load_probe, load_probe_data_split, train_and_save_probes,
    )
    from sae_bench.evals.absorption.probing import gen_probe_stats
    from sae_bench.evals.absorption.prompting import (
        VERBOSE_FIRST_LETTER_TEMPLATE, VERBOSE_FIRST_LETTER_TOKEN_POS, first_letter_formatter,
    )

    vocab = sorted(get_alpha_tokens(tl.tokenizer))
    if n_words is not None:
        vocab = sorted(random.Random(seed).sample(vocab, n_words))
    defaults = {k: v.default for k, v in inspect.signature(train_and_save_probes).parameters.items()}
    random.seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as probes_dir, contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
        create_and_train_probe(
            model=tl, formatter=first_letter_formatter(), hook_point=f"blocks.{layer}.hook_resid_post",
            probes_dir=probes_dir, vocab=vocab, batch_size=defaults["batch_size"],
            num_epochs=defaults["num_epochs"], lr=defaults["lr"], device=torch.device("cpu"),
            base_template=VERBOSE_FIRST_LETTER_TEMPLATE, pos_idx=VERBOSE_FIRST_LETTER_TOKEN_POS,
        )
        probe = load_probe(tl.cfg.model_name, layer, probes_dir, dtype=torch.float32, device="cpu")
        x, labels = load_probe_data_split(tl, layer, "test", probes_dir, dtype=torch.float32, device="cpu")
        stats = gen_probe_stats(probe, x, torch.tensor([y for _, y in labels]), threshold=0.0, device="cpu")
    return {s.letter: s.f1 for s in stats}


def probe_report(model_dir: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """SAEBench's first-letter probe (`saebench_first_letter_probe_f1`, every alphabetic token) at every
    layer of the model saved in `model_dir`, once per seed (the seed picks the probe's train/test
    split): F1 per letter (first seed), the number of letters above MIN_GT_PROBE_F1 per seed, and the
    layer with the most letters above it in the worst seed (the SAE site to use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.lm.models import gpt2_hooked_transformer

    # Loaded back from disk as experiments.lm.models does (TransformerLens needs a saved tokenizer).
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tl = gpt2_hooked_transformer(hf, AutoTokenizer.from_pretrained(model_dir), DEFAULT_MODEL_NAME, "cpu", torch.float32)
    layers = {}
    for layer in range(hf.config.n_layer):
        f1s = [saebench_first_letter_probe_f1(tl, layer, seed) for seed in seeds]
        counts = [sum(v > MIN_GT_PROBE_F1 for v in f1.values()) for f1 in f1s]
        layers[f"blocks.{layer}.hook_resid_post"] = {
            "letters_above_min_f1": counts[0],
            "letters_above_min_f1_by_seed": counts,
            "mean_f1_by_seed": [round(sum(f1.values()) / len(f1), 4) for f1 in f1s],
            "f1_by_letter": {k: round(v, 4) for k, v in f1s[0].items()},
        }
    best = max(layers, key=lambda k: (min(layers[k]["letters_above_min_f1_by_seed"]), sum(layers[k]["mean_f1_by_seed"])))
    return {"min_gt_probe_f1": MIN_GT_PROBE_F1, "seeds": list(seeds), "layers": layers, "recommended_hook": best}


def build_model(vocab_size: int, eos_id: int, n_layers: int = 2, embed_scale: float = EMBED_SCALE) -> GPT2LMHeadModel:
    """GPT-2 with untied input/output embeddings; the input (token and position) embeddings start
    `embed_scale` times GPT-2's initialisation (and train with an `embed_scale` times larger learning
    rate, see `optimizer`), so they keep a comparable share of the residual stream next to the
    attention and MLP outputs instead of ~1% of it (the first-letter information SAEBench's probe
    reads at the word token lives in the token embedding)."""
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=256, n_layer=n_layers, n_head=4, n_inner=1024,
        activation_function="gelu",  # exact GELU, as gelu-1l (TransformerLens act_fn "gelu")
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(embed_scale)
        model.transformer.wpe.weight.mul_(embed_scale)
    return model


def optimizer(model: GPT2LMHeadModel, lr: float, embed_scale: float) -> torch.optim.Optimizer:
    """AdamW; the input embeddings at `embed_scale` times the learning rate and without weight decay,
    which (Adam being invariant to gradient scale) trains them exactly as unscaled embeddings would."""
    emb = [model.transformer.wte.weight, model.transformer.wpe.weight]
    rest = [p for p in model.parameters() if all(p is not e for e in emb)]
    return torch.optim.AdamW([{"params": rest}, {"params": emb, "lr": lr * embed_scale, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def weighted_lm_loss(model: GPT2LMHeadModel, batch: torch.Tensor, answer_mask: torch.Tensor,
                     answer_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss to optimise, plain mean next-token loss): the targets where `answer_mask`
    (over batch[:, 1:]) is set count `answer_weight` times."""
    logits = model(input_ids=batch).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                           reduction="none").view(batch.shape[0], -1)
    w = 1.0 + (answer_weight - 1.0) * answer_mask.float()
    return (ce * w).sum() / w.sum(), ce.detach().mean()


def answer_positions(tok: PreTrainedTokenizerFast, batch: torch.Tensor) -> torch.Tensor:
    """Mask over batch[:, 1:]: the letter answers of spelling lines (' X' right after ':')."""
    colon = tok.convert_tokens_to_ids(tok.tokenize(":"))[0]
    letters = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(f" {c}"))[0] for c in LETTERS.upper()])
    return (batch[:, :-1] == colon) & torch.isin(batch[:, 1:], letters)


def train(out: Path, seed: int = 0, steps: int = STEPS, batch_size: int = 32, lr: float = 3e-3,
          vocab_size: int = 4096, spelling: int = SPELLING_PASSAGES, layers: int = 2,
          spelling_rows: int = SPELLING_ROWS, word_share: float = WORD_SPELLING_SHARE,
          answer_weight: float = ANSWER_WEIGHT, embed_scale: float = EMBED_SCALE,
          balance_letters: bool = True, threads: int = THREADS, probe: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    t0 = time.time()

    tok = train_tokenizer(vocab_size, balance_letters)
    train_ids = token_stream(tok, "train", seed)
    spell_ids = token_stream(tok, None, seed, spelling_passages(tok, spelling, seed, word_share))
    held_ids = token_stream(tok, "heldout", seed)
    ctx = 128
    gen = torch.Generator().manual_seed(seed)
    held = windows(held_ids, 256, ctx, torch.Generator().manual_seed(seed + 1))
    print(f"tokenizer: {len(tok)} tokens, {len(get_alpha_tokens(tok))} alphabetic; train stream "
          f"{len(train_ids):,} tokens, spelling stream {len(spell_ids):,}, held-out {len(held_ids):,}; "
          f"{time.time() - t0:.0f}s", flush=True)

    model = build_model(len(tok), tok.eos_token_id, layers, embed_scale)
    opt = optimizer(model, lr, embed_scale)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 10%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    recent: list[float] = []
    for step in range(steps):
        model.train()
        # Every batch: `spelling_rows` windows of the spelling stream, the rest of the corpus stream.
        batch = torch.cat([windows(train_ids, batch_size - spelling_rows, ctx, gen),
                           windows(spell_ids, spelling_rows, ctx, gen)])
        loss, plain = weighted_lm_loss(model, batch, answer_positions(tok, batch), answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [plain.item()])[-50:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} train loss {sum(recent) / len(recent):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_checksums(out)

    t1 = time.time()
    held_loss = mean_loss(model, held)
    train_loss = mean_loss(model, windows(train_ids, 256, ctx, torch.Generator().manual_seed(seed + 2)))
    train_words = list(corpus.spelling_words("train"))
    held_words = list(corpus.spelling_words("heldout"))
    acc_held = first_letter_accuracy(model, tok, held_words, train_words, seed)
    acc_train = first_letter_accuracy(model, tok, random.Random(seed).sample(train_words, 500), train_words, seed)
    # What SAEBench absorption spells: every alphabetic vocabulary token, ICL examples from the same list.
    alpha = sorted(get_alpha_tokens(tok))
    acc_alpha = first_letter_accuracy(model, tok, random.Random(seed).sample(alpha, 500), alpha, seed)
    info = {
        "model": DEFAULT_MODEL_NAME,
        "seed": seed,
        "n_layers": layers,
        "d_model": model.config.n_embd,
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": batch_size,
        "spelling_rows_per_batch": spelling_rows,
        "spelling_passages": spelling,
        "spelling_word_share": word_share,
        "answer_weight": answer_weight,
        "embed_scale": embed_scale,
        "ctx_len": ctx,
        "lr": lr,
        "tokens_seen": steps * batch_size * ctx,
        "tokenizer_letter_balanced_words": [TOKENIZER_WORDS_PER_LETTER, TOKENIZER_WORD_REPEAT] if balance_letters else None,
        "alphabetic_tokens": len(alpha),
        "alphabetic_tokens_by_first_letter": {c: sum(w.strip()[0].lower() == c for w in alpha) for c in LETTERS},
        "train_loss_nats_per_token": round(train_loss, 4),
        "heldout_loss_nats_per_token": round(held_loss, 4),
        "uniform_baseline_nats_per_token": round(math.log(len(tok)), 4),
        "first_letter_accuracy_heldout_words": round(acc_held, 4),
        "first_letter_accuracy_train_words": round(acc_train, 4),
        "first_letter_accuracy_vocab_alpha_tokens": round(acc_alpha, 4),
        "n_heldout_words": len(held_words),
        "train_seconds": round(train_seconds, 1),
        "threads": threads,
        "corpus_python": platform.python_version(),
        "corpus_stdlib": str(corpus.stdlib_root()),
        "torch": torch.__version__,
    }
    if probe:
        info["saebench_first_letter_probe"] = probe_report(out, (seed, seed + 1, seed + 2))
    info["eval_seconds"] = round(time.time() - t1, 1)
    print(json.dumps(info, indent=1))
    write_bytes(out / "training_info.json", (json.dumps(info, indent=1) + "\n").encode())
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--spelling-rows", type=int, default=SPELLING_ROWS,
                   help="rows of every batch drawn from the spelling passages (the rest: the stdlib corpus)")
    p.add_argument("--spelling", type=int, default=SPELLING_PASSAGES, help="number of spelling passages")
    p.add_argument("--word-share", type=float, default=WORD_SPELLING_SHARE,
                   help="share of spelling passages over corpus words (the rest: over vocabulary tokens)")
    p.add_argument("--answer-weight", type=float, default=ANSWER_WEIGHT,
                   help="loss weight of the letter answers of spelling lines")
    p.add_argument("--embed-scale", type=float, default=EMBED_SCALE,
                   help="input embeddings' scale (init and learning rate) relative to GPT-2's")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--no-balance-letters", dest="balance_letters", action="store_false",
                   help="train the tokenizer on the corpus alone (no letter-balanced word text)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (bitwise reproduction needs the same)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip SAEBench's first-letter probe report")
    p.add_argument("--check", action="store_true",
                   help="retrain into a temp dir and compare checksums with --out's SHA256SUMS")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hp = dict(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, vocab_size=a.vocab_size,
              spelling=a.spelling, layers=a.layers, spelling_rows=a.spelling_rows, word_share=a.word_share,
              answer_weight=a.answer_weight, embed_scale=a.embed_scale, balance_letters=a.balance_letters,
              threads=a.threads)
    if not a.check:
        train(a.out, probe=a.probe, **hp)
        return 0
    expected = read_checksums(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp), probe=False, **hp)
        got = read_checksums(Path(tmp))
    bad = sorted(n for n in expected if got.get(n) != expected[n])
    print("checksums reproduce" if not bad else f"checksum mismatch for {bad} "
          f"(bitwise reproduction needs the same stdlib, library versions and {a.threads} threads)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
