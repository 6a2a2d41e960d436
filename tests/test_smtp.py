"""Our SMTP/LMTP endpoint on a free port, with smtplib and swaks as clients: allow-list, limits, 250 after commit."""

from __future__ import annotations

import os
import shutil
import smtplib
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import LoopThread, make_mail, query
from optout.config import Settings
from optout.daemon import recipient_filter
from optout.process import Intake, Pipeline
from optout.sources.smtp import PrivacyHandler, SmtpLimits, start_server
from optout.store import Store

OPT_OUT = "Please unsubscribe me from your newsletter."


def unique_mail(tag: str, body: str = OPT_OUT, subject: str = "Unsubscribe", **options) -> tuple[bytes, str]:
    """Return a message with CRLF line ends (smtplib sends bytes as they are) and its Message-ID."""
    message_id = f"<{tag}-{time.monotonic_ns()}@example.net>"
    return make_mail(body, subject=subject, message_id=message_id, **options).replace(b"\n", b"\r\n"), message_id


def padding(size: int) -> str:
    """Return about `size` bytes of text in lines of 70 characters (SMTP lines stay under 1000)."""
    return ("x" * 69 + "\n") * (size // 70)


def ledger_row(database, message_id: str) -> dict | None:
    connection = sqlite3.connect(f"file:{database}?mode=rw", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        row = connection.execute("SELECT * FROM ledger WHERE message_id = ?", [message_id]).fetchone()
        return dict(row) if row else None
    finally:
        connection.close()


def ledger_count(database) -> int:
    return query(database, "SELECT count(*) FROM ledger")[0][0] if database.exists() else 0


@pytest.mark.parametrize("recipient", ["privacy@example.com", "unsubscribe@example.com",
                                       "unsubscribe+tag@example.com", "Privacy@EXAMPLE.com"])
def test_our_addresses_are_accepted_and_the_message_recorded(smtp_daemon, recipient):
    endpoint = smtp_daemon()
    raw, message_id = unique_mail("allowed")

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        refused = client.sendmail("ann@example.net", [recipient], raw)

    assert refused == {}
    assert ledger_row(endpoint.database, message_id)["source"] == "smtp"


@pytest.mark.parametrize("recipient", ["ceo@example.com", "privacy@example.org", "someone@elsewhere.example",
                                       "privacy@example.com.evil.example", "privacy%example.com@relay.example"])
def test_other_recipients_are_refused_at_rcpt_with_550_not_relayed(smtp_daemon, recipient):
    endpoint = smtp_daemon()
    raw, _ = unique_mail("relay")

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        client.ehlo()
        assert client.mail("x@example.net")[0] == 250
        code, text = client.rcpt(recipient)
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("x@example.net", [recipient], raw)

    assert code == 550
    assert refused.value.recipients[recipient][0] == 550
    assert ledger_count(endpoint.database) == 0


def test_a_message_over_the_size_limit_is_refused_with_552_at_mail_when_declared(smtp_daemon):
    endpoint = smtp_daemon(smtp_max_message_bytes=20_000)
    small, small_id = unique_mail("small", OPT_OUT + "\n" + padding(10_000))
    big, _ = unique_mail("big", OPT_OUT + "\n" + padding(40_000))

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        assert client.sendmail("ann@example.net", ["privacy@example.com"], small) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # smtplib declares SIZE= in MAIL FROM
            client.sendmail("ann@example.net", ["privacy@example.com"], big)

    assert refused.value.smtp_code == 552
    assert ledger_row(endpoint.database, small_id) is not None
    assert ledger_count(endpoint.database) == 1


def test_a_message_over_the_size_limit_is_refused_with_552_after_data_when_undeclared(smtp_daemon):
    endpoint = smtp_daemon(smtp_max_message_bytes=20_000)
    big, _ = unique_mail("big", OPT_OUT + "\n" + padding(40_000))

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        client.ehlo()
        client.mail("ann@example.net")
        client.rcpt("privacy@example.com")
        code, _ = client.data(big)
        still_talking = client.noop()[0]

    assert code == 552
    assert still_talking == 250
    assert ledger_count(endpoint.database) == 0


def test_too_many_recipients_get_452_and_the_accepted_ones_still_get_the_message(smtp_daemon):
    endpoint = smtp_daemon(smtp_max_recipients=3)
    raw, message_id = unique_mail("many")
    recipients = [f"unsubscribe+{n}@example.com" for n in range(4)]

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        refused = client.sendmail("ann@example.net", recipients, raw)

    assert list(refused) == [recipients[3]]
    assert refused[recipients[3]][0] == 452
    assert ledger_row(endpoint.database, message_id) is not None
    assert ledger_count(endpoint.database) == 1


def test_250_comes_only_after_the_ledger_row_exists(smtp_daemon):
    endpoint = smtp_daemon()
    raw, message_id = unique_mail("commit")

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        for n in range(5):
            raw, message_id = unique_mail(f"commit{n}")
            client.sendmail("ann@example.net", ["privacy@example.com"], raw)
            assert ledger_row(endpoint.database, message_id) is not None, f"250 before the commit of message {n}"


def test_250_waits_for_a_commit_the_database_delays(smtp_daemon):
    endpoint = smtp_daemon()
    raw, message_id = unique_mail("slow")
    ledger_count(endpoint.database)  # the store has migrated: the lock below only delays the commit
    blocker = sqlite3.connect(endpoint.database, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.0, blocker.execute, ["ROLLBACK"])
    release.start()
    try:
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=20) as client:
            client.sendmail("ann@example.net", ["privacy@example.com"], raw)
            waited = time.monotonic() - started
            row = ledger_row(endpoint.database, message_id)
    finally:
        release.join()
        blocker.close()

    assert waited >= 0.9
    assert row is not None


@pytest.fixture
def short_timeout_endpoint(tmp_path, lexicon):
    """Our handler in front of an Intake whose store gives up after 0.2 s of a locked database."""
    database = tmp_path / "optout.db"
    writer = ThreadPoolExecutor(max_workers=1)
    intake = writer.submit(lambda: Intake(Store(database, timeout=0.2), Pipeline(lexicon))).result()
    loop = LoopThread()

    async def submit(raw, mail_from, recipients):
        return await loop.loop.run_in_executor(writer, intake.submit, raw, "smtp", mail_from, recipients)

    handler = PrivacyHandler(submit, recipient_filter(Settings()), SmtpLimits())
    server = loop.run(start_server(handler, "127.0.0.1", 0))
    try:
        yield server.sockets[0].getsockname()[1], database
    finally:
        server.close()
        writer.submit(intake.store.close).result()
        writer.shutdown()
        loop.close()


def test_a_locked_database_gets_451_and_the_retry_gets_250(short_timeout_endpoint):
    port, database = short_timeout_endpoint
    raw, message_id = unique_mail("locked")
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as temporary:
                client.sendmail("ann@example.net", ["privacy@example.com"], raw)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        retried = client.sendmail("ann@example.net", ["privacy@example.com"], raw)

    assert temporary.value.smtp_code == 451
    assert retried == {}
    assert ledger_row(database, message_id) is not None


def test_a_null_envelope_sender_is_kept_and_never_replied_to(smtp_daemon):
    endpoint = smtp_daemon()
    person, person_id = unique_mail("person")
    null, null_id = unique_mail("null")

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        client.sendmail("ann@example.net", ["privacy@example.com"], person)
        client.sendmail("", ["privacy@example.com"], null)  # MAIL FROM:<>

    assert ledger_row(endpoint.database, person_id)["may_reply"] == 1
    row = ledger_row(endpoint.database, null_id)
    assert row["may_reply"] == 0
    assert row["no_reply_reason"] == "null return path" or row["no_reply_reason"].startswith("machine mail"), row


def test_the_envelope_recipient_is_kept_an_unsubscribe_address_makes_an_opt_out(smtp_daemon):
    endpoint = smtp_daemon()
    plain_to_privacy, privacy_id = unique_mail("privacy", "Hello, thanks.", "Hello", to="team@example.com")
    plain_to_unsubscribe, unsubscribe_id = unique_mail("unsub", "Hello, thanks.", "Hello", to="team@example.com")

    with smtplib.SMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        client.sendmail("ann@example.net", ["privacy@example.com"], plain_to_privacy)
        client.sendmail("ann@example.net", ["unsubscribe+tag@example.com"], plain_to_unsubscribe)

    assert ledger_row(endpoint.database, privacy_id)["kind"] == "other"
    row = ledger_row(endpoint.database, unsubscribe_id)
    assert (row["kind"], row["rule"]) == ("opt-out", "addressed.unsubscribe")
    assert "unsubscribe+tag@example.com" in row["evidence"]


def test_lmtp_answers_once_per_accepted_recipient(smtp_daemon):
    endpoint = smtp_daemon(smtp_lmtp=True)
    raw, message_id = unique_mail("lmtp")

    with smtplib.LMTP("127.0.0.1", endpoint.port, timeout=10) as client:
        assert client.ehlo()[0] == 250  # smtplib.LMTP says LHLO
        assert client.docmd("EHLO", "client.example.net")[0] == 500  # not an LMTP command
        assert client.mail("ann@example.net")[0] == 250
        accepted = [client.rcpt(a)[0] for a in ("privacy@example.com", "ceo@example.com", "unsubscribe@example.com")]
        first = client.data(raw)[0]
        second = client.getreply()[0]  # RFC 2033 §4.2: the second accepted recipient's reply
        after = client.noop()  # nothing else was pending: this is NOOP's own reply

    assert accepted == [250, 550, 250]
    assert (first, second) == (250, 250)
    assert after[0] == 250 and b"OK" in after[1].upper()
    assert ledger_row(endpoint.database, message_id) is not None
    assert ledger_count(endpoint.database) == 1


def swaks_binary() -> str:
    binary = shutil.which("swaks")
    if binary is None:
        reason = "swaks is not installed (apt-get install swaks)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return binary


def swaks(port: int, recipient: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([swaks_binary(), "--server", f"127.0.0.1:{port}", "--to", recipient,
                           "--from", "x@example.net", "--data", f"@{path}"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_swaks_delivers_a_file_and_gets_250_after_the_commit(smtp_daemon, tmp_path):
    endpoint = smtp_daemon()
    raw, message_id = unique_mail("swaks")
    (tmp_path / "mail.eml").write_bytes(raw)

    result = swaks(endpoint.port, "privacy@example.com", tmp_path / "mail.eml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 OK: processed" in result.stdout
    assert ledger_row(endpoint.database, message_id)["source"] == "smtp"


def test_swaks_to_a_stranger_is_refused_at_rcpt(smtp_daemon, tmp_path):
    endpoint = smtp_daemon()
    raw, _ = unique_mail("swaks-relay")
    (tmp_path / "mail.eml").write_bytes(raw)

    result = swaks(endpoint.port, "friend@elsewhere.example", tmp_path / "mail.eml")

    assert result.returncode == 24, result.stdout + result.stderr  # swaks: no RCPT accepted
    assert "<** 550" in result.stdout
    assert ledger_count(endpoint.database) == 0
