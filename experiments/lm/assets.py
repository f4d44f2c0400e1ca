"""The embedded default model's files and their checksums (``SHA256SUMS``): written by the script that
trains the model, verified on every load."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dictionary_learning_ext.errors import CheckpointError, MissingFileError
from dictionary_learning_ext.io import write_bytes

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_lm"


class CorruptAssetsError(CheckpointError, RuntimeError):
    """The embedded model's files do not match their checksums."""


CHECKSUMMED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksums(out: Path) -> None:
    # training_info.json holds wall-clock timings, so it is not checksummed.
    # Written last and atomically: a build that died half-way fails verification instead of loading.
    write_bytes(out / "SHA256SUMS", "".join(f"{sha256(out / f)}  {f}\n" for f in CHECKSUMMED).encode())


def read_checksums(out: Path) -> dict[str, str]:
    lines = (out / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def verify_checksums(out: Path) -> list[str]:
    """Names of files whose checksum does not match SHA256SUMS (missing files included)."""
    return [n for n, d in read_checksums(out).items() if not (out / n).is_file() or sha256(out / n) != d]


def verify_assets(path: Path = ASSETS_DIR) -> None:
    """Raise if the embedded model's files do not match its SHA256SUMS."""
    if not (path / "SHA256SUMS").is_file():
        raise MissingFileError(f"embedded model assets missing: {path / 'SHA256SUMS'} "
                               "(run python -m experiments.train_default_lm)")
    bad = verify_checksums(path)
    if bad:
        raise CorruptAssetsError(f"embedded model assets in {path} are corrupt or modified (checksum mismatch: {bad}); "
                              "restore them from git or retrain with python -m experiments.train_default_lm")
