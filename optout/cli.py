"""The click group `optout`: thin wrappers over the modules that do the work."""

from __future__ import annotations

import json
import mailbox
import os
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import click

from optout.config import Settings, load_settings
from optout.errors import InputError, OptoutError

EXIT_CODES = """\b
Exit codes:
  0   success
  1   `suppression check`: an address is not suppressed;
      `audit verify`: the audit chain is broken
  2   usage error (unknown option, missing argument)
  3   config or phrase-table error; `config check`: the config has
      problems
  4   an input file or mailbox cannot be read
  5   database error
  6   the IMAP server cannot be reached or refuses the login
  7   another `optout run` is in progress (the lock is held)
  8   refused: `suppression remove` of an address with a deletion
      tombstone (use --force); `requests fulfil` of a request not
      confirmed; a change to a closed request; an extension past
      what the jurisdiction allows
  70  internal error (a bug: please report it)
  75  the database is busy or full: try again later
"""


@dataclass
class Context:
    """What every command gets: the settings, and the store and pipeline made from them on first use."""

    settings: Settings
    config_path: str | None = None
    _store: object = None
    _pipeline: object = None

    @property
    def store(self):
        """Open the database on first use."""
        if self._store is None:
            from optout.store import Store

            self._store = Store(self.settings.database)
        return self._store

    @property
    def pipeline(self):
        """Load the phrase tables and rules on first use."""
        if self._pipeline is None:
            from optout.daemon import make_pipeline

            self._pipeline = make_pipeline(self.settings)
        return self._pipeline

    def close(self) -> None:
        """Close the store if it was opened."""
        if self._store is not None:
            self._store.close()


def now() -> datetime:
    """Return the current time, aware and in UTC (OPTOUT_NOW overrides it, for tests and demos)."""
    fixed = os.environ.get("OPTOUT_NOW")
    if fixed:
        try:
            moment = datetime.fromisoformat(fixed)
        except ValueError:
            raise OptoutError(f"OPTOUT_NOW={fixed!r} is not an ISO 8601 time") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return datetime.now(timezone.utc)


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="OPTOUT_CONFIG", metavar="PATH",
              help="Config file (TOML). Default: none, embedded defaults.")
@click.option("--database", envvar="OPTOUT_DATABASE", metavar="PATH",
              help="SQLite database file. Default: var/optout.db.")
@click.version_option(package_name="optout")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database: str | None) -> None:
    """Read the mail people send to privacy@ and act on it: opt-outs, access and deletion requests."""
    if ctx.invoked_subcommand == "config":
        # `config check` reports the problems of a config itself: it must not fail on loading it.
        ctx.obj = Context(Settings(), config_path=config_path or os.environ.get("OPTOUT_CONFIG") or None)
        return
    settings = load_settings(config_path)
    if database:
        settings = Settings(**{**settings.__dict__, "database": database})
    state = Context(settings)
    ctx.obj = state
    ctx.call_on_close(state.close)


# ---------------------------------------------------------------- reading mail

def _read_paths(paths: tuple[str, ...], mboxes: tuple[str, ...] = (), maildirs: tuple[str, ...] = ()) -> Iterator[tuple[str, bytes]]:
    for name in paths:
        if name == "-":
            yield "-", sys.stdin.buffer.read()
            continue
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".eml", ".msg", ".txt"))
            if not files:
                raise InputError(f"{path}: no .eml files in this folder")
            for file in files:
                yield str(file), _read_file(file)
        else:
            yield str(path), _read_file(path)
    for name in mboxes:
        if not Path(name).is_file():
            raise InputError(f"{name}: no such mbox file")
        box = mailbox.mbox(name, create=False)
        try:
            for index, key in enumerate(box.iterkeys()):
                yield f"{name}#{index + 1}", box.get_bytes(key)
        finally:
            box.close()
    for name in maildirs:
        if not (Path(name) / "cur").is_dir() and not (Path(name) / "new").is_dir():
            raise InputError(f"{name}: not a maildir (no cur/ or new/ folder)")
        box = mailbox.Maildir(name, factory=None, create=False)
        for key in sorted(box.iterkeys()):
            yield f"{name}/{key}", box.get_bytes(key)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror})") from None


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([click.style(line(headers), bold=True)] + [line(r) for r in rows])


def _classification_json(path: str, message, classification) -> dict:
    return {
        "path": path,
        "kind": classification.kind.value,
        "reason": classification.reason,
        "scope": classification.scope,
        "sender": message.sender,
        "language": classification.language,
        "rule": classification.rule,
        "evidence": list(classification.evidence),
        "confidence": classification.confidence,
        "flags": list(classification.flags),
        "machine": classification.machine,
        "malformed": message.malformed,
    }


# ---------------------------------------------------------------- commands

@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def classify(state: Context, paths: tuple[str, ...], as_json: bool) -> None:
    """Classify mail files without writing anything, and show why.

    PATHS are .eml files, folders of them, or - for standard input.
    """
    from optout.process import examine

    pipeline = state.pipeline
    rows = []
    for path, raw in _read_paths(paths):
        message, classification = examine(raw, pipeline)
        if as_json:
            click.echo(json.dumps(_classification_json(path, message, classification), ensure_ascii=False))
            continue
        rows.append([path, classification.kind.value, classification.reason, classification.scope or "",
                     ",".join(classification.flags), classification.language or "", classification.rule,
                     f"{classification.confidence:.2f}", "; ".join(classification.evidence)[:80]])
    if rows:
        click.echo(_table(rows, ["path", "kind", "reason", "scope", "flags", "lang", "rule", "conf", "evidence"]))


