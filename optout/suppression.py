"""Import, export and scrub the suppression list: pure functions over lines and rows, plus thin Store use.

- An address is matched normalised (model.normalise_address): trimmed, lower-cased, IDNA domain.
- A deletion tombstone is a row whose reason is "deletion", or a row that keeps only the DROP hash of an
  address (no address). It keeps the address out of every mailing: removing it needs --force.
- Scopes nest under "all": a send for scope S skips addresses suppressed in S or in "all"; a send with
  no scope skips addresses suppressed in any scope.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from hashlib import sha256
from typing import Callable, Iterable, Iterator, TextIO

from optout.model import drop_hash, normalise_address

TOMBSTONE_REASON = "deletion"
ADDRESS_KEYS = ("email", "address", "e-mail", "mail", "email_address", "email address")
SCOPE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
ALL = "all"


@dataclass(frozen=True)
class Entry:
    """One valid row of an import file: the normalised address and the scope and reason to suppress it with."""

    line: int
    address: str
    display: str
    scope: str
    reason: str


@dataclass(frozen=True)
class Problem:
    """One invalid row of an import file: its line number and why it was skipped."""

    line: int
    why: str


def is_tombstone(row: dict) -> bool:
    """Say whether a suppression row is a deletion tombstone (reason "deletion", or a hash without an address)."""
    return row.get("reason") == TOMBSTONE_REASON or not row.get("address")


def tombstone_refusal(address: str) -> Callable[[list[dict]], str | None]:
    """Return the check Store.remove_suppression runs: refuse when any row of the address is a tombstone."""
    def refuse(rows: list[dict]) -> str | None:
        tombstones = [row for row in rows if is_tombstone(row)]
        if not tombstones:
            return None
        first = tombstones[0]
        return (f"{address} has a deletion tombstone (scope {first['scope']}, since {first['created_at'][:10]}): "
                f"it must not be mailed again; use --force if the person asked for it")
    return refuse


def scope_problem(scope: str) -> str | None:
    """Say what is wrong with a scope name, or None."""
    if not SCOPE_PATTERN.match(scope):
        return f"{scope!r} is not a scope (lower-case letters, digits, - and _, e.g. all, newsletters, partners)"
    return None


def scopes_for(scope: str | None) -> tuple[str, ...] | None:
    """Return the suppression scopes that stop a send of this scope (None: every scope)."""
    if scope is None:
        return None
    return (ALL,) if scope == ALL else (ALL, scope)


def address_problem(text: str) -> str | None:
    """Say why a string is not a usable email address, or None when it is one."""
    text = text.strip().strip("<>").strip()
    if not text:
        return "empty address"
    if len(text) > 254:
        return "longer than 254 characters"
    local, at, domain = text.rpartition("@")
    if not at:
        return f"{text!r} has no @"
    if not local:
        return f"{text!r} has nothing before the @"
    if not domain:
        return f"{text!r} has no domain"
    if any(c.isspace() for c in text):
        return f"{text!r} contains a space"
    if "@" in local and not (local.startswith('"') and local.endswith('"')):
        return f"{text!r} has more than one @"
    if len(local.encode("utf-8")) > 64:
        return f"{text!r}: the local part is longer than 64 octets (RFC 5321)"
    try:
        ascii_domain = domain.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return f"{text!r}: the domain {domain!r} is not a valid (IDNA) domain name"
    if "." not in ascii_domain or any(not label for label in ascii_domain.split(".")):
        return f"{text!r}: the domain {domain!r} is not a full domain name"
    if not re.fullmatch(r"[A-Za-z0-9.-]+", ascii_domain) and not ascii_domain.startswith("["):
        return f"{text!r}: the domain {domain!r} has characters a domain cannot have"
    if any(label.startswith("-") or label.endswith("-") for label in ascii_domain.split(".")):
        return f"{text!r}: a label of the domain {domain!r} starts or ends with -"
    return None


# ---------------------------------------------------------------- import

def detect_format(first_line: str) -> str:
    """Return "jsonl", "csv" or "plain" from the first non-empty line of an import file."""
    line = first_line.strip().lstrip("\ufeff")
    if line.startswith("{"):
        return "jsonl"
    try:
        header = next(csv.reader([line], _sniff(line)))
    except (csv.Error, StopIteration):
        return "plain"
    if any(cell.strip().lower() in ADDRESS_KEYS for cell in header):
        return "csv"
    return "plain"


def _sniff(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        return csv.excel


def read_import(lines: Iterable[str], scope: str, reason: str) -> Iterator[Entry | Problem]:
    """Yield an Entry for every valid row of an import file and a Problem (line number, why) for every other.

    The format is detected from the first non-empty line: JSON lines (an object with an "email" or
    "address" key), CSV with a header naming an email or address column, or one address per line.
    CSV and JSON rows may carry their own "scope" and "reason"; empty ones take the defaults.
    """
    lines = iter(lines)
    number = 0
    first = ""
    for first in lines:
        number += 1
        if first.strip():
            break
    else:
        return
    fmt = detect_format(first)
    if fmt == "jsonl":
        yield from _read_jsonl(number, first, lines, scope, reason)
    elif fmt == "csv":
        yield from _read_csv(number, first, lines, scope, reason)
    else:
        yield from _read_plain(number, first, lines, scope, reason)


def _entry(line: int, value, display, scope, reason) -> Entry | Problem:
    if not isinstance(value, str):
        return Problem(line, "the address is not a string")
    why = address_problem(value)
    if why:
        return Problem(line, why)
    scope = (scope or "").strip().lower()
    why = scope_problem(scope)
    if why:
        return Problem(line, why)
    return Entry(line, normalise_address(value), (display or value).strip(), scope, (reason or "").strip())


def _read_plain(number: int, first: str, lines: Iterator[str], scope: str, reason: str) -> Iterator[Entry | Problem]:
    for line in _numbered(number, first, lines):
        text = line[1].strip()
        if text and not text.startswith("#"):
            yield _entry(line[0], text, None, scope, reason)


def _numbered(number: int, first: str, lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    yield number, first.lstrip("\ufeff")
    for line in lines:
        number += 1
        yield number, line


def _read_jsonl(number: int, first: str, lines: Iterator[str], scope: str, reason: str) -> Iterator[Entry | Problem]:
    for line_number, line in _numbered(number, first, lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            yield Problem(line_number, f"not JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            yield Problem(line_number, "not a JSON object")
            continue
        key = next((k for k in ("email", "address") if k in record), None)
        if key is None:
            yield Problem(line_number, 'no "email" or "address" key')
            continue
        yield _entry(line_number, record[key], record.get("display") if isinstance(record.get("display"), str)
                     else None, record.get("scope") or scope, record.get("reason") or reason)


def _read_csv(number: int, first: str, lines: Iterator[str], scope: str, reason: str) -> Iterator[Entry | Problem]:
    header_line = first.lstrip("\ufeff")
    dialect = _sniff(header_line)
    source = _numbered(number, header_line, lines)
    physical = {"line": number}

    def feed() -> Iterator[str]:
        for line_number, line in source:
            physical["line"] = line_number
            yield line

    reader = csv.reader(feed(), dialect)
    header = [cell.strip().lower() for cell in next(reader)]
    column = next(i for i, cell in enumerate(header) if cell in ADDRESS_KEYS)
    scope_column = header.index("scope") if "scope" in header else None
    reason_column = header.index("reason") if "reason" in header else None
    try:
        for row in reader:
            line_number = physical["line"]
            if not any(cell.strip() for cell in row):
                continue
            if column >= len(row):
                yield Problem(line_number, f"no {header[column]} column in this row ({len(row)} fields)")
                continue
            row_scope = row[scope_column] if scope_column is not None and scope_column < len(row) else ""
            row_reason = row[reason_column] if reason_column is not None and reason_column < len(row) else ""
            yield _entry(line_number, row[column], None, row_scope or scope, row_reason or reason)
    except csv.Error as error:
        yield Problem(physical["line"], f"bad CSV ({error}); the rest of the file was not read")


# ---------------------------------------------------------------- export

EXPORT_COLUMNS = ("address", "address_hash", "scope", "reason", "created_at")


def export_csv(rows: Iterable[dict], out: TextIO) -> int:
    """Write suppression rows as CSV with a header; return how many."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([row.get(column) or "" for column in EXPORT_COLUMNS])
        count += 1
    return count


