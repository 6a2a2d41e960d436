"""Faults, each followed by the recovery it calls for; real servers and real SQLite errors, no mocks.

- kill -9 at ten random moments (OPTOUT_FAULT_SEED replays them) of a 2,000-message backlog, then a clean run;
- the database locked by another process, full (SQLITE_FULL) or read-only: 451 over SMTP, the mail left in
  the INBOX, nothing half-written, the IMAP watcher alive;
- a client that hangs up in DATA; kill -9 of the daemon while mail arrives over SMTP;
- the IMAP connection cut (tests/proxy.py) mid-FETCH or around a MOVE, or gone silent; the daemon's cut too;
- the relay refusing, silent, taking a message and never answering, or hanging up mid-DATA; kill -9 while
  the relay acknowledges a reply (the reply is held in doubt for a person instead of being sent twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import json
import logging
import os
import random
import signal
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest

from conftest import NOW, make_mail, optout_command, optout_env, query
from proxy import Cut, Proxy
from relay import Relay, silent_listener
from optout.model import Kind
from optout.outbox import RelaySettings, RelayTransport, flush
from optout.policy import Rules
from optout.parse import parse_message
from optout.process import Pipeline, examine, process
from optout.replies import template_environment
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


def kill_moments(rng: random.Random, rounds: int) -> list[tuple[str, float]]:
    """Draw when to kill each run: after a delay (start-up, connecting, the first batch) or after some new ledger
    rows (processing, moving) in any order; the last two after some replies are marked sent (replies are flushed
    once the backlog is drained, so these rounds drain the rest and are killed in the outbox)."""
    kinds = ["seconds"] * (rounds * 3 // 10)
    kinds += ["rows"] * (rounds - 2 - len(kinds))
    rng.shuffle(kinds)
    draw = {"seconds": lambda: round(rng.uniform(0.05, 1.5), 3), "rows": lambda: rng.randint(1, 250),
            "sent": lambda: rng.randint(1, 40)}
    return [(kind, draw[kind]()) for kind in kinds + ["sent", "sent"]]


def sent_count(database) -> int:
    try:
        rows = query(database, "SELECT count(*) FROM outbox WHERE status = 'sent'")
    except sqlite3.OperationalError:
        return 0
    return rows[0][0] if rows else 0


def kill_run(cwd, env, database, how: str, amount: float, jitter: float, deadline: float = 60) -> str:
    """Start `optout run --once`, SIGKILL it at the drawn moment; return how the round ended."""
    before, sent_before = ledger_count(database), sent_count(database)
    log = open(cwd / "run.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    run = subprocess.Popen(optout_command() + ["run", "--once"], cwd=cwd, env=optout_env(**env),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        started = time.monotonic()
        while run.poll() is None:
            if how == "seconds" and time.monotonic() - started >= amount:
                break
            if (how == "rows" and ledger_count(database) - before >= amount
                    or how == "sent" and sent_count(database) - sent_before >= amount):
                time.sleep(jitter)  # anywhere in the cycle of one message or reply, or in a batch's moves
                break
            assert time.monotonic() - started < deadline, "the run made no progress"
            time.sleep(0.003)
        if run.poll() is not None:
            log.seek(0)
            assert run.returncode == 0, log.read()[-2000:]
            return "finished"
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        return "killed"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        log.close()


def test_ten_kill_9s_at_random_moments_of_a_2000_message_backlog_then_a_clean_run_leave_each_message_once(
        mailbox, tmp_path, run_optout, lexicon):
    total, rounds = 2000, 10
    seed = int(os.environ.get("OPTOUT_FAULT_SEED") or random.SystemRandom().randrange(2 ** 32))
    print(f"kill -9 rounds: OPTOUT_FAULT_SEED={seed}")
    rng = random.Random(seed)
    messages = distinct_messages(total)
    mailbox.append(messages)
    database = tmp_path / "optout.db"
    # Batches of 100: moves and checkpoints often enough for kills to land in them too. A cap above the
    # number of replies: the outbox is flushed (and killed in) as well.
    (tmp_path / "optout.toml").write_text("[imap]\nbatch_size = 100\n[replies]\nhourly_cap = 5000\n")
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(database), "OPTOUT_CONFIG": str(tmp_path / "optout.toml")}

    story = []
    for number, (how, amount) in enumerate(kill_moments(rng, rounds)):
        jitter = round(rng.uniform(0, 0.03), 4)
        before, inbox_before = ledger_count(database), mailbox.counts().get("INBOX", 0)
        ended = kill_run(tmp_path, env, database, how, amount, jitter)
        story.append((number, how, amount, jitter, ended, before, ledger_count(database), inbox_before,
                      sent_count(database)))
    print("round: kill after, jitter, ended, ledger before -> after, INBOX before, replies sent:")
    for number, how, amount, jitter, ended, before, after, inbox, sent in story:
        print(f"  {number}: {amount} {how} +{jitter}s, {ended}, {before} -> {after}, {inbox}, {sent}")
    committed, left = ledger_count(database), mailbox.counts()["INBOX"]

    clean = run_optout("run", "--once", "--json", env=env)
    verify = run_optout("audit", "verify", env=env)

    context = f"seed {seed}: {story}"
    assert sum(ended == "killed" for *_, ended, _, _, _, _ in story) >= rounds // 2, context
    assert any(0 < after - before for *_, ended, before, after, _, _ in story if ended == "killed"), context
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert verify.returncode == 0, verify.stdout + verify.stderr
    keys = {parse_message(raw).key for raw in messages}
    assert len(keys) == total
    ledger = [row[0] for row in query(database, "SELECT key FROM ledger")]
    assert len(ledger) == total and set(ledger) == keys, context
    assert query(database, "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'") \
        == [(total, total)], context
    # Every opt-out is on the list: the sender of each message the classifier calls an opt-out, in its scope
    # or in `all`, which covers every scope (once an address is suppressed in `all`, no narrower row is added).
    pipeline = Pipeline(lexicon)
    expected = set()
    for raw in messages[:len(BODIES) * 97]:
        message, classification = examine(raw, pipeline)
        if classification.kind is Kind.OPT_OUT:
            expected.add((message.sender, str(classification.scope)))
    suppressions = set(query(database, "SELECT address, scope FROM suppressions"))
    missing = {(address, scope) for address, scope in expected
               if (address, scope) not in suppressions and (address, "all") not in suppressions}
    assert len(expected) >= 97 and not missing, (missing, context)
    assert query(database, "SELECT kind, message_key FROM requests GROUP BY kind, message_key HAVING count(*) > 1") == []
    assert query(database, "SELECT address, kind FROM requests WHERE status = 'open' "
                           "GROUP BY address, kind HAVING count(*) > 1") == [], context
    # No reply twice: one per message at most, each sent, each written to the sent maildir exactly once.
    outbox = query(database, "SELECT message_key, message_id, status FROM outbox")
    assert outbox and len({key for key, _, _ in outbox}) == len(outbox), context
    assert {status for _, _, status in outbox} == {"sent"}, context
    maildir = tmp_path / "var" / "sent"
    written = [email.message_from_bytes(path.read_bytes()) for folder in ("new", "cur")
               for path in (maildir / folder).iterdir()]
    assert sorted(reply["Message-ID"] for reply in written) == sorted(message_id for _, message_id, _ in outbox), \
        context
    answered = [reply["In-Reply-To"] for reply in written]
    assert len(set(answered)) == len(answered) == len(outbox), context
    assert list((maildir / "tmp").iterdir()) == [], context
    # The mailbox: nothing left in INBOX, every message filed exactly once.
    counts = mailbox.counts()
    assert counts["INBOX"] == 0 and sum(counts.values()) == total, (counts, context)
    filed = Counter(message_id for folder in counts for message_id in message_ids(mailbox, folder))
    assert filed == Counter(f"<fault-{n:05d}@example.net>" for n in range(total)), context
    assert left < total and committed > 0, context


def message_ids(mailbox, folder: str) -> list[str]:
    """Return the Message-ID of every message in a folder, read without setting \\Seen."""
    with mailbox.client() as client:
        client.select_folder(folder, readonly=True)
        fetched = client.fetch(client.search(["ALL"]), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        return [email.message_from_bytes(item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"])["Message-ID"]
                for item in fetched.values()]


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


# ---------------------------------------------------------------- a full disk: SQLITE_FULL from SQLite itself

UNLIMITED_PAGES = 1073741823  # SQLite's default max_page_count


def fill_up(store: Store) -> None:
    """Make the database full: no page may be added (PRAGMA max_page_count, on optout's own connection)."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    assert store.db.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0] == pages


def make_room(store: Store) -> None:
    """Lift the limit again: the disk has room."""
    store.db.execute(f"PRAGMA max_page_count = {UNLIMITED_PAGES}")


def half_written(database) -> dict[str, list]:
    """Return what one transaction per message forbids: effects without their ledger row and the reverse."""
    ledger = "(SELECT key FROM ledger)"
    found = {
        "ledger rows without their audit event": query(
            database, "SELECT key FROM ledger WHERE key NOT IN "
                      "(SELECT message_key FROM audit WHERE event = 'message')"),
        "audit events of no ledger row": query(
            database, f"SELECT id, event FROM audit WHERE message_key IS NOT NULL AND message_key NOT IN {ledger}"),
        "suppressions of no ledger row": query(
            database, f"SELECT address FROM suppressions WHERE source_key IS NOT NULL AND source_key NOT IN {ledger}"),
        "requests of no ledger row": query(database, f"SELECT id FROM requests WHERE message_key NOT IN {ledger}"),
        "replies of no ledger row": query(database, f"SELECT id FROM outbox WHERE message_key NOT IN {ledger}"),
        "suppressions without their audit event": query(
            database, "SELECT address FROM suppressions WHERE source_key IS NOT NULL AND source_key NOT IN "
                      "(SELECT message_key FROM audit WHERE event = 'suppression.add')"),
    }
    return {problem: rows for problem, rows in found.items() if rows}


def on_writer(endpoint, work):
    """Run work(store) on the daemon's writer thread, the one that owns the connection."""
    return endpoint.daemon.writer.submit(work, endpoint.daemon.intake.store).result(10)


def test_a_full_disk_gets_451_writes_nothing_half_and_the_retry_once_there_is_room_gets_250(smtp_daemon):
    endpoint = smtp_daemon(workers=0)
    messages = [raw.replace(b"\n", b"\r\n") for raw in distinct_messages(60)]
    on_writer(endpoint, fill_up)
    answers = []
    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=20) as client:
        for raw in messages:
            try:
                client.sendmail("person@example.net", ["privacy@example.com"], raw)
                answers.append(250)
            except smtplib.SMTPDataError as error:
                answers.append(error.smtp_code)
                break
    refused = messages[len(answers) - 1]
    during = ledger_count(endpoint.database)
    problems = half_written(endpoint.database)
    on_writer(endpoint, make_room)
    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=20) as client:
        retried = client.sendmail("person@example.net", ["privacy@example.com"], refused)

    assert answers[-1] == 451, answers  # the free room of the last pages ran out before 60 messages
    assert set(answers[:-1]) <= {250}
    assert during == len(answers) - 1
    assert problems == {}
    assert retried == {}
    key = parse_message(refused).key
    assert query(endpoint.database, "SELECT count(*) FROM ledger WHERE key = ?", (key,)) == [(1,)]
    assert ledger_count(endpoint.database) == len(answers)
    assert half_written(endpoint.database) == {}
    with Store(endpoint.database) as store:
        assert store.verify_audit() is None