@cli.command()
@click.argument("paths", nargs=-1)
@click.option("--mbox", "mboxes", multiple=True, type=click.Path(dir_okay=False), help="An mbox file to process.")
@click.option("--maildir", "maildirs", multiple=True, type=click.Path(file_okay=False), help="A maildir to process.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, then a summary object.")
@click.option("--list/--no-list", "listing", default=None, help="One line per message (default: up to 50 messages).")
@click.pass_obj
def process(state: Context, paths: tuple[str, ...], mboxes: tuple[str, ...], maildirs: tuple[str, ...],
            as_json: bool, listing: bool | None) -> None:
    """Process mail: classify, decide and record each message exactly once, then summarise."""
    from optout.process import process as process_one

    if not (paths or mboxes or maildirs):
        raise click.UsageError("give at least one PATH, --mbox or --maildir")
    store, pipeline = state.store, state.pipeline
    items = list(_read_paths(paths, mboxes, maildirs))
    show = (len(items) <= 50) if listing is None else listing
    counts: Counter = Counter()
    suppressions = requests = duplicates = 0
    rows = []
    progress = click.progressbar(items, label="processing", file=sys.stderr) if (
        len(items) > 50 and not as_json and sys.stderr.isatty()) else None
    iterator = progress if progress is not None else items
    try:
        for path, raw in iterator:
            outcome = process_one(raw, "file", store, pipeline, now())
            classification, decision = outcome.classification, outcome.decision
            if outcome.duplicate:
                duplicates += 1
            else:
                counts[classification.kind.value] += 1
                suppressions += len(decision.suppressions)
                requests += len(outcome.request_ids)
            action = "duplicate" if outcome.duplicate else decision.action
            if as_json:
                record = _classification_json(path, outcome.message, classification)
                record.update(key=outcome.key, duplicate=outcome.duplicate, action=action,
                              requests=list(outcome.request_ids), may_reply=decision.may_reply,
                              no_reply_reason=decision.no_reply_reason)
                click.echo(json.dumps(record, ensure_ascii=False))
            elif show:
                rows.append([Path(path).name[:40], classification.kind.value,
                             classification.scope or classification.reason, outcome.message.sender or "-", action])
    finally:
        if progress is not None:
            progress.render_finish()
    summary = {"messages": len(items), "new": len(items) - duplicates, "duplicates": duplicates,
               "kinds": {k: counts.get(k, 0) for k in ("opt-out", "access", "deletion", "other")},
               "suppressions_added": suppressions, "requests_opened": requests}
    if as_json:
        click.echo(json.dumps({"summary": summary}))
        return
    if rows:
        click.echo(_table(rows, ["message", "kind", "scope/reason", "sender", "action"]))
        click.echo()
    kinds = ", ".join(f"{v} {k}" for k, v in summary["kinds"].items())
    click.echo(f"{summary['messages']} messages: {summary['new']} new ({kinds}), {duplicates} already processed.")
    click.echo(f"{suppressions} suppressions added, {requests} requests opened. Database: {state.settings.database}")


def _since(value: str | None) -> datetime | None:
    from optout.suppression import parse_since

    if value is None:
        return None
    try:
        return parse_since(value, now())
    except ValueError:
        raise click.BadParameter(f"{value!r}: use a date (2026-11-01), an ISO time or an age (7d, 12h)",
                                 param_hint="--since") from None


def _scope(value: str | None) -> str | None:
    from optout.suppression import scope_problem

    if value is None:
        return None
    value = value.strip().lower()
    problem = scope_problem(value)
    if problem:
        raise click.BadParameter(problem, param_hint="--scope")
    return value


