"""Train the embedded offline default language model ("vsae-gelu-1l").

    python -m experiments.train_default_lm --out experiments/assets/default_lm
    python -m experiments.train_default_lm --check   # retrain in a temp dir, compare checksums

A byte-level BPE tokenizer and a 1-layer GELU GPT-2 (a small stand-in for Neel Nanda's gelu-1l)
trained on `experiments.lm.corpus.local_corpus` (Python stdlib sources + SAEBench-style spelling
passages), on CPU in a few minutes. Bitwise reproduction (the --check) holds only with the same
Python stdlib (version), torch/tokenizers/transformers versions and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

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


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on one pass over the training corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus.local_corpus("train", seed=0, repeat=False), trainer)
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


def vocab_spelling_passages(tok: PreTrainedTokenizerFast, n: int, seed: int) -> list[str]:
    """Spelling passages over the tokenizer's own alphabetic tokens (the words SAEBench absorption
    spells), so every such token embedding learns its first letter. Held-out words are left out."""
    # sorted: tok.vocab comes from a Rust hash map whose order changes between processes.
    alpha = tuple(sorted(w for w in get_alpha_tokens(tok) if not corpus.is_heldout_word(w)))
    rng = random.Random(f"vocab-spelling:{seed}")
    return [corpus.spelling_passage(alpha, rng, exact=True) for _ in range(n)]


def token_stream(tok: PreTrainedTokenizerFast, split: str, seed: int, extra: list[str] = ()) -> torch.Tensor:
    """One epoch of the split (+ extra passages), joined by EOS (the model also sees EOS as a BOS).
    Training samples random windows, so where the extra passages sit does not matter."""
    ids: list[int] = []
    texts = list(corpus.local_corpus(split, seed=seed, repeat=False)) + list(extra)
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


def build_model(vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=256, n_layer=1, n_head=4, n_inner=1024,
        activation_function="gelu",  # exact GELU, as gelu-1l (TransformerLens act_fn "gelu")
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def train(out: Path, seed: int, steps: int, batch_size: int, lr: float, vocab_size: int, vocab_spelling: int) -> dict:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    t0 = time.time()

    tok = train_tokenizer(vocab_size)
    train_ids = token_stream(tok, "train", seed, vocab_spelling_passages(tok, vocab_spelling, seed))
    held_ids = token_stream(tok, "heldout", seed)
    ctx = 128
    gen = torch.Generator().manual_seed(seed)
    held = windows(held_ids, 256, ctx, torch.Generator().manual_seed(seed + 1))
    print(f"tokenizer: {len(tok)} tokens; train stream {len(train_ids):,} tokens, "
          f"held-out {len(held_ids):,}; {time.time() - t0:.0f}s", flush=True)

    model = build_model(len(tok), tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 10%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    recent: list[float] = []
    for step in range(steps):
        model.train()
        batch = windows(train_ids, batch_size, ctx, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} train loss {sum(recent) / len(recent):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_checksums(out)

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
        "steps": steps,
        "batch_size": batch_size,
        "ctx_len": ctx,
        "lr": lr,
        "tokens_seen": steps * batch_size * ctx,
        "vocab_spelling_passages": vocab_spelling,
        "train_loss_nats_per_token": round(train_loss, 4),
        "heldout_loss_nats_per_token": round(held_loss, 4),
        "uniform_baseline_nats_per_token": round(math.log(len(tok)), 4),
        "first_letter_accuracy_heldout_words": round(acc_held, 4),
        "first_letter_accuracy_train_words": round(acc_train, 4),
        "first_letter_accuracy_vocab_alpha_tokens": round(acc_alpha, 4),
        "n_heldout_words": len(held_words),
        "train_seconds": round(train_seconds, 1),
        "threads": THREADS,
        "corpus_python": platform.python_version(),
        "corpus_stdlib": str(corpus.stdlib_root()),
        "torch": torch.__version__,
    }
    print(json.dumps(info, indent=1))
    write_bytes(out / "training_info.json", (json.dumps(info, indent=1) + "\n").encode())
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--vocab-spelling", type=int, default=12000,
                   help="extra spelling passages over the vocabulary's alphabetic tokens")
    p.add_argument("--check", action="store_true",
                   help="retrain into a temp dir and compare checksums with --out's SHA256SUMS")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hp = dict(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, vocab_size=a.vocab_size,
              vocab_spelling=a.vocab_spelling)
    if not a.check:
        train(a.out, **hp)
        return 0
    expected = read_checksums(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp), **hp)
        got = read_checksums(Path(tmp))
    bad = sorted(n for n in expected if got.get(n) != expected[n])
    print("checksums reproduce" if not bad else f"checksum mismatch for {bad} "
          f"(bitwise reproduction needs the same stdlib, library versions and {THREADS} threads)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
