"""The package's errors: one base class, so every command-line entry point can catch what a user
can fix (``VsaeError``) and print one line instead of a traceback.

Each subclass also keeps the standard exception it stands for (``ValueError``, ``FileNotFoundError``,
...), so code written against those keeps working.
"""

from __future__ import annotations


class VsaeError(Exception):
    """Base of every error this project raises on purpose; the message names the problem and the fix."""

    exit_code = 2
    """What a command-line entry point exits with (2: bad input; 1: a run that failed on its own)."""


class ConfigError(VsaeError, ValueError):
    """A configuration (trainer, run, study, eval profile) that cannot be used."""


class UsageError(ConfigError):
    """Bad command-line input."""


class CheckpointError(VsaeError, ValueError):
    """A checkpoint or weights file that is damaged or does not match its config."""


class MissingFileError(VsaeError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class NonFiniteError(VsaeError, FloatingPointError):
    """NaN/Inf in activations or in the loss: the run itself failed."""

    exit_code = 1


class WrapperError(VsaeError, ValueError):
    """A dictionary that cannot be presented to SAEBench faithfully."""


class ExportError(VsaeError, ValueError):
    """A run that cannot be exported faithfully; nothing was written."""


class EvalError(VsaeError, RuntimeError):
    """An eval failed; the message carries SAEBench's own error."""


class StandinError(VsaeError, ValueError):
    """A stand-in dataset that is missing or lacks a column SAEBench reads."""


class DataError(VsaeError, ValueError):
    """A text or activation source that cannot be read as asked (unknown spec, empty, missing column)."""


class StudyError(VsaeError, RuntimeError):
    """A study definition or run folder that cannot be used as asked."""


def format_error(err: BaseException) -> str:
    """One line (plus any notes, e.g. how to resume) for a user-facing error."""
    lines = [f"error: {err}"]
    lines += list(getattr(err, "__notes__", []))
    return "\n".join(lines)
