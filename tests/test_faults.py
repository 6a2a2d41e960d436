"""Faults: kill -9 in the middle of a backlog, a locked database, a client that hangs up in DATA."""

from __future__ import annotations

import signal
import smtplib
import socket
import sqlite3
import subprocess
import time
from collections import Counter

import pytest

from conftest import make_mail, optout_command, optout_env, query
from optout.parse import parse_message
from optout.store import Store

BODIES = (
    ("Please unsubscribe me from your newsletter.", "Unsubscribe"),
    ("Stop sending me marketing emails, I want to opt out of everything.", "Opt-out"),
    ("What personal data do you hold about me? Please send me a copy of my data.", "My data"),
    ("Please delete my personal data and close my account.", "Delete my data"),
    ("Do you ship to Canada?", "Question"),
    ("Thanks for the update.", "Hello"),
)


def distinct_messages(count: int) -> list[bytes]:
    """Return `count` different messages: unique Message-IDs and bodies, a mix of kinds, senders shared by a few."""
    messages = []
    for n in range(count):
        body, subject = BODIES[n % len(BODIES)]
        messages.append(make_mail(f"{body}\n\nReference {n:05d}.", subject=subject,
                                  sender=f"Person {n % 97} <person{n % 97}@example.net>",
                                  message_id=f"<fault-{n:05d}@example.net>"))
    return messages


def ledger_count(database) -> int:
    try:
        rows = query(database, "SELECT count(*) FROM ledger")
    except sqlite3.OperationalError:
        return 0  # created but not migrated yet
    return rows[0][0] if rows else 0


@pytest.mark.parametrize("batch_size", [None, 50], ids=["default-batch", "batch-50"])
def test_kill_9_in_the_middle_of_a_backlog_then_a_rerun_processes_each_message_exactly_once(
        mailbox, tmp_path, run_optout, batch_size):
    total = 600
    messages = distinct_messages(total)
    mailbox.append(messages)
    database = tmp_path / "optout.db"
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(database)}
    if batch_size:
        (tmp_path / "optout.toml").write_text(f"[imap]\nbatch_size = {batch_size}\n")
        env["OPTOUT_CONFIG"] = str(tmp_path / "optout.toml")

    first = subprocess.Popen(optout_command() + ["run", "--once"], cwd=tmp_path, env=optout_env(**env),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not 50 < ledger_count(database) < total:
            assert first.poll() is None, f"the run ended (exit {first.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait(10)
    committed = ledger_count(database)
    left = mailbox.counts()["INBOX"]

    rerun = run_optout("run", "--once", "--json", env=env)

    assert first.returncode == -signal.SIGKILL
    assert 50 < committed < total
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    keys = {parse_message(raw).key for raw in messages}
    assert len(keys) == total
    assert {row[0] for row in query(database, "SELECT key FROM ledger")} == keys
    assert query(database, "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'") \
        == [(total, total)]
    assert query(database, "SELECT address, scope FROM suppressions GROUP BY address, scope HAVING count(*) > 1") == []
    assert query(database, "SELECT message_key FROM requests GROUP BY message_key, kind HAVING count(*) > 1") == []
    assert query(database, "SELECT address, kind FROM requests WHERE status = 'open' "
                           "GROUP BY address, kind HAVING count(*) > 1") == []
    with Store(database) as store:
        assert store.verify_audit() is None
    counts = mailbox.counts()
    assert counts["INBOX"] == 0
    assert sum(counts.values()) == total
    filed = Counter(parse_message(raw).key for folder in counts for raw, _ in mailbox.messages(folder))
    assert filed == Counter(keys)
    assert left > 0


def test_a_locked_database_stops_the_run_with_75_and_leaves_the_mail_in_place(mailbox, tmp_path, run_optout):
    database = tmp_path / "optout.db"
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(database)}
    with Store(database):
        pass  # migrated: the lock below is the only obstacle
    mailbox.append(distinct_messages(12))
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        locked = run_optout("run", "--once", env=env)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    after_lock = mailbox.counts()

    retry = run_optout("run", "--once", env=env)

    assert locked.returncode == 75, locked.stderr[-2000:]
    assert "busy" in locked.stderr
    assert after_lock == {"INBOX": 12}
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert ledger_count(database) == 12
    assert mailbox.counts()["INBOX"] == 0


def test_a_client_that_hangs_up_in_data_leaves_no_trace_and_the_endpoint_carries_on(smtp_daemon):
    endpoint = smtp_daemon()
    whole = make_mail("Please unsubscribe me from your newsletter.", message_id="<whole@example.net>")

    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as raw:
        reader = raw.makefile("rb")
        try:
            replies = [reader.readline()]
            for command in (b"HELO client.example.net", b"MAIL FROM:<ann@example.net>",
                            b"RCPT TO:<privacy@example.com>", b"DATA"):
                raw.sendall(command + b"\r\n")
                replies.append(reader.readline())
            raw.sendall(make_mail("Please delete all my data.", message_id="<half@example.net>")[:200])
        finally:
            reader.close()
    time.sleep(0.2)
    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        client.sendmail("ann@example.net", ["privacy@example.com"], whole.replace(b"\n", b"\r\n"))

    assert [line[:3] for line in replies] == [b"220", b"250", b"250", b"250", b"354"]
    assert query(endpoint.database, "SELECT message_id FROM ledger") == [("<whole@example.net>",)]
