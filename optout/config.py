"""Typed settings from TOML and the environment; unknown keys are rejected with a clear message.

Precedence, lowest first: embedded defaults, the config file (`--config PATH` or OPTOUT_CONFIG), the
environment (OPTOUT_DATABASE). No config file at all is fine: the defaults run everything locally.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from optout.errors import ConfigError

DEFAULT_DATABASE = "var/optout.db"


@dataclass(frozen=True)
class Settings:
    """Everything optout can be configured with."""

    database: str = DEFAULT_DATABASE
    privacy_addresses: tuple[str, ...] = ("privacy@example.com",)
    unsubscribe_addresses: tuple[str, ...] = ("unsubscribe@*",)
    own_addresses: tuple[str, ...] = ()
    request_days: int = 30
    child_request_days: int = 14
    reply_to_other: bool = False
    daily_reply_cap: int = 5
    lexicon_dir: str | None = None
    source: str = field(default="embedded defaults", compare=False)


# section -> key -> (Settings field, type, check)
SCHEMA: dict[str, dict[str, tuple[str, type, str | None]]] = {
    "database": {"path": ("database", str, None)},
    "addresses": {
        "privacy": ("privacy_addresses", list, "address"),
        "unsubscribe": ("unsubscribe_addresses", list, "address-pattern"),
        "own": ("own_addresses", list, "address"),
    },
    "requests": {
        "days": ("request_days", int, "positive"),
        "child_days": ("child_request_days", int, "positive"),
    },
    "replies": {
        "to_other": ("reply_to_other", bool, None),
        "daily_cap": ("daily_reply_cap", int, "non-negative"),
    },
    "classify": {"lexicon_dir": ("lexicon_dir", str, None)},
}


def _check(value, kind: type, check: str | None, where: str, problems: list[str]):
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}: expected a list of strings")
            return None
        for item in value:
            if check in ("address", "address-pattern") and item.count("@") != 1:
                problems.append(f"{where}: {item!r} is not an address")
            elif check == "address" and "*" in item:
                problems.append(f"{where}: {item!r}: wildcards are only allowed in [addresses] unsubscribe")
        return tuple(v.strip() for v in value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{where}: expected a whole number, got {value!r}")
        return None
    if kind is bool and not isinstance(value, bool):
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if kind is str and not isinstance(value, str):
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    if check == "positive" and value <= 0:
        problems.append(f"{where}: must be greater than 0")
    if check == "non-negative" and value < 0:
        problems.append(f"{where}: must not be negative")
    return value


def problems_in(table: dict, name: str) -> tuple[dict, list[str]]:
    """Return the settings a parsed TOML table gives and every problem in it (file, key, why)."""
    values: dict = {}
    problems: list[str] = []
    for section, content in table.items():
        if section not in SCHEMA:
            problems.append(f"{name}: unknown section [{section}] (known: {', '.join(SCHEMA)})")
            continue
        if not isinstance(content, dict):
            problems.append(f"{name}: {section} must be a table ([{section}])")
            continue
        for key, value in content.items():
            spec = SCHEMA[section].get(key)
            if spec is None:
                problems.append(f"{name}: unknown key {section}.{key} (known in [{section}]: "
                                f"{', '.join(SCHEMA[section])})")
                continue
            attribute, kind, check = spec
            checked = _check(value, kind, check, f"{name}: {section}.{key}", problems)
            if checked is not None:
                values[attribute] = checked
    return values, problems


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Load settings: defaults, then the config file (argument or OPTOUT_CONFIG), then the environment."""
    environ = dict(os.environ) if environ is None else environ
    path = path or environ.get("OPTOUT_CONFIG") or None
    values: dict = {}
    source = "embedded defaults"
    if path:
        config_path = Path(path)
        try:
            text = config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{config_path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{config_path}: cannot read it ({error})") from None
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{config_path}: not valid TOML ({error})") from None
        values, problems = problems_in(table, str(config_path))
        if problems:
            raise ConfigError("; ".join(problems))
        source = str(config_path)
    if environ.get("OPTOUT_DATABASE"):
        values["database"] = environ["OPTOUT_DATABASE"]
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known}, source=source)
