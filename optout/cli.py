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
  1   `suppression check`: an address is not suppressed
  2   usage error (unknown option, missing argument)
  3   config or phrase-table error
  4   an input file or mailbox cannot be read
  5   database error
  6   the IMAP server cannot be reached or refuses the login
  7   another `optout run` is in progress (the lock is held)
  70  internal error (a bug: please report it)
  75  the database is busy: try again later
"""


@dataclass
class Context:
    """What every command gets: the settings, and the store and pipeline made from them on first use."""

    settings: Settings
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


@cli.group()
def suppression() -> None:
    """Inspect the suppression list."""


@suppression.command("list")
@click.option("--scope", help="Only this scope (all, newsletters, partners, …).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@click.pass_obj
def suppression_list(state: Context, scope: str | None, as_json: bool) -> None:
    """List suppressed addresses, oldest first."""
    rows = state.store.suppressions(scope)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    if not rows:
        click.echo("The suppression list is empty.")
        return
    click.echo(_table([[r["address"], r["scope"], r["reason"], r["created_at"]] for r in rows],
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON object.")
@click.pass_obj
def stats(state: Context, as_json: bool) -> None:
    """Count messages per kind, suppressions and requests."""
    numbers = state.store.stats()
    if as_json:
        click.echo(json.dumps(numbers, indent=1))
        return
    click.echo(_table([[k, str(v)] for k, v in numbers["kinds"].items()], ["kind", "messages"]))
    if numbers["other_reasons"]:
        click.echo("  other: " + ", ".join(f"{v} {k}" for k, v in numbers["other_reasons"].items()))
    click.echo(f"\n{numbers['messages']} messages, {numbers['suppressions']['total']} suppressions of "
               f"{numbers['suppressions']['addresses']} addresses, {numbers['requests']['total']} requests")


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
            from optout.process import Examiner

            def examiner():
                return Examiner(settings.lexicon_dir, settings.unsubscribe_addresses)

            summary = drain(imap, intake, on_outcome=log_outcome, examiner_factory=examiner)
            kinds = ", ".join(f"{v} {k}" for k, v in sorted(summary.kinds.items())) or "nothing new"
            verb = "would move" if dry_run else "moved"
            message = (f"{summary.seen} messages in {imap.folder}: {summary.processed} new ({kinds}), "
                       f"{summary.duplicates} already processed, {summary.moved} {verb if not dry_run else 'moved'}.")
            if dry_run:
                message += " Dry run: nothing written, nothing moved."
        sent = None
        if not dry_run:
            from optout.daemon import flush_outbox

            sent = flush_outbox(settings, state.store, now)
            message += (f" Outbox: {sent.sent} sent, {sent.retried} deferred, {sent.failed} failed"
                        f"{f', {sent.held} held by the hourly cap' if sent.held else ''}.")
    if as_json:
        click.echo(json.dumps({"imap": None if summary is None else summary.__dict__,
                               "outbox": None if sent is None else sent.__dict__, "dry_run": dry_run}))
    else:
        click.echo(message)


@cli.group()
def outbox() -> None:
    """Inspect and manage the replies waiting to be sent."""


@outbox.command("list")
@click.option("--status", type=click.Choice(["queued", "sent", "failed"]), help="Only replies in this state.")
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