def _show_progress(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty()


@cli.group()
def suppression() -> None:
    """Inspect and administer the suppression list: list, check, add, remove, import, export."""


@suppression.command("list")
@click.option("--scope", help="Only this scope (all, newsletters, partners, …).")
@click.option("--since", metavar="DATE", help="Only suppressions since DATE (2026-11-01, an ISO time, or 7d).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.pass_obj
def suppression_list(state: Context, scope: str | None, since: str | None, as_json: bool, as_csv: bool) -> None:
    """List suppressed addresses, oldest first."""
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if since is None:
        rows = state.store.suppressions(scope)
    else:
        rows = [{k: r[k] for k in ("address", "display", "scope", "reason", "created_at")}
                for r in state.store.suppression_rows(scope, _since(since))]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    if as_csv:
        import csv

        writer = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
        writer.writerow(["address", "display", "scope", "reason", "created_at"])
        writer.writerows([r["address"] or "", r["display"] or "", r["scope"], r["reason"], r["created_at"]]
                         for r in rows)
        return
    if not rows:
        click.echo("The suppression list is empty." if since is None and scope is None
                   else "No suppressions match.")
        return
    click.echo(_table([[r["address"] or "(hash only)", r["scope"], r["reason"], r["created_at"]] for r in rows],
                      ["address", "scope", "reason", "since"]))
    click.echo(f"\n{len(rows)} suppressions")


@suppression.command("check")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per address.")
@click.pass_obj
def suppression_check(state: Context, addresses: tuple[str, ...], as_json: bool) -> None:
    """Say whether addresses are suppressed; exit 0 when all are, 1 when any is not."""
    from optout.model import normalise_address

    missing = False
    for address in addresses:
        rows = state.store.suppressed(address)
        missing = missing or not rows
        if as_json:
            click.echo(json.dumps({"address": normalise_address(address), "suppressed": bool(rows),
                                   "scopes": [r["scope"] for r in rows],
                                   "reasons": [r["reason"] for r in rows]}, ensure_ascii=False))
        elif rows:
            scopes = ", ".join(f"{r['scope']} ({r['reason']}, since {r['created_at'][:10]})" for r in rows)
            click.echo(f"{normalise_address(address)}: suppressed — {scopes}")
        else:
            click.echo(f"{normalise_address(address)}: not suppressed")
    if missing:
        sys.exit(1)


@suppression.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--scope", required=True, help="The scope: all, newsletters, partners, …")
@click.option("--reason", required=True, help="Why (kept with the row and in the audit log).")
@click.option("--json", "as_json", is_flag=True, help="A JSON object: added and already suppressed addresses.")
@click.pass_obj
def suppression_add(state: Context, addresses: tuple[str, ...], scope: str, reason: str, as_json: bool) -> None:
    """Suppress addresses in a scope, audited, in one transaction; addresses already there are left alone."""
    from optout.model import normalise_address
    from optout.suppression import address_problem

    scope = _scope(scope)
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="--reason")
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise InputError(problem)
    entries = [(normalise_address(a), a.strip(), scope, reason.strip()) for a in dict.fromkeys(addresses)]
    added = {row["address"] for row in state.store.add_suppressions(entries, now(), source="cli")}
    present = [e[0] for e in entries if e[0] not in added]
    if as_json:
        click.echo(json.dumps({"scope": scope, "added": sorted(added), "already": present}, ensure_ascii=False))
        return
    for address, *_ in entries:
        click.echo(f"{address}: {'suppressed' if address in added else 'already suppressed'} in {scope}")


@suppression.command("remove")
@click.argument("address")
@click.option("--scope", required=True, help="The scope to remove the address from.")
@click.option("--reason", required=True, help="Why (kept in the audit log).")
@click.option("--force", is_flag=True, help="Remove it even though the address has a deletion tombstone.")
@click.option("--json", "as_json", is_flag=True, help="A JSON object: the rows removed.")
@click.pass_obj
def suppression_remove(state: Context, address: str, scope: str, reason: str, force: bool, as_json: bool) -> None:
    """Let an address be mailed again in a scope, audited; a deletion tombstone refuses without --force."""
    from optout.model import normalise_address
    from optout.suppression import tombstone_refusal

    scope = _scope(scope)
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="--reason")
    normal = normalise_address(address)
    refuse = None if force else tombstone_refusal(normal)
    removed = state.store.remove_suppression(normal, scope, reason.strip(), now(), refuse=refuse)
    if as_json:
        click.echo(json.dumps({"address": normal, "scope": scope, "removed": [
            {k: r[k] for k in ("scope", "reason", "created_at")} for r in removed]}, ensure_ascii=False))
        return
    if removed:
        click.echo(f"{normal}: no longer suppressed in {scope} (was: {removed[0]['reason']})")
    else:
        click.echo(f"{normal}: was not suppressed in {scope}; nothing changed")


@suppression.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--scope", default="all", show_default=True, help="Scope for rows that do not name one.")
@click.option("--reason", default="import", show_default=True, help="Reason for rows that do not give one.")
@click.option("--json", "as_json", is_flag=True, help="The summary (and every invalid row) as a JSON object.")
@click.pass_obj
def suppression_import(state: Context, file: str, scope: str, reason: str, as_json: bool) -> None:
    """Import addresses from FILE in one transaction; importing the same file twice changes nothing.

    FILE is CSV with a header naming an email or address column (optional scope and reason columns),
    JSON lines with an "email" or "address" key, or one address per line — detected from the first line.
    Invalid rows are reported on stderr with their line numbers and skipped; the valid ones are applied.
    """
    from optout.suppression import Entry, read_import

    scope = _scope(scope)
    data = sys.stdin.buffer.read() if file == "-" else _read_file(Path(file))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{file}: not UTF-8 text (byte {error.start})") from None
    lines = text.splitlines(keepends=True)
    progress = click.progressbar(length=len(lines), label="reading", file=sys.stderr) if (
        len(lines) > 10000 and _show_progress(as_json)) else None
    entries, problems = [], []
    for item in read_import(lines, scope, reason):
        if isinstance(item, Entry):
            entries.append((item.address, item.display, item.scope, item.reason))
        else:
            problems.append(item)
        if progress is not None and (len(entries) + len(problems)) % 5000 == 0:
            progress.update(item.line - progress.pos)
    if progress is not None:
        progress.update(len(lines) - progress.pos)
        progress.render_finish()
    added = state.store.add_suppressions(entries, now(), source=f"import {Path(file).name}")
    summary = {"file": file, "rows": len(entries) + len(problems), "valid": len(entries), "added": len(added),
               "already": len(entries) - len(added), "invalid": len(problems)}
    if as_json:
        click.echo(json.dumps({**summary, "problems": [{"line": p.line, "why": p.why} for p in problems]},
                              ensure_ascii=False))
        return
    shown = problems if len(problems) <= 20 else problems[:20]
    for problem in shown:
        click.echo(f"{file}:{problem.line}: {problem.why}", err=True)
    if len(problems) > len(shown):
        lines_left = [p.line for p in problems[len(shown):]]
        click.echo(f"{file}: … and {len(lines_left)} more invalid rows (lines {lines_left[0]}–{lines_left[-1]}; "
                   f"--json lists them all)", err=True)
    click.echo(f"{summary['rows']} rows: {summary['added']} suppressions added, {summary['already']} already there, "
               f"{summary['invalid']} invalid (skipped).")


