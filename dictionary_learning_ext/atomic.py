"""Atomic file writes: temp file in the destination folder, fsync, rename, fsync the folder.

A reader (or a crash at any instant) sees either the previous file or the whole new one, never a
part: the temp file has a different name until ``os.replace`` renames it, which is atomic on POSIX
within one file system (hence the temp file lives in the destination folder).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_with(path: str | Path, writer: Callable[[BinaryIO], None]) -> Path:
    """Call ``writer(fh)`` on a temp file beside ``path``, fsync it, then rename it to ``path``.

    On any failure (including KeyboardInterrupt) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from collaborators
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    return write_with(path, lambda fh: fh.write(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` made atomic (streamed into the temp file, so large states are not copied in memory)."""
    return write_with(path, lambda fh: torch.save(obj, fh))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Temp files a killed writer left behind (``.<name>.<random>.tmp``); they never carry a final name."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()) if folder.is_dir() else []
    for p in stale:
        p.unlink()
    return stale


def check_torch_file(path: str | Path, what: str = "file") -> Path:
    """Raise if ``path`` is missing, truncated or corrupted, naming the file and the fix.

    A torch file is a zip archive with a CRC per member, so this is checked without unpickling:
    it tells a file that was not written completely (disk full, partial copy) apart from one
    whose contents do not fit.
    """
    from .variational import CheckpointError  # the package's checkpoint error type

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{what} {path} is truncated or not a torch file ({err}); it was not written completely "
            "(e.g. copied partially or written without atomic writes). Restore it from its source or retrain."
        ) from err
    if bad_member is not None:
        raise CheckpointError(f"{what} {path} is corrupted (checksum mismatch in {bad_member!r}); restore it or retrain.")
    return path


def load_torch(path: str | Path, what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` whose failures name the file and the fix."""
    from .variational import CheckpointError

    check_torch_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling refused: not plain tensors and containers
        raise CheckpointError(
            f"{what} {path} could not be loaded as plain tensors ({type(err).__name__}: {err}); "
            "it was not written by this project."
        ) from err
