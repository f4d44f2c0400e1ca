"""What every command-line entry point of the project shares: options generated from a config
dataclass (so an option exists once, with the docstring under its field as its help), and one way to
report a user error (one line, exit code 2, no traceback).

Field metadata a config may set: ``flag`` (option name instead of ``--field-name``), ``aliases`` (more
option names), ``metavar``, ``append`` (a repeatable option collecting into a tuple).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Sequence


def _optional_inner(hint: Any) -> Any:
    """X for Optional[X], else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def option_names(field: dataclasses.Field) -> list[str]:
    return [field.metadata.get("flag", "--" + field.name.replace("_", "-")), *field.metadata.get("aliases", ())]


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One option per field of ``cls``. Defaults are suppressed, so the parsed namespace holds exactly the
    options given (``given_values``); the dataclass applies its own defaults and checks."""
    from dictionary_learning_ext.config import field_docs, field_types, literal_choices

    docs, hints = field_docs(cls), field_types(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = _optional_inner(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = docs.get(field.name, "")
        if default not in (None, (), "", False):
            help_text += f" (default: {list(default) if isinstance(default, tuple) else default})"
        kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text)
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is tuple:
            element = typing.get_args(hint)[0]
            kwargs.update(type=element, **({"action": "append"} if field.metadata.get("append") else {"nargs": "+"}))
        else:
            choices = literal_choices(hint)
            if choices is not None:
                kwargs.update(choices=choices, type=type(choices[0]))
            else:
                kwargs["type"] = hint
        parser.add_argument(*option_names(field), **kwargs)


def given_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (lists as tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items() if k in names}


def run_main(main: Callable[[], int]) -> int:
    """Run an entry point's body: a project error (``VsaeError``) becomes one line on stderr (plus its
    notes, e.g. how to resume) and its exit code; anything else is a bug and keeps its traceback."""
    from dictionary_learning_ext.errors import VsaeError, format_error

    try:
        return main()
    except VsaeError as err:
        print(format_error(err), file=sys.stderr)
        return err.exit_code