@suppression.command("export")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "drop"]), default="csv", show_default=True,
              help="csv: a header and one row per suppression; json: JSON lines; drop: the California DROP form "
                   "(base64 of SHA-256 of the trimmed, lower-cased address), one per address, no addresses.")
@click.option("--scope", help="Only this scope.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write here, not to stdout.")
@click.pass_obj
def suppression_export(state: Context, fmt: str, scope: str | None, output: str | None) -> None:
    """Export the suppression list; `--format drop` shares it without a single address."""
    from optout.suppression import export_csv, export_drop, export_json

    rows = state.store.suppression_rows(_scope(scope))
    write = {"csv": export_csv, "json": export_json, "drop": export_drop}[fmt]
    if output is None:
        write(rows, click.get_text_stream("stdout"))
        return
    try:
        with open(output, "w", encoding="utf-8", newline="") as out:
            count = write(rows, out)
    except OSError as error:
        raise InputError(f"{output}: cannot write it ({error.strerror})") from None
    click.echo(f"{count} {'hashes' if fmt == 'drop' else 'suppressions'} written to {output}", err=True)


# ---------------------------------------------------------------- audit, stats, config

@cli.command()
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="A JSON object.")
@click.pass_obj
def audit(state: Context, address: str, as_json: bool) -> None:
    """Show everything that happened to ADDRESS in time order; `optout audit verify` checks the chain.

    `audit verify` reports the first broken link of the hash-chained audit log: exit 0 when intact, 1 when not.
    """
    if address == "verify":
        _audit_verify(state, as_json)
        return
    found = state.store.timeline(address)
    events = _timeline_events(found)
    if as_json:
        click.echo(json.dumps({"address": found["address"], "address_hash": found["address_hash"], "events": events,
                               "suppressions": found["suppressions"], "requests": found["requests"]},
                              ensure_ascii=False, indent=1))
        return
    if not events:
        click.echo(f"{found['address']}: nothing recorded")
        return
    click.echo(_table([[e["at"], e["event"], e["summary"][:100]] for e in events], ["at", "event", "what"]))
    now_ = "; ".join(f"{r['scope']} ({r['reason']})" for r in found["suppressions"]) or "not suppressed"
    click.echo(f"\n{found['address']}: {now_}; {len(found['requests'])} requests")


def _timeline_events(found: dict) -> list[dict]:
    # The audit log is the history; ledger rows it does not cover (older data) are added as messages.
    events = []
    ledger = {row["key"]: row for row in found["messages"]}
    covered = set()
    for row in found["audit"]:
        detail = json.loads(row["detail"])
        if row["event"] == "message" and row["message_key"] in ledger:
            covered.add(row["message_key"])
        events.append({"at": row["at"], "event": row["event"], "message_key": row["message_key"], "detail": detail,
                       "summary": ", ".join(f"{k} {v}" for k, v in detail.items() if v not in (None, "", []))})
    for key, row in ledger.items():
        if key not in covered:
            detail = {k: row[k] for k in ("source", "kind", "reason", "rule", "action")}
            events.append({"at": row["received_at"], "event": "message", "message_key": key, "detail": detail,
                           "summary": ", ".join(f"{k} {v}" for k, v in detail.items() if v)})
    events.sort(key=lambda e: e["at"])  # stable: audit order within one second
    return events


def _audit_verify(state: Context, as_json: bool) -> None:
    broken = state.store.verify_audit()
    count = state.store.db.execute("SELECT count(*) FROM audit").fetchone()[0]
    if as_json:
        click.echo(json.dumps({"events": count, "intact": broken is None, "first_broken": broken}))
    elif broken is None:
        click.echo(f"audit log intact: {count} events, every link holds")
    else:
        click.echo(f"audit log BROKEN at event {broken} (of {count}): it or the one before it was changed")
    if broken is not None:
        sys.exit(1)


BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(value: int, largest: int, width: int = 30) -> str:
    if not largest:
        return ""
    eighths = round(value * width * 8 / largest)
    return "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")


