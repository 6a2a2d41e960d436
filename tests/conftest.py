"""Shared fixtures: the phrase tables, a mail builder, the shared corpora and a fresh store."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import pytest

from optout.lexicon import load_lexicon
from optout.store import Store

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "mail"
CORPORA = Path(os.environ.get("OPTOUT_CORPORA", ROOT.parent / "shared" / "corpora"))
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves by hand (the `now=` seam): call it for the time, `advance(hours=1)` to move it."""

    def __init__(self, start: datetime = NOW) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


def make_mail(body: str = "", subject: str = "Hello", sender: str = "Ann Example <ann@example.net>",
              to: str = "privacy@example.com", headers: dict[str, str] | None = None,
              html: str | None = None, message_id: str | None = "<m1@example.net>") -> bytes:
    """Build a plain (or HTML) message as a mail client would send it."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    if subject is not None:
        message["Subject"] = subject
    message["Date"] = format_datetime(NOW)
    if message_id:
        message["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        message[name] = value
    if html is not None and body:
        message.set_content(body)
        message.add_alternative(html, subtype="html")
    elif html is not None:
        message.set_content(html, subtype="html")
    else:
        message.set_content(body)
    return message.as_bytes()


@pytest.fixture(scope="session")
def lexicon():
    """The shipped phrase tables, loaded once."""
    return load_lexicon()


@pytest.fixture
def mail():
    """The mail builder, as a fixture."""
    return make_mail


@pytest.fixture
def store(tmp_path):
    """A fresh store in a real SQLite file."""
    with Store(tmp_path / "optout.db") as opened:
        yield opened


@pytest.fixture(scope="session")
def corpora() -> Path:
    """The shared corpora of real third-party mail; tests that need them skip when absent."""
    if not (CORPORA / "labels.tsv").is_file():
        pytest.skip(f"shared corpora not found at {CORPORA} (set OPTOUT_CORPORA)")
    return CORPORA


# ---------------------------------------------------------------- real servers and the optout command

import subprocess  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402

from dovecot import Dovecot, require_dovecot  # noqa: E402


@pytest.fixture(scope="session")
def dovecot():
    """A private Dovecot on 127.0.0.1 and a free port, for the whole session (fails in CI when absent)."""
    require_dovecot()
    with Dovecot.temporary() as server:
        yield server


@pytest.fixture
def mailbox(dovecot):
    """A fresh, empty mailbox: a new user on the session's Dovecot."""
    return dovecot.mailbox()


def optout_command() -> list[str]:
    """Return the argv that runs the optout command of this virtualenv."""
    script = Path(sys.executable).with_name("optout")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from optout.cli import main; main()"]


def optout_env(**values: str) -> dict[str, str]:
    """Return this process's environment without any OPTOUT_* variable, plus `values`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTOUT_")}
    env.update(values)
    return env


def run_cli(cwd: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `optout ARGS` as a subprocess in cwd (its lock file is cwd/var/optout.lock) and wait for it."""
    return subprocess.run(optout_command() + list(args), env=optout_env(**env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def run_optout(tmp_path):
    """Run `optout ARGS` as a subprocess in tmp_path; return the completed process."""

    def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return run_cli(tmp_path, *args, env=env, timeout=timeout)

    return run


def query(database: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read rows from an optout database with a connection of our own; [] when the file does not exist."""
    if not Path(database).exists():
        return []
    connection = sqlite3.connect(f"file:{database}?mode=rw", uri=True, timeout=10)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


class LoopThread:
    """An asyncio loop in a background thread, so a test can talk to a server with blocking clients."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 30):
        """Run a coroutine on the loop and return its result."""
        return self.asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is left on the loop, stop it and close it."""

        async def cancel_the_rest():
            tasks = [t for t in self.asyncio.all_tasks() if t is not self.asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await self.asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def smtp_daemon(tmp_path, lexicon):
    """Start optout's Daemon (SMTP only, port 0) on a loop thread: `smtp_daemon(**settings)` -> (daemon, port, db)."""
    from types import SimpleNamespace

    from optout.config import Settings
    from optout.daemon import Daemon
    from optout.process import Pipeline

    started: list = []
    loop = LoopThread()

    def start(**overrides):
        # Replies go to a maildir (no relay configured): keep it in tmp_path, not in the cwd of the test run.
        settings = Settings(**{"database": str(tmp_path / "optout.db"), "smtp_listen": "127.0.0.1:0",
                               "sent_maildir": str(tmp_path / "sent"), **overrides})
        daemon = Daemon(settings, Pipeline(lexicon, settings.unsubscribe_addresses))
        loop.run(daemon.start())
        started.append(daemon)
        return SimpleNamespace(daemon=daemon, port=daemon.address[1], database=Path(settings.database), loop=loop)

    yield start
    try:
        for daemon in started:
            loop.run(daemon.stop(grace=5))
    finally:
        loop.close()


@pytest.fixture
def relay():
    """A second aiosmtpd on loopback playing the relay: it collects what optout sends (see tests/relay.py)."""
    from relay import Relay

    server = Relay()
    yield server
    server.close()


def run_bytes(args, cwd, stdin=None, database="optout.db", now=NOW, extra_env=None) -> subprocess.CompletedProcess:
    """Run `optout ARGS` in cwd on cwd/DATABASE at a fixed `now`; output as bytes (stdin may be bytes too)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTOUT_")}
    env["OPTOUT_NOW"] = now.isoformat()
    if database is not None:
        env["OPTOUT_DATABASE"] = str(Path(cwd) / database)
    env.update(extra_env or {})
    return subprocess.run(optout_command() + list(args), cwd=cwd, env=env, input=stdin, capture_output=True,
                          timeout=60)


def out(result) -> str:
    """Return a run's standard output as text."""
    return result.stdout.decode("utf-8")


def err(result) -> str:
    """Return a run's standard error as text."""
    return result.stderr.decode("utf-8")
