"""Settings dataclasses <-> command lines and JSON files, shared by every training step."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import time
from pathlib import Path

_FIELD = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def _field_help(cls) -> dict[str, str]:
    """The comment after each field of a settings dataclass becomes its --help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD.match, source.splitlines()) if m}


def _to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def parse(cls, argv=None, description: str | None = None):
    """Parse ``--field-name value`` flags into an instance of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default)
        if isinstance(default, bool):
            kind = _to_bool
        elif default is None:
            kind = str
        elif isinstance(default, (list, tuple)):
            kind = str
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default,
                            help=f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    return cls(**args)


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