@cli.command()
@click.option("--since", metavar="DATE", help="Only count from DATE (2026-11-01, an ISO time, or 7d).")
@click.option("--json", "as_json", is_flag=True, help="A JSON object (with per-day counts under \"days\").")
@click.pass_obj
def stats(state: Context, since: str | None, as_json: bool) -> None:
    """Count messages per kind and per day, suppressions and requests, with a chart of the days."""
    numbers = state.store.stats(_since(since))
    if as_json:
        click.echo(json.dumps(numbers, indent=1))
        return
    click.echo(_table([[k, str(v)] for k, v in numbers["kinds"].items()], ["kind", "messages"]))
    if numbers["other_reasons"]:
        click.echo("  other: " + ", ".join(f"{v} {k}" for k, v in numbers["other_reasons"].items()))
    days = list(numbers["days"].items())[-31:]
    if days:
        largest = max(d["messages"] for _, d in days)
        click.echo()
        rows = [[day, str(d["messages"]), _bar(d["messages"], largest),
                 " ".join(f"{k} {d[k]}" for k in numbers["kinds"] if d.get(k))] for day, d in days]
        click.echo(_table(rows, ["day", "messages", "", "kinds"]))
        if len(numbers["days"]) > len(days):
            click.echo(f"  (the last {len(days)} of {len(numbers['days'])} days; --since or --json for more)")
    click.echo(f"\n{numbers['messages']} messages, {numbers['suppressions']['total']} suppressions of "
               f"{numbers['suppressions']['addresses']} addresses, {numbers['requests']['total']} requests")


@cli.group("config")
def config_group() -> None:
    """Check a config file."""


