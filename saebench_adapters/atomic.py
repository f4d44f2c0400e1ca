"""Atomic file writes (implemented in ``dictionary_learning_ext.atomic``) and an all-or-nothing
``Transaction`` of several writes for the exporters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from dictionary_learning_ext.atomic import load_torch, save_torch, write_bytes, write_with

__all__ = ["Transaction", "load_torch", "save_torch", "write_bytes", "write_json", "write_with"]


def write_json(path: str | Path, obj: Any) -> Path:
    # Goes through this module's write_bytes, so tests can inject a failing writer here.
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
