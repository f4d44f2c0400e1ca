"""What a study prints: one progress line per stage (with counts and an ETA), and everything else —
the libraries' progress bars, prints and warnings — captured into a log file in the run folder.

``stage_output(log_path)`` redirects file descriptors 1 and 2 (so C-level writes and logging handlers
that hold the original streams are captured too) into the log for its duration; ``Progress`` writes to
the terminal the process had before, updating one line in place on a terminal (one line per update
otherwise, at most every few seconds).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Iterator, Optional

# Known, harmless warnings of the libraries, filtered where they arise instead of printed thousands of times.
KNOWN_NOISE = (
    (FutureWarning, r"'penalty' was deprecated"),  # scikit-learn 1.8, inside SAEBench's probes
    (DeprecationWarning, r"HookedTransformer is deprecated"),  # TransformerLens 3.x; we use it on purpose
    (UserWarning, r"Sparse CSR tensor support is in beta"),
)

_terminal: Optional[IO[str]] = None


def terminal() -> IO[str]:
    """The stream the user sees, even while a stage's output is being captured."""
    return _terminal if _terminal is not None else sys.stderr


def filter_known_noise() -> None:
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def stage_output(log_path: Path) -> Iterator[None]:
    """Send stdout and stderr (Python and C level) to ``log_path`` (appended) for the duration. Both the file
    descriptors and ``sys.stdout``/``sys.stderr`` are redirected: in Jupyter or under pytest's capture the
    Python streams do not write to descriptors 1 and 2."""
    global _terminal
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    outer_terminal = _terminal
    _terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                filter_known_noise()
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            _terminal.close()
            _terminal = outer_terminal


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """One line for a stage: ``name  done/total unit  elapsed  ETA``; the ETA is the elapsed time per unit
    so far times the units left (stable once a few units are done)."""

    def __init__(self, name: str, total: int, unit: str, detail: str = "", min_interval: float = 10.0,
                 heartbeat: float = 120.0):
        self.name, self.total, self.unit = name, max(total, 1), unit
        self.done = 0
        self.start = time.perf_counter()
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self._last_print, self._last_done = -float("inf"), -1
        self.detail = detail
        self._show(force=True)

    def update(self, done: Optional[int] = None, detail: Optional[str] = None, advance: int = 0) -> None:
        self.done = min(self.total, self.done + advance if done is None else done)
        if detail is not None:
            self.detail = detail
        self._show()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name:<9} {self.done}/{self.total} {self.unit}{detail}, {format_seconds(elapsed)}{eta}"

    def _show(self, force: bool = False) -> None:
        out = terminal()
        now = time.perf_counter()
        if out.isatty():
            out.write("\r\033[K" + self._line())
            out.flush()
            return
        # A log (not a terminal): a line when the count moved (at most every min_interval), else a heartbeat.
        since = now - self._last_print
        if force or (self.done != self._last_done and since >= self.min_interval) or since >= self.heartbeat:
            out.write(self._line() + "\n")
            out.flush()
            self._last_print, self._last_done = now, self.done

    def finish(self, note: str = "") -> float:
        self.done = self.total
        elapsed = time.perf_counter() - self.start
        out = terminal()
        line = f"{self.name:<9} done: {self.total} {self.unit} in {format_seconds(elapsed)}" + (f"; {note}" if note else "")
        out.write(("\r\033[K" if out.isatty() else "") + line + "\n")
        out.flush()
        return elapsed
