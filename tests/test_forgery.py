"""Forgery: a flood of forged opt-outs through the real pipeline, and forged, expired and unknown tokens.

A forged From obtaining someone's data is the business of request verification, tested elsewhere.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from conftest import NOW, Clock, query
from optout.config import Settings
from optout.daemon import make_pipeline
from optout.outbox import RelayTransport, flush, relay_settings
from optout.process import Intake
from optout.store import Store
from optout.tokens import TOKEN_LENGTH, make_token

FLOOD = 10_000
FORGED = (b"From: Person %d <forged%d@example.org>\r\n"
          b"To: privacy@example.com\r\n"
          b"Subject: Unsubscribe\r\n"
          b"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
          b"Message-ID: <flood-%d@example.org>\r\n"
          b"\r\n"
          b"Please unsubscribe me from all your mailings.\r\n")


def test_ten_thousand_forged_opt_outs_suppress_all_and_send_at_most_the_hourly_cap(tmp_path, relay):
    settings = Settings(database=str(tmp_path / "optout.db"), relay_url=relay.url)
    clock = Clock()
    store = Store(settings.database)
    intake = Intake(store, make_pipeline(settings), clock)

    started = time.monotonic()
    for n in range(FLOOD):
        intake.submit(FORGED % (n, n, n), "smtp")
    first = flush(store, RelayTransport(relay_settings(relay.url)), clock, settings.reply_hourly_cap)
    again = flush(store, RelayTransport(relay_settings(relay.url)), clock, settings.reply_hourly_cap)
    elapsed = time.monotonic() - started
    clock.now += timedelta(minutes=61)
    next_hour = flush(store, RelayTransport(relay_settings(relay.url)), clock, settings.reply_hourly_cap)
    store.close()

    cap = settings.reply_hourly_cap
    assert cap == 100
    assert query(settings.database, "SELECT count(DISTINCT address) FROM suppressions") == [(FLOOD,)]
    assert (first.sent, first.held) == (cap, FLOOD - cap)
    assert (again.sent, again.held) == (0, FLOOD - cap)
    assert next_hour.sent == cap  # a breaker per hour, not a halt: the queue drains at the cap
    assert len(relay.received) == 2 * cap
    assert all(r.mail_from in ("", "<>") for r in relay.received)  # null envelope sender: nothing bounces back
    assert elapsed < 90, elapsed


KEY = b"forgery test key, not a secret"


@pytest.fixture
def token_intake(tmp_path):
    """An Intake whose pipeline signs tokens, with one real token issued to Ann for the weekly list."""
    settings = Settings(database=str(tmp_path / "optout.db"), token_key=KEY)
    store = Store(settings.database)
    real = make_token(KEY, "ann@example.net", "weekly", NOW.date())
    store.remember_token(real, "ann@example.net", "weekly", NOW)
    old = make_token(KEY, "ann@example.net", "weekly", NOW.date() - timedelta(days=400))
    store.remember_token(old, "ann@example.net", "weekly", NOW - timedelta(days=400))
    # Issued under a key since replaced: in the table, but its signature no longer verifies.
    rotated = make_token(b"the key before", "carl@example.net", "weekly", NOW.date())
    store.remember_token(rotated, "carl@example.net", "weekly", NOW)
    intake = Intake(store, make_pipeline(settings), lambda: NOW)
    yield intake, real, old, rotated
    store.close()


def forged_tokens(real: str, old: str, rotated: str) -> dict[str, str]:
    flipped = real[:-1] + ("a" if real[-1] != "a" else "b")
    return {
        "rotated": rotated,
        "forged": make_token(b"somebody else's key", "ann@example.net", "weekly", NOW.date()),
        "tampered": flipped,
        "expired": old,
        "unknown": make_token(KEY, "bob@example.net", "weekly", NOW.date()),  # well signed, never issued
        "short": real[:-1],
        "uppercase-junk": "Z" * TOKEN_LENGTH,
    }


def token_mail(token: str, n: int) -> bytes:
    return (b"From: Eve <eve%d@example.org>\r\nTo: unsubscribe+%s@example.com\r\nSubject: \r\n"
            b"Message-ID: <token-%d@example.org>\r\n\r\n" % (n, token.encode(), n))


def test_forged_expired_and_unknown_tokens_by_mail_act_for_nobody_but_the_sender(token_intake):
    intake, real, old, rotated = token_intake
    tokens_before = intake.store.db.execute("SELECT * FROM tokens ORDER BY token").fetchall()

    outcomes = {name: intake.submit(token_mail(token, n), "smtp")
                for n, (name, token) in enumerate(forged_tokens(real, old, rotated).items())}

    store = intake.store
    suppressed = {row["address"] for row in store.suppressions()}
    # The mail itself went to an unsubscribe address: its own sender is opted out, nobody else.
    assert suppressed == {f"eve{n}@example.org" for n in range(len(outcomes))}
    assert all(o.reply is None or o.reply.to.startswith("eve") for o in outcomes.values())
    assert store.db.execute("SELECT * FROM tokens ORDER BY token").fetchall() == tokens_before
    statuses = [row[0] for row in store.db.execute(
        "SELECT json_extract(detail, '$.status') FROM audit WHERE event = 'token.invalid' ORDER BY id")]
    # A token never issued is unknown whoever signed it; one of the wrong length is no token at all.
    assert statuses == ["forged", "unknown", "unknown", "expired", "unknown", "unknown"]


def test_a_thousand_forged_one_click_tokens_change_nothing_but_the_audit(token_intake):
    intake, real, old, rotated = token_intake
    store = intake.store
    before = {table: store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
              for table in ("suppressions", "ledger", "requests", "outbox", "tokens")}
    audit_before = store.db.execute("SELECT count(*) FROM audit").fetchone()[0]
    candidates = list(forged_tokens(real, old, rotated).values())
    candidates += [make_token(b"key %d" % n, "ann@example.net", "weekly", NOW.date()) for n in range(1_000)]

    verdicts = [intake.unsubscribe_token(token).status for token in candidates]

    assert "valid" not in verdicts
    after = {table: store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in before}
    assert after == before
    assert store.db.execute("SELECT count(*) FROM audit").fetchone()[0] == audit_before + len(candidates)
    assert intake.unsubscribe_token(real).status == "valid"  # the real token still works afterwards
    assert [r["address"] for r in store.suppressions()] == ["ann@example.net"]