def test_a_full_disk_stops_a_mailbox_run_leaves_the_mail_in_the_inbox_and_the_next_run_finishes(mailbox, tmp_path):
    from optout.config import Settings
    from optout.daemon import make_pipeline, settings_for_imap
    from optout.errors import TransientError
    from optout.process import Intake
    from optout.sources.imap import drain

    total = 40
    mailbox.append(distinct_messages(total))
    database = tmp_path / "optout.db"
    settings = Settings(database=str(database), imap_url=mailbox.url(), imap_password=mailbox.server.password,
                        workers=0)
    with Store(database) as store:
        intake = Intake(store, make_pipeline(settings))
        fill_up(store)
        with pytest.raises(TransientError) as full:
            drain(settings_for_imap(settings), intake)
        during, counts = ledger_count(database), mailbox.counts()
        problems = half_written(database)
        make_room(store)
        summary = drain(settings_for_imap(settings), intake)

    assert "no room" in str(full.value)
    assert 0 < during < total
    assert counts == {"INBOX": total}  # nothing moved: not the failed message, not the batch around it
    assert problems == {}
    assert (summary.seen, summary.duplicates, summary.processed) == (total, during, total - during)
    assert ledger_count(database) == total
    assert query(database, "SELECT count(*) FROM ledger WHERE reason = 'error'") == [(0,)]  # none filed as a failure
    counts = mailbox.counts()
    assert counts["INBOX"] == 0 and sum(counts.values()) == total and counts.get("Review", 0) < total // 3
    assert half_written(database) == {}


