"""`optout daemon` as a subprocess: SMTP and IMAP IDLE together, SIGTERM, quiet logs, reconnects, one ledger row."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import time
import uuid

import pytest

from conftest import make_mail, optout_command, optout_env, query
from dovecot import Dovecot, free_port, require_dovecot, wait_for_port

TRACE = (b"Return-Path: <ann@example.net>\r\n"
         b"Delivered-To: privacy@example.com\r\n"
         b"Received: from optout.example.com (optout.example.com [192.0.2.9])\r\n"
         b"\tby imap.example.com with LMTP id Zx81; Sun, 29 Nov 2026 12:00:02 +0000\r\n")


class DaemonProcess:
    """One `optout daemon` subprocess; its stderr (the log) goes to a file."""

    def __init__(self, cwd, env: dict[str, str]) -> None:
        self.port = free_port()
        self.database = cwd / "optout.db"
        self.log = cwd / "daemon.log"
        env = {"OPTOUT_DATABASE": str(self.database), "OPTOUT_SMTP_LISTEN": f"127.0.0.1:{self.port}", **env}
        with open(self.log, "wb") as log, open(cwd / "daemon.out", "wb") as out:
            self.process = subprocess.Popen(optout_command() + ["daemon"], cwd=cwd, env=optout_env(**env),
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"optout daemon did not listen on {self.port}:\n{self.text()}") from None

    def text(self) -> str:
        """Return the log so far."""
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = 20) -> None:
        """Wait until `needle` appears `count` times in the log."""
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode} before logging {needle!r}:\n"
                                     f"{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} (x{count}) in the log after {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def send(self, raw: bytes, sender: str = "ann@example.net", recipient: str = "privacy@example.com") -> None:
        """Send one message over SMTP; raise unless it is accepted."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            assert client.sendmail(sender, [recipient], raw) == {}

    def terminate(self, timeout: float = 30) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def optout_daemon(tmp_path):
    """Start `optout daemon` subprocesses in tmp_path: `optout_daemon(env)`; SIGKILLed at the end if still running."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def mail(body: str, marker: str = "") -> bytes:
    """Return a CRLF message with a unique Message-ID."""
    return make_mail(f"{body}\n{marker}".strip(), subject="Unsubscribe", message_id=f"<{uuid.uuid4().hex}@example.net>"
                     ).replace(b"\n", b"\r\n")


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s")
        time.sleep(0.05)


def ledger_count(database) -> int:
    return query(database, "SELECT count(*) FROM ledger")[0][0] if database.exists() else 0


def filed(mailbox, count: int, folder: str = "Processed.opt-out"):
    """Say whether the INBOX is empty and `folder` holds `count` messages."""
    counts = mailbox.counts()
    return counts.get("INBOX") == 0 and counts.get(folder) == count


def test_mail_sent_over_smtp_is_recorded(optout_daemon, mailbox):
    daemon = optout_daemon(mailbox.env())
    raw = mail("Please unsubscribe me from your newsletter.")

    daemon.send(raw)

    assert query(daemon.database, "SELECT source, kind FROM ledger") == [("smtp", "opt-out")]


def test_mail_appended_to_the_inbox_is_picked_up_within_seconds_by_idle(optout_daemon, mailbox):
    daemon = optout_daemon(mailbox.env())
    daemon.wait_for_log("IMAP connected")
    time.sleep(0.5)  # let it finish its first pass and enter IDLE

    started = time.monotonic()
    mailbox.append([mail("Please unsubscribe me from your newsletter.")])
    wait_until(lambda: filed(mailbox, 1), 20, "the appended message filed in Processed.opt-out")
    elapsed = time.monotonic() - started

    assert elapsed < 5, f"took {elapsed:.1f}s: IDLE should bring it in ~0.5s, not the poll interval"
    assert query(daemon.database, "SELECT source, kind FROM ledger") == [("imap", "opt-out")]


def test_sigterm_exits_0_after_logging_stopped_and_the_log_holds_no_body_and_no_password(optout_daemon, mailbox):
    daemon = optout_daemon(mailbox.env())
    daemon.wait_for_log("IMAP connected")
    smtp_marker, imap_marker = f"SMTP-BODY-{uuid.uuid4().hex}", f"IMAP-BODY-{uuid.uuid4().hex}"
    daemon.send(mail("Please unsubscribe me from your newsletter.", smtp_marker))
    mailbox.append([mail("Please stop sending me your newsletter.", imap_marker)])
    wait_until(lambda: ledger_count(daemon.database) == 2, 20, "both messages in the ledger")

    started = time.monotonic()
    status = daemon.terminate()
    log = daemon.text()

    assert status == 0, log[-3000:]
    assert time.monotonic() - started < 10
    assert log.strip().splitlines()[-1].endswith("stopped")
    assert log.count("source=smtp") == 1 and log.count("source=imap") == 1
    assert smtp_marker not in log and imap_marker not in log
    assert mailbox.server.password not in log


def test_the_same_message_over_smtp_and_over_imap_is_processed_once(optout_daemon, mailbox):
    daemon = optout_daemon(mailbox.env())
    daemon.wait_for_log("IMAP connected")
    raw = mail("Please unsubscribe me from your newsletter.")

    daemon.send(raw)
    mailbox.append([TRACE + raw])  # the copy the mailbox got: same bytes under the trace headers of its delivery
    wait_until(lambda: filed(mailbox, 1), 20, "the IMAP copy filed")
    daemon.wait_for_log("action=duplicate")

    assert query(daemon.database, "SELECT source FROM ledger") == [("smtp",)]
    assert query(daemon.database, "SELECT count(*) FROM audit WHERE event = 'message'") == [(1,)]
    assert query(daemon.database, "SELECT count(*) FROM suppressions") == [(1,)]


def test_the_daemon_reconnects_with_backoff_after_dovecot_restarts(optout_daemon):
    require_dovecot()
    with Dovecot.temporary() as own:  # its own server: stopping it must not disturb other tests
        mailbox = own.mailbox()
        mailbox.append([mail("Please unsubscribe me from your newsletter.")])
        daemon = optout_daemon(mailbox.env())
        wait_until(lambda: filed(mailbox, 1), 20, "the first message filed")

        own.stop()
        # The old session lingers a few seconds, then says BYE and hangs up: the watcher must notice and retry.
        daemon.wait_for_log("reconnecting in 1s", timeout=30)
        own.start()
        mailbox.append([mail("Please stop all marketing emails to me.")])
        wait_until(lambda: filed(mailbox, 2), 40, "the message appended after the restart filed")
        status = daemon.terminate()

    log = daemon.text()
    delays = [int(d) for d in re.findall(r"reconnecting in (\d+)s", log)]
    assert status == 0, log[-3000:]
    assert delays and delays == [2 ** n for n in range(len(delays))], delays  # 1 s, then doubling
    assert log.count("IMAP connected") == 2
    assert ledger_count(daemon.database) == 2
