"""Typed settings from TOML and the environment; unknown keys are rejected with a clear message.

Precedence, lowest first: embedded defaults, the config file (`--config PATH` or OPTOUT_CONFIG), the
environment (OPTOUT_DATABASE). No config file at all is fine: the defaults run everything locally.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

from optout.errors import ConfigError

DEFAULT_DATABASE = "var/optout.db"


@dataclass(frozen=True)
class Settings:
    """Everything optout can be configured with."""

    database: str = DEFAULT_DATABASE
    privacy_addresses: tuple[str, ...] = ("privacy@example.com",)
    unsubscribe_addresses: tuple[str, ...] = ("unsubscribe@*",)
    own_addresses: tuple[str, ...] = ()
    request_days: int | None = None
    child_request_days: int = 14
    jurisdiction: str = "gdpr"
    verify_days: int = 7
    fulfil: str = "automatic"
    contact_tables: tuple[str, ...] = ()
    contacts_database: str | None = None
    reply_to_other: bool = False
    daily_reply_cap: int = 5
    lexicon_dir: str | None = None
    imap_url: str | None = field(default=None, repr=False)
    imap_password_file: str | None = None
    imap_review_reasons: tuple[str, ...] = ("unclear", "question", "malformed", "subscribe", "empty", "error")
    imap_processed_folder: str = "Processed"
    imap_review_folder: str = "Review"
    imap_batch_size: int = 500
    imap_poll_seconds: int = 60
    imap_max_message_bytes: int = 32 * 1024 * 1024
    workers: int = 1
    token_key_file: str | None = None
    token_max_age_days: int = 365
    unsubscribe_domain: str = "example.com"
    unsubscribe_url: str = "https://example.com/u/"
    web_listen: str | None = None
    smtp_listen: str = "127.0.0.1:2525"
    smtp_lmtp: bool = False
    smtp_max_message_bytes: int = 10 * 1024 * 1024
    smtp_max_recipients: int = 20
    smtp_command_timeout: int = 300
    smtp_session_timeout: int = 600
    smtp_max_connections: int = 100
    smtp_max_connections_per_ip: int = 10
    lock_file: str = "var/optout.lock"
    reply_from: str | None = None
    organisation: str = ""
    templates_dir: str | None = None
    reply_hourly_cap: int = 100
    sent_maildir: str = "var/sent"
    relay_url: str | None = field(default=None, repr=False)
    relay_username: str | None = None
    relay_password_file: str | None = None
    relay_timeout: int = 30
    relay_data_timeout: int = 600
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    dkim_key_file: str | None = None
    source: str = field(default="embedded defaults", compare=False)
    imap_password: str | None = field(default=None, repr=False, compare=False)
    relay_password: str | None = field(default=None, repr=False, compare=False)
    token_key: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def sender(self) -> str:
        """Return the address replies come from: [replies] from, else the first privacy address."""
        return self.reply_from or self.privacy_addresses[0]


# section -> key -> (Settings field, type, check)
SCHEMA: dict[str, dict[str, tuple[str, type, str | None]]] = {
    "database": {"path": ("database", str, None)},
    "addresses": {
        "privacy": ("privacy_addresses", list, "address"),
        "unsubscribe": ("unsubscribe_addresses", list, "address-pattern"),
        "own": ("own_addresses", list, "address"),
    },
    "requests": {
        "jurisdiction": ("jurisdiction", str, "jurisdiction"),
        "days": ("request_days", int, "positive"),
        "child_days": ("child_request_days", int, "positive"),
        "verify_days": ("verify_days", int, "positive"),
        "fulfil": ("fulfil", str, "fulfil"),
    },
    "contacts": {
        "tables": ("contact_tables", list, "table-column"),
        "database": ("contacts_database", str, None),
    },
    "replies": {
        "to_other": ("reply_to_other", bool, None),
        "daily_cap": ("daily_reply_cap", int, "non-negative"),
        "from": ("reply_from", str, "address"),
        "organisation": ("organisation", str, None),
        "templates_dir": ("templates_dir", str, None),
        "hourly_cap": ("reply_hourly_cap", int, "non-negative"),
        "maildir": ("sent_maildir", str, None),
    },
    "relay": {
        "url": ("relay_url", str, "relay-url"),
        "username": ("relay_username", str, None),
        "password_file": ("relay_password_file", str, None),
        "timeout": ("relay_timeout", int, "positive"),
        "data_timeout": ("relay_data_timeout", int, "positive"),
    },
    "dkim": {
        "selector": ("dkim_selector", str, None),
        "domain": ("dkim_domain", str, None),
        "key_file": ("dkim_key_file", str, None),
    },
    "classify": {"lexicon_dir": ("lexicon_dir", str, None)},
    "imap": {
        "url": ("imap_url", str, "imap-url"),
        "password_file": ("imap_password_file", str, None),
        "processed_folder": ("imap_processed_folder", str, None),
        "review_folder": ("imap_review_folder", str, None),
        "review_reasons": ("imap_review_reasons", list, None),
        "batch_size": ("imap_batch_size", int, "positive"),
        "poll_seconds": ("imap_poll_seconds", int, "positive"),
        "max_message_bytes": ("imap_max_message_bytes", int, "positive"),
    },
    "processing": {"workers": ("workers", int, "non-negative")},
    "web": {"listen": ("web_listen", str, "host-port")},
    "tokens": {
        "key_file": ("token_key_file", str, None),
        "max_age_days": ("token_max_age_days", int, "positive"),
        "domain": ("unsubscribe_domain", str, None),
        "url": ("unsubscribe_url", str, None),
    },
    "smtp": {
        "listen": ("smtp_listen", str, "host-port"),
        "lmtp": ("smtp_lmtp", bool, None),
        "max_message_bytes": ("smtp_max_message_bytes", int, "positive"),
        "max_recipients": ("smtp_max_recipients", int, "positive"),
        "command_timeout": ("smtp_command_timeout", int, "positive"),
        "session_timeout": ("smtp_session_timeout", int, "positive"),
        "max_connections": ("smtp_max_connections", int, "positive"),
        "max_connections_per_ip": ("smtp_max_connections_per_ip", int, "positive"),
    },
    "run": {"lock_file": ("lock_file", str, None)},
}


def _check(value, kind: type, check: str | None, where: str, problems: list[str]):
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}: expected a list of strings")
            return None
        for item in value:
            if check == "table-column" and not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", item, re.ASCII):
                problems.append(f"{where}: {item!r} is not TABLE.COLUMN (plain names)")
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
    if check == "imap-url":
        problem = imap_url_problem(value)
        if problem:
            problems.append(f"{where}: {problem}")
    if check == "address" and isinstance(value, str) and value.count("@") != 1:
        problems.append(f"{where}: {value!r} is not an address")
    if check == "relay-url" and urlsplit(value).scheme not in ("smtp", "smtps", "smtp+starttls"):
        problems.append(f"{where}: {value!r} must start with smtp://, smtps:// or smtp+starttls://")
    if check == "host-port":
        try:
            parse_listen(value)
        except ConfigError as error:
            problems.append(f"{where}: {error}")
    if check == "jurisdiction" and value not in ("gdpr", "ccpa"):
        problems.append(f"{where}: {value!r} is not a jurisdiction optout knows (gdpr, ccpa)")
    if check == "fulfil" and value not in ("automatic", "hold"):
        problems.append(f"{where}: {value!r} must be \"automatic\" or \"hold\"")
    if check == "positive" and value <= 0:
        problems.append(f"{where}: must be greater than 0")
    if check == "non-negative" and value < 0:
        problems.append(f"{where}: must not be negative")
    return value


def parse_listen(value: str, where: str = "listen") -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:2525") into host and port."""
    host, colon, port = value.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not host:port (for example 127.0.0.1:2525)")
    return host, int(port)


