"""Settings dataclasses <-> command lines and JSON files: one helper for the bench, the app and every training step.

A settings class is a dataclass with one commented line a field; ``parse`` turns each field into a ``--field-name``
flag whose help is the field's comment, with its default shown. A field's type says how its value is read (``int |
None`` reads an int; a tuple reads a comma-separated list; a bool may be given alone, ``--share``, or with a value,
``--share false``); ``field(metadata={"choices": ...})`` limits the values. A class may check a whole set of values
in ``__post_init__``: a ValueError there becomes the usual argparse error (exit 2, with the message).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import time
import types
import typing
from pathlib import Path

_FIELD = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def field_help(cls) -> dict[str, str]:
    """The comment after each field of a settings dataclass (its --help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD.match, source.splitlines()) if m}


def to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _reader(hint, default):
    """How a flag's text becomes the field's value: from the field's type, else from its default."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None reads an X
    if hint is bool or isinstance(default, bool):
        return to_bool
    if typing.get_origin(hint) in (tuple, list) or isinstance(default, (tuple, list)):
        return lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
    if hint in (int, float, str):
        return hint
    return str if default is None else type(default)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def build_parser(cls, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field-name`` flag per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = _default(f)
        read = _reader(hints.get(f.name), default)
        extra = {"nargs": "?", "const": True} if read is to_bool else {}
        choices = f.metadata.get("choices")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=read, default=default,
                            choices=list(choices) if choices else None, metavar=None if choices else f.name.upper(),
                            help=f"{helps.get(f.name, '')} (default: {_shown(default)})".replace("%", "%%"), **extra)
    return parser


def parse(cls, argv=None, description: str | None = None, prog: str | None = None):
    """Parse ``--field-name value`` flags into an instance of the dataclass ``cls`` (exit 2 with a message when a
    value, or the whole set, is refused)."""
    parser = build_parser(cls, description, prog)
    args = vars(parser.parse_args(argv))
    try:
        return cls(**args)
    except ValueError as exc:
        parser.error(str(exc))


def save_settings(settings, path: str | Path, **extra) -> None:
    """Write the settings (plus extra facts) as JSON beside an output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"settings": dataclasses.asdict(settings), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")} | extra
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """The short summary every step prints at its end."""
    width = max(len(k) for k, _ in rows) if rows else 0
    print(f"\n== {title} ==")
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key.ljust(width)}  {value}")
