"""Every file this project writes goes through here: atomic writes of bytes, JSON and torch
files, checked torch loads, and an all-or-nothing ``Transaction`` of several writes.

Atomic: temp file in the destination folder, fsync, rename, fsync the folder. A reader (or a crash at
any instant) sees either the previous file or the whole new one, never a part: the temp file has a
different name until ``os.replace`` renames it, which is atomic on POSIX within one file system (hence
the temp file lives in the destination folder).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch

from .errors import CheckpointError, MissingFileError

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


def json_bytes(obj: Any) -> bytes:
    """The one JSON file format of this project: indented, in insertion order, newline at the end."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, json_bytes(obj))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or damaged file is named with what it is."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON ({err}); the folder was edited or damaged") from err


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
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} not found")
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
    check_torch_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling refused: not plain tensors and containers
        raise CheckpointError(
            f"{what} {path} could not be loaded as plain tensors ({type(err).__name__}: {err}); "
            "it was not written by this project."
        ) from err


class Transaction:
    """Collects (path, bytes) writes and performs them all, or on failure removes those already made
    (restoring nothing that existed before is overwritten until every write is ready in memory)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, bytes]] = []

    def add(self, path: str | Path, data: bytes) -> None:
        self.pending.append((Path(path), data))

    def add_json(self, path: str | Path, obj: Any) -> None:
        self.add(path, json_bytes(obj))

    def commit(self) -> list[Path]:
        paths = [p for p, _ in self.pending]
        if len(set(paths)) != len(paths):
            raise ValueError("one file is written twice in one transaction")
        clobbered = [p for p in paths if p.exists()]
        backups: dict[Path, bytes] = {p: p.read_bytes() for p in clobbered}
        created_dirs = _missing_dirs(p.parent for p in paths)
        done: list[Path] = []
        try:
            for path, data in self.pending:
                write_bytes(path, data)
                done.append(path)
        except BaseException:
            for path in done:
                if path in backups:
                    write_bytes(path, backups[path])
                else:
                    path.unlink(missing_ok=True)
            for d in sorted(created_dirs, key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise
        return done


def _missing_dirs(dirs: Iterable[Path]) -> set[Path]:
    missing = set()
    for d in dirs:
        d = d.resolve()
        while not d.exists():
            missing.add(d)
            d = d.parent
    return missing