def imap_url_problem(url: str) -> str | None:
    """Say what is wrong with an IMAP URL (imap://user[:password]@host[:port][/FOLDER], imaps://…), or None."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("imap", "imaps", "imap+starttls"):
        return f"{_redact(url)!r}: the scheme must be imap://, imaps:// or imap+starttls://"
    if not parsed.hostname:
        return f"{_redact(url)!r}: no host"
    if not parsed.username:
        return f"{_redact(url)!r}: no user name"
    try:
        parsed.port
    except ValueError:
        return f"{_redact(url)!r}: bad port"
    return None


def _redact(url: str) -> str:
    parsed = urlsplit(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _imap_password(values: dict, environ: dict[str, str]) -> str | None:
    # Secrets come from the environment or a file, never from the config file itself (or, on loopback, the URL).
    secret = _secret(environ.get("OPTOUT_IMAP_PASSWORD"),
                     values.get("imap_password_file") or environ.get("OPTOUT_IMAP_PASSWORD_FILE"), "IMAP password file")
    if secret is not None:
        return secret
    url = values.get("imap_url")
    if url and urlsplit(url).password:
        return unquote(urlsplit(url).password)
    return None


def _secret(value: str | None, path: str | None, what: str) -> str | None:
    if value:
        return value
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"{what} {path}: {error.strerror or error}") from None
    return None


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


def read_table(path: Path) -> dict:
    """Read a config file's TOML table; a missing, unreadable or invalid file is a ConfigError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({error})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


