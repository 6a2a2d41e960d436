"""Shared fixtures: the phrase tables, a mail builder, the shared corpora and a fresh store."""

from __future__ import annotations

import os
from datetime import datetime, timezone
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
