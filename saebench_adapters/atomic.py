"""Atomic file writes: temp file in the destination folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class Transaction:
    """Collects (path, bytes) writes and performs them all, or on failure removes those already made
    (restoring nothing that existed before is overwritten until every write is ready in memory)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, bytes]] = []

    def add(self, path: str | Path, data: bytes) -> None:
        self.pending.append((Path(path), data))

    def add_json(self, path: str | Path, obj: Any) -> None:
        self.add(path, (json.dumps(obj, indent=2) + "\n").encode())

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