@config_group.command("check")
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="A JSON object: the file and its problems.")
@click.pass_obj
def config_check(state: Context, path: str | None, as_json: bool) -> None:
    """Report every problem in a config at once (file, key, why); exit 0 when fine, 3 when not.

    PATH defaults to --config or OPTOUT_CONFIG.
    """
    from optout.config import check_config

    path = path or state.config_path
    if not path:
        raise click.UsageError("give a config file: optout config check PATH (or --config / OPTOUT_CONFIG)")
    problems = check_config(path)
    if as_json:
        click.echo(json.dumps({"path": path, "ok": not problems, "problems": problems}, ensure_ascii=False))
    elif problems:
        for problem in problems:
            click.echo(problem)
        click.echo(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {path}", err=True)
    else:
        click.echo(f"{path}: no problems")
    if problems:
        sys.exit(3)


# ---------------------------------------------------------------- scrub

@cli.command()
@click.argument("sendlist", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--column", default="email", show_default=True, help="The column holding the address.")
@click.option("--scope", help="The send's scope: skip addresses suppressed in it or in all. "
                              "Default: skip addresses suppressed in any scope.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the clean list here (default: stdout).")
@click.option("--json", "as_json", is_flag=True, help="The summary on stderr as a JSON object.")
@click.pass_obj
def scrub(state: Context, sendlist: str, column: str, scope: str | None, output: str | None, as_json: bool) -> None:
    """Write SENDLIST.csv without its suppressed addresses: every other row and column, header included.

    Addresses match normalised (trimmed, lower-cased, IDNA domain), and deletion tombstones that keep only a
    DROP hash match by hash. The summary (kept / removed per reason) goes to stderr.
    """
    import csv

    from optout.suppression import find_column, read_header, scopes_for, scrub_lines

    scopes = scopes_for(_scope(scope))
    try:
        source = sys.stdin if sendlist == "-" else open(sendlist, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise InputError(f"{sendlist}: no such file") from None
    except OSError as error:
        raise InputError(f"{sendlist}: cannot read it ({error.strerror})") from None
    target = None
    try:
        size = os.fstat(source.fileno()).st_size if sendlist != "-" else 0
        lines = iter(source)
        try:
            header_text, header, dialect = read_header(lines)
            index = find_column(header, column)
        except ValueError as error:
            raise InputError(f"{sendlist}: {error}") from None
        addresses = state.store.suppressed_addresses(scopes)
        hashes = state.store.suppressed_hashes(scopes)
        progress = None
        if size > 1 << 20 and _show_progress(as_json):
            progress = click.progressbar(length=size, label="scrubbing", file=sys.stderr)
            lines = _counted(lines, progress)
        try:
            target = open(output, "w", encoding="utf-8", newline="") if output else None
        except OSError as error:
            raise InputError(f"{output}: cannot write it ({error.strerror})") from None
        out = target or click.get_text_stream("stdout")
        out.write(header_text)
        try:
            result = scrub_lines(lines, index, dialect, addresses, hashes, out.write)
        except csv.Error as error:
            raise InputError(f"{sendlist}: bad CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise InputError(f"{sendlist}: not UTF-8 text ({error.reason})") from None
        if progress is not None:
            progress.update(size - progress.pos)
            progress.render_finish()
    finally:
        if sendlist != "-":
            source.close()
        if target is not None:
            target.close()
    summary = result.as_dict()
    if as_json:
        click.echo(json.dumps({"scope": scope, **summary}, ensure_ascii=False), err=True)
        return
    reasons = ", ".join(f"{count} {reason}" for reason, count in result.reasons.most_common())
    click.echo(f"{result.kept + result.removed} rows: {result.kept} kept, {result.removed} removed"
               f"{f' ({reasons})' if reasons else ''}"
               f"{f'; {result.blank} row{_s(result.blank)} without an address kept' if result.blank else ''}"
               f"{f'; written to {output}' if output else ''}.", err=True)


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _counted(lines, progress):
    # Moves the bar by the characters read: close enough to bytes for a bar.
    step = 0
    for line in lines:
        step += len(line)
        if step > 1 << 18:
            progress.update(step)
            step = 0
        yield line


@cli.command()
@click.option("--once", is_flag=True, help="Process the mailbox backlog once and exit (for cron).")
@click.option("--dry-run", is_flag=True, help="Classify and report; write nothing, move nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --once: the summary as JSON.")
@click.pass_context
def run(ctx: click.Context, once: bool, dry_run: bool, as_json: bool) -> None:
    """Process the mailbox backlog once (--once, for cron), or run the daemon."""
    if not once:
        if dry_run:
            raise click.UsageError("--dry-run goes with --once")
        ctx.invoke(daemon)
        return
    from optout.daemon import log_outcome, run_lock, settings_for_imap
    from optout.process import Intake
    from optout.sources.imap import drain

    state: Context = ctx.obj
    settings = state.settings
    _configure_logging(quiet=as_json)
    with run_lock(settings.lock_file):
        imap = settings_for_imap(settings, dry_run=dry_run)
        if imap is None:
            summary = None
            message = "No IMAP mailbox configured (OPTOUT_IMAP_URL or [imap] url): nothing to fetch."
        else:
            intake = Intake(state.store, state.pipeline, clock=now, dry_run=dry_run)
            from optout.examiner import Examiner

            def examiner():
                return Examiner(settings.lexicon_dir, settings.unsubscribe_addresses, workers=settings.workers)

            summary = drain(imap, intake, on_outcome=log_outcome,
                            examiner_factory=examiner if settings.workers > 0 else None)
            kinds = ", ".join(f"{v} {k}" for k, v in sorted(summary.kinds.items())) or "nothing new"
            verb = "would move" if dry_run else "moved"
            message = (f"{summary.seen} messages in {imap.folder}: {summary.processed} new ({kinds}), "
                       f"{summary.duplicates} already processed, {summary.moved} {verb if not dry_run else 'moved'}.")
            if dry_run:
                message += " Dry run: nothing written, nothing moved."
        sent = swept = None
        if not dry_run:
            from optout.daemon import flush_outbox
            from optout.fulfil import sweep

            swept = sweep(state.store, now(), state.pipeline.fulfilment)
            if any(swept.values()):
                failed = f", {swept['failed']} failed (see the log)" if swept["failed"] else ""
                message += f" Requests: {swept['expired']} expired, {swept['fulfilled']} fulfilled{failed}."
            sent = flush_outbox(settings, state.store, now)
            message += (f" Outbox: {sent.sent} sent, {sent.retried} deferred, {sent.failed} failed"
                        f"{f', {sent.held} held by the hourly cap' if sent.held else ''}"
                        f"{f', {sent.in_doubt} in doubt (see outbox list --status in-doubt)' if sent.in_doubt else ''}.")
    if as_json:
        click.echo(json.dumps({"imap": None if summary is None else summary.__dict__, "requests": swept,
                               "outbox": None if sent is None else sent.__dict__, "dry_run": dry_run}))
    else:
        click.echo(message)


@cli.group()
def outbox() -> None:
    """Inspect and manage the replies waiting to be sent."""


@outbox.command("list")
@click.option("--status", type=click.Choice(["queued", "sent", "failed", "in-doubt", "erased"]),
              help="Only replies in this state (in-doubt: interrupted while the relay answered; retry or purge).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@click.pass_obj
def outbox_list(state: Context, status: str | None, as_json: bool) -> None:
    """List replies, newest first."""
    rows = state.store.outbox(status)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    if not rows:
        click.echo("The outbox is empty.")
        return
    click.echo(_table([[str(r["id"]), r["status"], r["kind"], r["language"] or "", r["to_address"], str(r["attempts"]),
                        (r["sent_at"] or r["next_attempt_at"] or "")[:19], (r["last_error"] or "")[:40]] for r in rows],
                      ["id", "status", "kind", "lang", "to", "tries", "sent / next try", "last error"]))


@outbox.command("retry")
@click.argument("reply_id", type=int)
@click.pass_obj
def outbox_retry(state: Context, reply_id: int) -> None:
    """Queue a failed or waiting reply again, due now."""
    if not state.store.outbox_retry(reply_id, now()):
        raise InputError(f"no unsent reply with id {reply_id}")
    click.echo(f"reply {reply_id} queued; it goes out with the next outbox run")


@outbox.command("confirm")
@click.argument("reply_id", type=int)
@click.pass_obj
def outbox_confirm(state: Context, reply_id: int) -> None:
    """Mark a reply in doubt as sent, once the relay's log shows it took it (audited)."""
    found = [r for r in state.store.outbox("in-doubt") if r["id"] == reply_id]
    if not found:
        raise InputError(f"no reply in doubt with id {reply_id} (see optout outbox list --status in-doubt)")
    state.store.outbox_result(reply_id, now(), "sent", "confirmed by an admin")
    click.echo(f"reply {reply_id} marked sent")


@outbox.command("purge")
@click.option("--sent", "purge_sent", is_flag=True, help="Purge replies that were sent.")
@click.option("--failed", "purge_failed", is_flag=True, help="Purge replies that failed for good.")
@click.option("--older-than", default="30d", show_default=True, help="Age, e.g. 30d, 12h.")
@click.pass_obj
def outbox_purge(state: Context, purge_sent: bool, purge_failed: bool, older_than: str) -> None:
    """Delete old sent (or failed) replies; the audit log keeps that they were sent."""
    from datetime import timedelta

    statuses = tuple(s for s, wanted in (("sent", purge_sent), ("failed", purge_failed)) if wanted)
    if not statuses:
        raise click.UsageError("say what to purge: --sent and/or --failed")
    number, unit = older_than[:-1], older_than[-1:]
    if not number.isdigit() or unit not in "dh":
        raise click.UsageError(f"--older-than {older_than!r}: use a number and d or h, e.g. 30d")
    age = timedelta(days=int(number)) if unit == "d" else timedelta(hours=int(number))
    count = state.store.outbox_purge(now() - age, statuses)
    click.echo(f"{count} replies purged")


@cli.group()
def requests() -> None:
    """Access and deletion requests: list, show, fulfil, reject, extend, export, report (a child's come first)."""


def _request_or_fail(state: Context, which: str) -> dict:
    found = state.store.request(which)
    if found is None:
        raise InputError(f"no request {which!r} (give its number or its reference, e.g. D-7KQ2M3XA)")
    return found


STATUSES = ("awaiting-verification", "verified", "fulfilled", "rejected", "expired")


@requests.command("list")
@click.option("--overdue", is_flag=True, help="Only open requests past their due date (or, CCPA, unacknowledged).")
@click.option("--status", type=click.Choice(STATUSES), help="Only requests in this status.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@click.pass_obj
def requests_list(state: Context, overdue: bool, status: str | None, as_json: bool) -> None:
    """List requests: those about a child first, then by due date."""
    rows = state.store.requests(status, now() if overdue else None)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    if not rows:
        click.echo("No requests." if not overdue else "No overdue requests.")
        return
    moment = now()
    table = []
    for r in rows:
        due = datetime.fromisoformat(r["due_at"])
        days = (due - moment).days
        left = f"{days} days left" if days >= 0 else click.style(f"{-days} days overdue", fg="red")
        table.append([str(r["id"]), r["reference"] or "", r["kind"], r["status"], r["flags"] or "", r["address"],
                      r["due_at"][:10], left if r["status"] in ("awaiting-verification", "verified") else ""])
    click.echo(_table(table, ["id", "reference", "kind", "status", "flags", "address", "due", ""]))


@requests.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="A JSON object.")
@click.pass_obj
def requests_show(state: Context, request_id: str, as_json: bool) -> None:
    """Show one request, by number or reference."""
    found = _request_or_fail(state, request_id)
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False, indent=1))
        return
    for key, value in found.items():
        click.echo(f"{key:16} {value if value not in (None, '') else '-'}")


@requests.command("fulfil")
@click.argument("request_id")
@click.option("--verified-by", metavar="HOW",
              help="The requester was verified another way (e.g. 'phone call, customer number checked'): audited.")
@click.pass_obj
def requests_fulfil(state: Context, request_id: str, verified_by: str | None) -> None:
    """Fulfil a verified request: send the data (access) or erase it (deletion), and tell the requester.

    Only a request its requester has confirmed is fulfilled (exit 8 otherwise), unless --verified-by says how
    it was verified instead. The reply goes to the request's address, through the outbox.
    """
    from optout.fulfil import fulfil

    found = _request_or_fail(state, request_id)
    done = fulfil(state.store, found["id"], now(), state.pipeline.fulfilment, by="admin", verified_by=verified_by)
    verb = "sent" if found["kind"] == "access" else "erased"
    listed = ", ".join(f"{count} {place}" for place, count in done.items() if count) or "nothing was held"
    click.echo(f"request {found['reference'] or found['id']} fulfilled; {verb}: {listed}")


@requests.command("export")
@click.argument("request_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="File to write (default: stdout).")
@click.pass_obj
def requests_export(state: Context, request_id: str, output: str | None) -> None:
    """Write everything held about a request's address: the JSON file an access request sends."""
    from optout.fulfil import export

    found = _request_or_fail(state, request_id)
    document = json.dumps(export(state.store, found, now(), state.pipeline.fulfilment), ensure_ascii=False,
                          indent=1, default=str)
    if output:
        Path(output).write_text(document + "\n", encoding="utf-8")
        click.echo(f"written to {output}", err=True)
    else:
        click.echo(document)


@requests.command("reject")
@click.argument("request_id")
@click.option("--reason", required=True, help="Why (kept in the audit log, and told to the requester).")
@click.option("--no-reply", is_flag=True, help="Do not tell the requester.")
@click.pass_obj
def requests_reject(state: Context, request_id: str, reason: str, no_reply: bool) -> None:
    """Reject an open request, with a reason (audited; the requester is told unless --no-reply)."""
    from optout.fulfil import reject

    found = _request_or_fail(state, request_id)
    reject(state.store, found["id"], now(), state.pipeline.fulfilment, reason, notify=not no_reply)
    click.echo(f"request {found['reference'] or found['id']} rejected")


@requests.command("extend")
@click.argument("request_id")
@click.option("--days", type=click.IntRange(1, 90), required=True, help="Days added to the due date.")
@click.option("--reason", required=True, help="Why (kept in the audit log, as GDPR Art. 12(3) asks).")
@click.pass_obj
def requests_extend(state: Context, request_id: str, days: int, reason: str) -> None:
    """Extend an open request's due date, with a reason (audited), within what its jurisdiction allows."""
    from datetime import timedelta

    from optout.errors import RefusedError
    from optout.policy import extension_refused

    found = _request_or_fail(state, request_id)
    why = extension_refused(found["jurisdiction"], found["extended_days"], days)
    if why:
        raise RefusedError(f"request {found['reference'] or found['id']}: {why}")
    due = datetime.fromisoformat(found["due_at"]) + timedelta(days=days)
    state.store.change_request(found["id"], now(), "request.extend", {"days": days, "reason": reason,
                                                                       "due_at": due.isoformat()}, due_at=due,
                               extended_days=days, resolution=None)
    click.echo(f"request {found['reference'] or found['id']} now due {due.date().isoformat()}")


@requests.command("report")
@click.option("--year", type=int, default=None, help="The calendar year (default: the last full year).")
@click.option("--json", "as_json", is_flag=True, help="A JSON object per kind.")
@click.pass_obj
def requests_report(state: Context, year: int | None, as_json: bool) -> None:
    """Count a year's requests per kind: received, complied with, denied, median days to answer (CCPA §7102)."""
    year = year or now().year - 1
    report = state.store.request_report(year)
    if as_json:
        click.echo(json.dumps({"year": year, "kinds": report}, indent=1))
        return
    if not report:
        click.echo(f"No requests received in {year}.")
        return
    rows = [[kind, str(r["received"]), str(r["complied"]), f"{r['denied']} ({r['expired']} never confirmed)",
             str(r["pending"]), "-" if r["median_days"] is None else str(r["median_days"])]
            for kind, r in report.items()]
    click.echo(f"Requests received in {year}")
    click.echo(_table(rows, ["kind", "received", "complied with", "denied", "pending", "median days to answer"]))


@cli.command()
@click.argument("address")
@click.option("--list", "list_name", required=True, help="The list (the scope the token unsubscribes from).")
@click.option("--json", "as_json", is_flag=True, help="The headers and the token as a JSON object.")
@click.pass_obj
def headers(state: Context, address: str, list_name: str, as_json: bool) -> None:
    """Print List-Unsubscribe and List-Unsubscribe-Post (RFC 2369, 8058) for ADDRESS on a list.

    The mailto: goes to unsubscribe+TOKEN@ the [tokens] domain, the https: URL to the [tokens] url; TOKEN is an
    HMAC over address, list and day with the key from OPTOUT_TOKEN_KEY or [tokens] key_file.
    """
    from optout.config import ConfigError
    from optout.model import normalise_address
    from optout.suppression import scope_problem
    from optout.tokens import make_token

    settings = state.settings
    if not settings.token_key:
        raise ConfigError("no token key: set OPTOUT_TOKEN_KEY or [tokens] key_file")
    if "@" not in address:
        raise InputError(f"{address!r} is not an address")
    problem = scope_problem(list_name)
    if problem:
        raise click.UsageError(f"--list {list_name!r}: {problem}")
    moment = now()
    token = make_token(settings.token_key, address, list_name, moment.date())
    state.store.remember_token(token, address, list_name, moment)
    mailto = f"mailto:unsubscribe+{token}@{settings.unsubscribe_domain}?subject=unsubscribe"
    url = settings.unsubscribe_url.rstrip("/") + "/" + token
    lines = {"List-Unsubscribe": f"<{mailto}>, <{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    if as_json:
        click.echo(json.dumps({"address": normalise_address(address), "list": list_name, "token": token, **lines}))
        return
    for name, value in lines.items():
        click.echo(f"{name}: {value}")


@cli.command()
@click.pass_obj
def daemon(state: Context) -> None:
    """Run the SMTP endpoint and the IMAP watcher until SIGTERM or SIGINT."""
    import asyncio

    from optout.daemon import Daemon

    _configure_logging()
    settings = state.settings
    host, port = settings.smtp_listen.rsplit(":", 1)
    click.echo(f"optout daemon: database {settings.database}; SMTP on {settings.smtp_listen}; "
               f"IMAP {'configured' if settings.imap_url else 'not configured'}. Stop with Ctrl-C.", err=True)
    click.echo(f"Send it a message, e.g.:\n  swaks --server {settings.smtp_listen} --to privacy@example.com "
               f"--from ann@example.net --header 'Subject: unsubscribe' --body 'Please remove me.'\n"
               f"  python3 -c \"import smtplib; smtplib.SMTP('{host.strip('[]')}', {port}).sendmail("
               f"'ann@example.net', ['privacy@example.com'], 'Subject: unsubscribe\\n\\nPlease remove me.')\"", err=True)
    asyncio.run(Daemon(settings, state.pipeline).run_forever())


def _configure_logging(quiet: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every SMTP command at INFO: too much for a log with one line per message.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def main() -> None:
    """Run the CLI: errors are one line on stderr and an exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False, prog_name="optout")
    except click.exceptions.Abort:
        click.echo("optout: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except OptoutError as error:
        click.echo(f"optout: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("optout: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    except Exception as error:  # a bug: still one line, the traceback only on request
        if os.environ.get("OPTOUT_DEBUG"):
            raise
        click.echo(f"optout: internal error: {type(error).__name__}: {error} (OPTOUT_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(70)