def check_config(path: str | Path) -> list[str]:
    """Return every problem of a config file at once (file, key, why); an empty list when it is fine."""
    try:
        problems = problems_in(read_table(Path(path)), str(path))[1]
    except ConfigError as error:
        return [str(error)]
    if not problems:
        try:  # what only loading shows: the environment and the secret files
            load_settings(path)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Load settings: defaults, then the config file (argument or OPTOUT_CONFIG), then the environment."""
    environ = dict(os.environ) if environ is None else environ
    path = path or environ.get("OPTOUT_CONFIG") or None
    values: dict = {}
    source = "embedded defaults"
    if path:
        config_path = Path(path)
        values, problems = problems_in(read_table(config_path), str(config_path))
        if problems:
            raise ConfigError("; ".join(problems))
        source = str(config_path)
    if environ.get("OPTOUT_DATABASE"):
        values["database"] = environ["OPTOUT_DATABASE"]
    if environ.get("OPTOUT_IMAP_URL"):
        problem = imap_url_problem(environ["OPTOUT_IMAP_URL"])
        if problem:
            raise ConfigError(f"OPTOUT_IMAP_URL: {problem}")
        values["imap_url"] = environ["OPTOUT_IMAP_URL"]
    if environ.get("OPTOUT_SMTP_LISTEN"):
        parse_listen(environ["OPTOUT_SMTP_LISTEN"], "OPTOUT_SMTP_LISTEN")
        values["smtp_listen"] = environ["OPTOUT_SMTP_LISTEN"]
    if environ.get("OPTOUT_WEB_LISTEN"):
        parse_listen(environ["OPTOUT_WEB_LISTEN"], "OPTOUT_WEB_LISTEN")
        values["web_listen"] = environ["OPTOUT_WEB_LISTEN"]
    if environ.get("OPTOUT_RELAY_URL"):
        if urlsplit(environ["OPTOUT_RELAY_URL"]).scheme not in ("smtp", "smtps", "smtp+starttls"):
            raise ConfigError("OPTOUT_RELAY_URL must start with smtp://, smtps:// or smtp+starttls://")
        values["relay_url"] = environ["OPTOUT_RELAY_URL"]
    values["imap_password"] = _imap_password(values, environ)
    key = _secret(environ.get("OPTOUT_TOKEN_KEY"), values.get("token_key_file") or environ.get("OPTOUT_TOKEN_KEY_FILE"),
                  "token key file")
    values["token_key"] = key.encode("utf-8") if key else None
    values["relay_password"] = _secret(environ.get("OPTOUT_RELAY_PASSWORD"),
                                       values.get("relay_password_file") or environ.get("OPTOUT_RELAY_PASSWORD_FILE"),
                                       "relay password file")
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known}, source=source)