def export_json(rows: Iterable[dict], out: TextIO) -> int:
    """Write suppression rows as JSON lines (which `suppression import` reads back); return how many."""
    count = 0
    for row in rows:
        out.write(json.dumps({column: row.get(column) for column in EXPORT_COLUMNS}, ensure_ascii=False) + "\n")
        count += 1
    return count


def export_drop(rows: Iterable[dict], out: TextIO) -> int:
    """Write each suppressed address once in the California DROP form (base64 SHA-256), sorted; return how many."""
    hashes = sorted({row.get("address_hash") or drop_hash(row["address"]) for row in rows})
    out.writelines(h + "\n" for h in hashes)
    return len(hashes)


# ---------------------------------------------------------------- scrub

@dataclass
class ScrubResult:
    """What a scrub did: rows kept and removed, the removals per reason, rows without an address."""

    kept: int = 0
    removed: int = 0
    reasons: Counter = field(default_factory=Counter)
    blank: int = 0

    def as_dict(self) -> dict:
        """Return the result as plain values for JSON."""
        return {"kept": self.kept, "removed": self.removed, "reasons": dict(self.reasons.most_common()),
                "without_address": self.blank}


def find_column(header: list[str], name: str) -> int:
    """Return the index of a column by name (case and surrounding space ignored); ValueError when absent."""
    wanted = name.strip().lower()
    for index, cell in enumerate(header):
        if cell.strip().lstrip("\ufeff").lower() == wanted:
            return index
    raise ValueError(f"no column {name!r} (columns: {', '.join(header)})")