def read_only(store: Store) -> None:
    """Make every write fail with SQLITE_READONLY (a database that cannot be written, not a busy one)."""
    store.db.execute("PRAGMA query_only = ON")


def writable(store: Store) -> None:
    store.db.execute("PRAGMA query_only = OFF")


@pytest.mark.parametrize("fault, cure, logged", [(fill_up, make_room, "no room to write"),
                                                 (read_only, writable, "readonly database")],
                         ids=["full", "read-only"])
def test_the_daemon_keeps_watching_a_mailbox_it_cannot_record_and_files_the_mail_once_it_can(
        smtp_daemon, mailbox, caplog, fault, cure, logged):
    total = 20
    caplog.set_level(logging.INFO, logger="optout")
    endpoint = smtp_daemon(workers=0, imap_url=mailbox.url(), imap_password=mailbox.server.password)
    wait_until(lambda: "IMAP connected" in caplog.text, 10, "IMAP connected")
    on_writer(endpoint, fault)
    mailbox.append(distinct_messages(total))
    wait_until(lambda: logged in caplog.text, 20, f"{logged!r} in the log")
    during, counts = ledger_count(endpoint.database), mailbox.counts()
    problems = half_written(endpoint.database)
    on_writer(endpoint, cure)
    wait_until(lambda: mailbox.counts()["INBOX"] == 0, 30, "the INBOX emptied once the store could write")

    assert during < total
    assert counts == {"INBOX": total}
    assert problems == {}
    assert "retrying in 1s" in caplog.text
    assert endpoint.daemon.imap_thread.is_alive()
    assert ledger_count(endpoint.database) == total
    assert sum(mailbox.counts().values()) == total
    assert half_written(endpoint.database) == {}


def wait_until(predicate, timeout: float, what: str):
    """Poll until predicate() is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        time.sleep(0.05)


# ---------------------------------------------------------------- the IMAP connection cut mid-FETCH and mid-MOVE

IMAP_CUTS = {  # where to cut, and how many messages are recorded by then (batches of 50)
    # The third batch's FETCH answer (about 20 KB) stops 5 KB in: two batches are recorded and filed.
    "mid-fetch": (Cut("up", b" FETCH ", "down", after=5_000, nth=3), 100),
    # The second MOVE never reaches Dovecot: the first batch is recorded, part of it still in the INBOX.
    "move-unsent": (Cut("up", b" MOVE ", "down", forward_marker=False, nth=2), 50),
    # Dovecot moves them but its answer is lost: recorded and moved, and optout cannot know it.
    "move-unanswered": (Cut("up", b" MOVE ", "down", after=0, nth=2), 50),
    # Half an answer: the untagged EXPUNGEs come, the tagged OK does not.
    "move-half-answered": (Cut("up", b" MOVE ", "down", after=12, nth=2), 50),
}


@pytest.mark.parametrize("where", IMAP_CUTS)
def test_an_imap_connection_cut_mid_fetch_or_mid_move_loses_no_message_and_processes_none_twice(
        mailbox, tmp_path, run_optout, where):
    total = 150
    messages = distinct_messages(total)
    mailbox.append(messages)
    plan, expected = IMAP_CUTS[where]
    proxy = Proxy(mailbox.server.port)
    proxy.cut(dataclasses.replace(plan))
    database = tmp_path / "optout.db"
    (tmp_path / "optout.toml").write_text("[imap]\nbatch_size = 50\n[processing]\nworkers = 0\n")
    env = {"OPTOUT_IMAP_URL": f"imap://{mailbox.user}@127.0.0.1:{proxy.port}/INBOX",
           "OPTOUT_IMAP_PASSWORD": mailbox.server.password, "OPTOUT_DATABASE": str(database),
           "OPTOUT_CONFIG": str(tmp_path / "optout.toml")}
    try:
        cut = run_optout("run", "--once", env=env)
        cuts, recorded, inbox = proxy.cuts, ledger_count(database), mailbox.counts()["INBOX"]
        rerun = run_optout("run", "--once", "--json", env=env)
    finally:
        proxy.close()

    assert cuts == 1
    assert cut.returncode == 6, cut.stderr[-2000:]
    assert "IMAP" in cut.stderr
    assert recorded == expected
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # The rerun sees what is left: the recorded ones still there are duplicates (only moved), the rest new.
    moved_before = total - inbox
    assert json.loads(rerun.stdout)["imap"] | {"kinds": None} == {
        "seen": inbox, "processed": total - recorded, "duplicates": recorded - moved_before, "moved": inbox,
        "kinds": None}
    assert ledger_count(database) == total
    assert {row[0] for row in query(database, "SELECT key FROM ledger")} == {parse_message(raw).key for raw in messages}
    assert query(database, "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'") \
        == [(total, total)]
    assert query(database, "SELECT message_key FROM outbox GROUP BY message_key HAVING count(*) > 1") == []
    assert half_written(database) == {}
    counts = mailbox.counts()
    assert counts["INBOX"] == 0 and sum(counts.values()) == total, counts
    filed = Counter(message_id for folder in counts for message_id in message_ids(mailbox, folder))
    assert filed == Counter(f"<fault-{n:05d}@example.net>" for n in range(total))


# ---------------------------------------------------------------- the relay refusing, silent, hanging up mid-DATA

@pytest.fixture
def relay():
    server = Relay()
    yield server
    server.close()


@pytest.fixture
def queued(store, lexicon):
    """Three opt-outs from three people: three replies queued in the outbox."""
    pipeline = Pipeline(lexicon, rules=Rules(own_addresses=("privacy@example.com",)),
                        templates=template_environment(), reply_from="privacy@example.com")
    for n in range(3):
        process(make_mail("Please unsubscribe me from your newsletter.", "Unsubscribe",
                          sender=f"Reader {n} <reader{n}@example.net>", message_id=f"<relay-{n}@example.net>"),
                "smtp", store, pipeline, NOW)
    assert [row["status"] for row in store.outbox()] == ["queued"] * 3
    return store


def relay_fault(kind: str, relay: Relay, stack: contextlib.ExitStack) -> int:
    """Set up a sick relay and return the port optout is to use; the healthy relay is `relay`."""
    if kind == "silent":  # accepts the connection, never greets
        return stack.enter_context(contextlib.closing(silent_listener())).getsockname()[1]
    if kind == "hang":  # takes the whole message, never answers it
        relay.handler.mode = "hang"
        stack.callback(setattr, relay.handler, "mode", "accept")
        return relay.port
    if kind == "cut-mid-data":  # hangs up 100 bytes into the message
        proxy = stack.enter_context(contextlib.closing(Proxy(relay.port)))
        proxy.cut(Cut("up", b"DATA\r\n", "up", after=100))
        stack.callback(lambda: proxy.cuts == 1 or pytest.fail("the proxy did not cut"))
        return proxy.port
    if kind == "refused":  # nothing listens
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["refused", "silent", "hang", "cut-mid-data"])
def test_a_sick_relay_costs_one_bounded_attempt_the_replies_wait_and_each_goes_once_it_is_well(
        queued, relay, kind):
    store, timeout = queued, 1.0
    clock = [NOW]
    with contextlib.ExitStack() as stack:
        port = relay_fault(kind, relay, stack)
        transport = RelayTransport(RelaySettings("127.0.0.1", port, timeout=timeout, data_timeout=timeout))
        started = time.monotonic()
        sick = flush(store, transport, lambda: clock[0])
        took = time.monotonic() - started
        rows = store.outbox()
        tried = store.db.execute("SELECT outbox_id, result, detail FROM outbox_attempts").fetchall()
    accepted_while_sick = len(relay.received)
    clock[0] += timedelta(hours=1)
    well = flush(store, RelayTransport(RelaySettings("127.0.0.1", relay.port, timeout=timeout, data_timeout=timeout)), lambda: clock[0])
    clock[0] += timedelta(days=1)
    again = flush(store, RelayTransport(RelaySettings("127.0.0.1", relay.port, timeout=timeout, data_timeout=timeout)), lambda: clock[0])

    assert (sick.sent, sick.retried, sick.failed) == (0, 1, 0)
    assert took < 3 * timeout  # bounded: one timeout (and no QUIT to wait for), not one per reply
    assert [row["status"] for row in rows] == ["queued"] * 3
    assert sorted(row["attempts"] for row in rows) == [0, 0, 1]
    assert [result for _, result, _ in tried] == ["retry"]
    assert accepted_while_sick == 0
    assert (well.sent, well.retried, again.sent) == (3, 0, 0)
    assert sorted(got.message["Message-ID"] for got in relay.received) == sorted(row["message_id"] for row in rows)
    assert {row["status"] for row in store.outbox()} == {"sent"}


def test_the_daemon_reconnects_after_its_imap_connection_is_cut_mid_fetch_and_files_each_message_once(
        smtp_daemon, mailbox, caplog):
    total = 60
    caplog.set_level(logging.INFO, logger="optout")
    proxy = Proxy(mailbox.server.port)
    proxy.cut(Cut("up", b" FETCH ", "down", after=4_000))  # the INBOX is empty: the first FETCH is the backlog's
    try:
        endpoint = smtp_daemon(workers=0, imap_url=f"imap://{mailbox.user}@127.0.0.1:{proxy.port}/INBOX",
                               imap_password=mailbox.server.password)
        wait_until(lambda: "IMAP connected" in caplog.text, 10, "IMAP connected")
        mailbox.append(distinct_messages(total))
        wait_until(lambda: mailbox.counts()["INBOX"] == 0, 30, "the INBOX emptied after the cut")
        connections = proxy.connections
    finally:
        proxy.close()

    assert proxy.cuts == 1
    assert connections == 2
    assert "reconnecting in 1s" in caplog.text
    assert caplog.text.count("IMAP connected") == 2
    assert ledger_count(endpoint.database) == total
    assert query(endpoint.database, "SELECT count(*) FROM audit WHERE event = 'message'") == [(total,)]
    assert query(endpoint.database, "SELECT message_key FROM outbox GROUP BY message_key HAVING count(*) > 1") == []
    assert half_written(endpoint.database) == {}
    filed = Counter(message_id for folder in mailbox.counts() for message_id in message_ids(mailbox, folder))
    assert filed == Counter(f"<fault-{n:05d}@example.net>" for n in range(total))


def test_an_imap_server_gone_silent_mid_fetch_ends_the_run_after_the_timeout_and_the_next_run_files_the_rest(
        mailbox, tmp_path):
    from optout.config import Settings
    from optout.daemon import make_pipeline, settings_for_imap
    from optout.errors import MailboxError
    from optout.process import Intake
    from optout.sources.imap import drain

    total, timeout = 120, 1.0
    mailbox.append(distinct_messages(total))
    proxy = Proxy(mailbox.server.port)
    # The second batch's FETCH answer stops 3 KB in, and the connection stays open: only a timeout ends it.
    proxy.cut(Cut("up", b" FETCH ", "down", after=3_000, nth=2, stall=True))
    database = tmp_path / "optout.db"
    settings = Settings(database=str(database), imap_url=f"imap://{mailbox.user}@127.0.0.1:{proxy.port}/INBOX",
                        imap_password=mailbox.server.password, imap_batch_size=50, workers=0)
    imap = dataclasses.replace(settings_for_imap(settings), timeout=timeout)
    try:
        with Store(database) as store:
            intake = Intake(store, make_pipeline(settings))
            started = time.monotonic()
            with pytest.raises(MailboxError) as silent:
                drain(imap, intake)
            took = time.monotonic() - started
            recorded, counts = ledger_count(database), mailbox.counts()
            summary = drain(imap, intake)
    finally:
        proxy.close()

    assert proxy.cuts == 1
    assert "timed out" in str(silent.value)
    assert took < 4 * timeout  # the FETCH and the LOGOUT after it each wait one timeout at most
    assert recorded == 50 and counts["INBOX"] == total - 50
    assert (summary.seen, summary.processed, summary.duplicates) == (total - 50, total - 50, 0)
    assert ledger_count(database) == total and mailbox.counts()["INBOX"] == 0
    assert half_written(database) == {}


def test_kill_9_of_the_daemon_while_mail_arrives_over_smtp_loses_no_message_that_got_250(tmp_path):
    from dovecot import free_port, wait_for_port

    seed = int(os.environ.get("OPTOUT_FAULT_SEED") or random.SystemRandom().randrange(2 ** 32))
    delay = round(random.Random(seed).uniform(0.1, 0.8), 3)
    print(f"SMTP kill -9: OPTOUT_FAULT_SEED={seed}: {delay}s after the first 250")
    messages = [raw.replace(b"\n", b"\r\n") for raw in distinct_messages(400)]
    database, port = tmp_path / "optout.db", free_port()
    env = optout_env(OPTOUT_DATABASE=str(database), OPTOUT_SMTP_LISTEN=f"127.0.0.1:{port}")

    def start():
        with open(tmp_path / "daemon.log", "ab") as log:
            daemon = subprocess.Popen(optout_command() + ["daemon"], cwd=tmp_path, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for_port(port, timeout=30)
        return daemon

    def send_all(accepted: list[bytes]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                for raw in messages:
                    if client.sendmail("person@example.net", ["privacy@example.com"], raw) == {}:
                        accepted.append(raw)
        except (smtplib.SMTPException, OSError):
            pass  # the daemon is gone: whatever got no 250 is the client's to send again

    daemon = start()
    accepted: list[bytes] = []
    sender = threading.Thread(target=send_all, args=(accepted,))
    try:
        sender.start()
        wait_until(lambda: accepted, 30, "a first 250")
        time.sleep(delay)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        sender.join(30)
        recorded = {row[0] for row in query(database, "SELECT key FROM ledger")}
        daemon = start()
        everything: list[bytes] = []
        send_all(everything)  # the sending MTA tries again: every message, the accepted ones too
    finally:
        daemon.kill()
        daemon.wait(10)

    assert 0 < len(accepted) < len(messages), (seed, len(accepted))
    assert {parse_message(raw).key for raw in accepted} <= recorded, seed
    assert len(everything) == len(messages)
    assert ledger_count(database) == len(messages)
    assert query(database, "SELECT count(*), count(DISTINCT message_key) FROM audit WHERE event = 'message'") \
        == [(len(messages), len(messages))]
    assert half_written(database) == {}


def test_a_reply_written_to_the_sent_maildir_just_before_a_crash_is_not_written_again_by_the_retry(tmp_path):
    from optout.outbox import MaildirTransport

    reply = make_mail("Your opt-out is done.", message_id="<optout.1@example.com>")
    MaildirTransport(tmp_path / "sent").send(reply, "ann@example.net", "<optout.1@example.com>")
    (written,) = (tmp_path / "sent" / "new").iterdir()
    MaildirTransport(tmp_path / "sent").send(reply, "ann@example.net", "<optout.1@example.com>")  # the next run
    after_retry = sorted(path.name for path in (tmp_path / "sent").rglob("*") if path.is_file())
    written.rename(tmp_path / "sent" / "cur" / f"{written.name}:2,S")  # a person read it
    MaildirTransport(tmp_path / "sent").send(reply, "ann@example.net", "<optout.1@example.com>")
    MaildirTransport(tmp_path / "sent").send(reply, "ann@example.net", "<optout.2@example.com>")

    assert after_retry == [written.name]
    assert len(list((tmp_path / "sent" / "cur").iterdir())) == 1
    assert len(list((tmp_path / "sent" / "new").iterdir())) == 1  # only the other reply
    assert list((tmp_path / "sent" / "tmp").iterdir()) == []


def test_kill_9_while_the_relay_acknowledges_a_reply_does_not_send_it_twice(tmp_path, run_optout, relay):
    database = tmp_path / "optout.db"
    (tmp_path / "ann.eml").write_bytes(make_mail("Please unsubscribe me from your newsletter."))
    env = {"OPTOUT_DATABASE": str(database), "OPTOUT_RELAY_URL": relay.url}
    assert run_optout("process", str(tmp_path / "ann.eml"), env=env).returncode == 0
    relay.handler.mode = "slow"
    run = subprocess.Popen(optout_command() + ["run", "--once"], cwd=tmp_path, env=optout_env(**env),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: relay.received, 30, "the relay has the reply")
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait(10)
    relay.handler.mode = "accept"
    rerun = run_optout("run", "--once", env=env)

    assert run.returncode == -signal.SIGKILL
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # Killed after the relay had the bytes and before its answer: in doubt, held for a person, not sent again.
    assert query(database, "SELECT status FROM outbox") == [("in-doubt",)]
    assert len(relay.received) == 1
    assert "1 in doubt" in rerun.stdout and "outbox list --status in-doubt" in rerun.stderr
    listed = run_optout("outbox", "list", "--status", "in-doubt", "--json", env=env)
    (row,) = json.loads(listed.stdout)
    # The relay's log shows the Message-ID: the admin confirms it went, and it is never sent again.
    assert run_optout("outbox", "confirm", str(row["id"]), env=env).returncode == 0
    assert query(database, "SELECT status FROM outbox") == [("sent",)]
    assert run_optout("run", "--once", env=env).returncode == 0
    assert len(relay.received) == 1