def scrub_lines(lines: Iterable[str], column: int, dialect, addresses: dict[str, str], hashes: dict[str, str],
                write: Callable[[str], object]) -> ScrubResult:
    """Pass every CSV record (lines after the header) whose address is not suppressed to `write`, unchanged.

    `addresses` maps normalised addresses to a reason; `hashes` maps DROP hashes of tombstones that keep
    no address to a reason. Rows without an address are kept (there is nothing to match). A record is
    written back byte for byte as it was read, so quoting, spacing and line endings survive.
    """
    removed: Counter = Counter()
    kept = blank = 0
    get = addresses.get
    digests = {base64.b64decode(h): reason for h, reason in hashes.items()}
    get_digest = digests.get
    delimiter, quote = dialect.delimiter, dialect.quotechar or '"'
    pending = ""
    for line in lines:
        if pending or quote in line:
            # The slow path: a quoted field, which may hold delimiters, quotes or line breaks.
            record = pending + line
            if record.count(quote) % 2:
                pending = record
                continue
            pending = ""
            line = record
            try:
                cells = next(csv.reader([record], dialect))
            except StopIteration:
                cells = []
            cell = cells[column] if column < len(cells) else ""
        else:
            cells = line.split(delimiter, column + 1)
            cell = cells[column] if column < len(cells) else ""
        # The fast path of normalise_address: for plain ASCII, strip and lower-case is the whole rule.
        value = cell.strip().lower()
        if not value:
            write(line)
            if line.strip():
                blank += 1
                kept += 1
            continue
        if not value.isascii() or value[-1] == "." or "<" in value or ">" in value or " " in value or "\t" in value:
            value = normalise_address(cell)
        reason = get(value)
        if reason is None and digests:
            reason = get_digest(sha256(value.encode("utf-8")).digest())
        if reason is None:
            write(line)
            kept += 1
        else:
            removed[reason] += 1
    if pending:
        raise csv.Error(f"a quoted field is not closed ({pending[:40]!r}…)")
    return ScrubResult(kept, sum(removed.values()), removed, blank)


def read_header(lines: Iterator[str]) -> tuple[str, list[str], type[csv.Dialect] | csv.Dialect]:
    """Read the header record of a CSV file: its text as it was, its cells and the file's dialect."""
    record = ""
    for line in lines:
        record += line
        if record.count('"') % 2 == 0:
            break
    if not record.strip():
        raise ValueError("empty file, no header row")
    dialect = _sniff(record.lstrip("\ufeff"))
    return record, next(csv.reader([record.lstrip("\ufeff")], dialect)), dialect


def parse_since(text: str, now: datetime) -> datetime:
    """Return the moment a --since value names: a date (2026-11-01), an ISO time, or an age (7d, 12h)."""
    text = text.strip()
    match = re.fullmatch(r"(\d+)([dh])", text)
    if match:
        amount = int(match.group(1))
        return now - (timedelta(days=amount) if match.group(2) == "d" else timedelta(hours=amount))
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
