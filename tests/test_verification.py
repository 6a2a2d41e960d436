"""Access and deletion requests end to end, through real mail on loopback.

Our daemon's SMTP endpoint takes the request; its outbox sends the acknowledgement to a second aiosmtpd (the
relay); the test answers it as a mail client would; the fulfilment arrives at the relay.
"""

from __future__ import annotations

import json
import re
import smtplib
import sqlite3
import subprocess
import time
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from conftest import NOW, Clock, LoopThread, make_mail, optout_command, optout_env, query
from relay import Relay

ANN = "Ann Example <ann@example.net>"
MALLORY = "Mallory <mallory@example.org>"


class Desk:
    """optout's daemon with a relay and a contact database: send mail to it, read what it sends."""

    def __init__(self, tmp_path: Path, relay: Relay, **overrides) -> None:
        from optout.config import Settings
        from optout.daemon import Daemon, make_pipeline

        self.contacts = tmp_path / "crm.db"
        with sqlite3.connect(self.contacts) as crm:
            crm.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, city TEXT)")
            crm.executemany("INSERT INTO customers (email, name, city) VALUES (?, ?, ?)",
                            [("Ann@Example.net", "Ann Example", "Leeds"), ("bob@example.net", "Bob", "York")])
        self.settings = Settings(**{
            "database": str(tmp_path / "optout.db"), "smtp_listen": "127.0.0.1:0", "relay_url": relay.url,
            "organisation": "Example Ltd", "contact_tables": ("customers.email",),
            "contacts_database": str(self.contacts), "workers": 0, **overrides})
        self.relay = relay
        self.clock = Clock()
        self.loop = LoopThread()
        self.daemon = Daemon(self.settings, make_pipeline(self.settings), clock=self.clock)
        self.daemon.outbox_interval = 0.2
        self.daemon.sweep_interval = 0.2
        self.loop.run(self.daemon.start())
        self.database = Path(self.settings.database)

    def send(self, raw: bytes, to: str = "privacy@example.com", sender: str = "ann@example.net") -> None:
        with smtplib.SMTP("127.0.0.1", self.daemon.address[1], timeout=10) as client:
            client.sendmail(sender, [to], raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    def wait_for_mail(self, count: int, timeout: float = 15):
        deadline = time.monotonic() + timeout
        while len(self.relay.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the relay has {len(self.relay.received)} messages, expected {count}")
            time.sleep(0.05)
        return self.relay.received[count - 1]

    def request(self) -> dict:
        (row,) = query(self.database, "SELECT id, kind, status, address FROM requests")
        return dict(zip(("id", "kind", "status", "address"), row))

    def audit(self, event: str) -> list[dict]:
        return [json.loads(row[0]) for row in query(self.database, "SELECT detail FROM audit WHERE event = ?",
                                                    (event,))]

    def close(self) -> None:
        if self.loop.loop.is_closed():
            return
        try:
            self.loop.run(self.daemon.stop(grace=5))
        finally:
            self.loop.close()


@pytest.fixture
def desk(tmp_path, relay):
    started: list[Desk] = []

    def start(**overrides) -> Desk:
        started.append(Desk(tmp_path, relay, **overrides))
        return started[-1]

    yield start
    for one in started:
        one.close()


def answer(acknowledgement, body: str, sender: str = ANN, to: str | None = None, subject: str | None = None,
           headers: dict | None = None) -> bytes:
    """Reply to the acknowledgement as a mail client does: to its Reply-To, "Re:" its subject, quoting it."""
    ack = acknowledgement.message
    reply = EmailMessage()
    reply["From"] = sender
    reply["To"] = to or ack["Reply-To"] or ack["From"]
    reply["Subject"] = subject if subject is not None else f"Re: {ack['Subject']}"
    reply["Message-ID"] = make_msgid(domain="example.net")
    reply["In-Reply-To"] = ack["Message-ID"]
    for name, value in (headers or {}).items():
        reply[name] = value
    quoted = "\n".join("> " + line for line in ack.get_body(("plain",)).get_content().splitlines())
    reply.set_content(f"{body}\n\nOn Sun, 29 Nov 2026, Example Ltd wrote:\n{quoted}\n")
    return reply.as_bytes()


def token_of(acknowledgement) -> str:
    return re.search(r"confirm-([a-z2-7]{16})", acknowledgement.message["Reply-To"]).group(1)


def test_access_request_acknowledged_confirmed_and_answered_with_the_data(desk):
    office = desk()
    office.send(make_mail("What personal data do you hold about me? Please send me a copy.", subject="My data",
                          sender=ANN, message_id="<a1@example.net>", headers={"Reply-To": MALLORY}))

    ack = office.wait_for_mail(1)
    assert ack.rcpt_tos == ["ann@example.net"]  # never Reply-To
    token = token_of(ack)
    assert ack.message["Reply-To"] == f"privacy+confirm-{token}@example.com"
    assert f"confirm-{token}" in ack.message["Subject"] and "[A-" in ack.message["Subject"]
    text = ack.message.get_body(("plain",)).get_content()
    assert f"privacy+confirm-{token}@example.com" in text and "2026-12-06" in text  # confirm within 7 days
    assert office.request()["status"] == "awaiting-verification"
    stored = query(office.database, "SELECT token_hash FROM requests")[0][0]
    assert stored and token not in stored  # only the token's hash is kept

    office.send(answer(ack, "Yes, that was me. Please go ahead."), to=f"privacy+confirm-{token}@example.com")

    data_mail = office.wait_for_mail(2)
    assert data_mail.rcpt_tos == ["ann@example.net"]
    message = data_mail.message
    assert message.get_content_type() == "multipart/mixed"
    (attachment,) = [part for part in message.iter_attachments()]
    assert attachment.get_filename().startswith("personal-data-A-") and attachment.get_content_type() == "application/json"
    data = json.loads(attachment.get_content())
    assert data["address"] == "ann@example.net"
    assert len(data["messages"]) == 2 and {m["kind"] for m in data["messages"]} >= {"access"}
    assert data["requests"][0]["status"] == "verified"  # as it stood when the export was made
    assert data["contacts"]["customers.email"][0]["city"] == "Leeds"  # the contact table, matched case-blind
    assert data["replies"][0]["kind"] == "access"
    summary = message.get_body(("plain",)).get_content()
    assert "2 messages you sent us" in summary and "1 rows in our table customers.email" in summary
    assert office.request()["status"] == "fulfilled"
    assert [e["status"] for e in office.audit("confirmation.refused")] == []
    assert [m.rcpt_tos for m in office.relay.received] == [["ann@example.net"]] * 2  # nothing to Mallory


def test_a_confirmation_from_another_address_or_a_machine_or_twice_does_not_verify(desk):
    office = desk()
    office.send(make_mail("Please send me all the personal data you have on me.", subject="Access", sender=ANN,
                          message_id="<a2@example.net>"))
    ack = office.wait_for_mail(1)
    token = token_of(ack)
    confirm_to = f"privacy+confirm-{token}@example.com"

    # Someone else who learnt the token (a forwarded mail): refused, however it is addressed.
    office.send(answer(ack, "Confirmed.", sender=MALLORY), to=confirm_to, sender="mallory@example.org")
    # An out-of-office answering the acknowledgement from the right address: a machine, refused.
    office.send(answer(ack, "I am away until Monday.", subject="Automatic reply: " + ack.message["Subject"],
                       headers={"Auto-Submitted": "auto-replied"}), to=confirm_to)
    office.send(answer(ack, "Confirmed, but the token is wrong.", to="privacy+confirm-aaaaaaaaaaaaaaaa@example.com",
                       subject="Re: confirm-aaaaaaaaaaaaaaaa"), to="privacy+confirm-aaaaaaaaaaaaaaaa@example.com")
    time.sleep(1.0)
    assert office.request()["status"] == "awaiting-verification"
    assert sorted(e["status"] for e in office.audit("confirmation.refused")) == ["machine", "other-address", "unknown"]
    assert len(office.relay.received) == 1  # no data, no answer to anybody

    # The token only in the subject (a client that dropped the +tag): accepted from Ann, once.
    office.send(answer(ack, "Yes, confirmed.", to="privacy@example.com"))
    office.wait_for_mail(2)
    office.send(answer(ack, "Confirming again, just in case."), to=confirm_to)
    time.sleep(1.0)
    assert office.request()["status"] == "fulfilled"
    assert [e["status"] for e in office.audit("confirmation.refused")][-1] == "used"
    assert len(office.relay.received) == 2  # the data went once


def test_an_expired_token_is_refused_and_the_request_closed_with_a_reply(desk):
    office = desk()
    office.daemon.sweep_interval = 3600  # no sweep until the test asks for one
    office.send(make_mail("Bitte löschen Sie alle meine Daten.", subject="Löschung", sender=ANN,
                          message_id="<d9@example.net>"))
    ack = office.wait_for_mail(1)
    assert "bestätigen" in ack.message.get_body(("plain",)).get_content()  # in the requester's language
    office.clock.now = NOW + timedelta(days=8)

    office.send(answer(ack, "Ja, bitte löschen."), to=f"privacy+confirm-{token_of(ack)}@example.com")
    time.sleep(0.5)
    assert [e["status"] for e in office.audit("confirmation.refused")] == ["expired"]
    assert office.request()["status"] == "awaiting-verification"

    from optout.fulfil import sweep
    from optout.store import Store

    with Store(office.database) as store:
        assert sweep(store, office.clock.now, office.daemon.pipeline.fulfilment)["expired"] == 1
    closed = office.wait_for_mail(2)
    assert closed.rcpt_tos == ["ann@example.net"]
    assert "nicht rechtzeitig" in closed.message.get_body(("plain",)).get_content()
    assert office.request()["status"] == "expired"
    # Asking to be forgotten stops the mail at once, whatever happens to the request.
    assert query(office.database, "SELECT scope, reason FROM suppressions WHERE address = 'ann@example.net'") == [
        ("all", "deletion")]


def test_deletion_leaves_no_trace_of_the_address_in_the_database_files_but_a_tombstone(desk, tmp_path):
    office = desk()
    office.send(make_mail("Please delete my account and all personal data you hold about me.",
                          subject="Delete my data", sender=ANN, message_id="<d1@example.net>"))
    ack = office.wait_for_mail(1)
    assert office.request()["status"] == "awaiting-verification"
    check = subprocess.run(optout_command() + ["suppression", "check", "ann@example.net"], capture_output=True,
                           text=True, env=optout_env(OPTOUT_DATABASE=str(office.database)))
    assert check.returncode == 0  # suppressed while it waits

    office.send(answer(ack, "Yes, please delete everything."), to=f"privacy+confirm-{token_of(ack)}@example.com")
    done = office.wait_for_mail(2)
    assert done.rcpt_tos == ["ann@example.net"]
    text = done.message.get_body(("plain",)).get_content()
    assert "1 rows in our table customers.email" in text and "2 messages you sent us" in text

    deadline = time.monotonic() + 10
    while query(office.database, "SELECT count(*) FROM outbox WHERE raw IS NOT NULL")[0][0]:
        assert time.monotonic() < deadline, "the sent confirmation still holds the address"
        time.sleep(0.05)
    office.close()  # the daemon lets go of the files: what is on disk is all there is

    for path in (office.database, Path(f"{office.database}-wal"), office.contacts):
        if path.exists():
            content = path.read_bytes().lower()
            assert b"ann@example.net" not in content, f"{path.name} still holds the address"
            assert b"ann example" not in content, f"{path.name} still holds the name"
    assert query(office.contacts, "SELECT email FROM customers") == [("bob@example.net",)]
    for args, expected in ((["suppression", "check", "ann@example.net"], 0), (["audit", "verify"], 0)):
        result = subprocess.run(optout_command() + args, capture_output=True, text=True,
                                env=optout_env(OPTOUT_DATABASE=str(office.database)))
        assert result.returncode == expected, result.stdout + result.stderr
    assert query(office.database, "SELECT address, scope, reason FROM suppressions") == [(None, "all", "deletion")]
    assert query(office.database, "SELECT status FROM requests") == [("fulfilled",)]
    # A re-import of an old list cannot bring the address back onto a send list.
    sendlist = tmp_path / "send.csv"
    sendlist.write_text("email\nann@example.net\ncarol@example.net\n")
    scrub = subprocess.run(optout_command() + ["scrub", str(sendlist), "--column", "email"], capture_output=True,
                           text=True, env=optout_env(OPTOUT_DATABASE=str(office.database)))
    assert scrub.returncode == 0 and "ann@example.net" not in scrub.stdout and "carol@example.net" in scrub.stdout
    imported = subprocess.run(optout_command() + ["suppression", "import", str(sendlist)], capture_output=True,
                              text=True, env=optout_env(OPTOUT_DATABASE=str(office.database)))
    assert imported.returncode == 0 and "1 suppressions added, 1 already there" in imported.stdout, imported.stdout
    assert b"ann@example.net" not in office.database.read_bytes().lower()
    office.relay.received.clear()


def test_held_requests_wait_for_an_admin_who_fulfils_them(desk, tmp_path):
    office = desk(fulfil="hold")
    office.send(make_mail("Please tell me what data you hold about me.", subject="Data", sender=ANN,
                          message_id="<a3@example.net>"))
    ack = office.wait_for_mail(1)
    office.send(answer(ack, "Confirmed."), to=f"privacy+confirm-{token_of(ack)}@example.com")
    confirmed = office.wait_for_mail(2)
    assert office.request()["status"] == "verified"
    assert "confirm" in confirmed.message["Subject"] and not list(confirmed.message.iter_attachments())
    time.sleep(0.5)
    assert len(office.relay.received) == 2  # held: no data yet, only word that a person deals with it

    env = optout_env(OPTOUT_DATABASE=str(office.database), OPTOUT_NOW=NOW.isoformat())
    config = tmp_path / "optout.toml"
    config.write_text(f'[contacts]\ntables = ["customers.email"]\ndatabase = "{office.contacts}"\n'
                      '[replies]\norganisation = "Example Ltd"\n')
    exported = subprocess.run(optout_command() + ["--config", str(config), "requests", "export", "1", "-o",
                                                  str(tmp_path / "ann.json")], capture_output=True, text=True, env=env)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "ann.json").read_text())["contacts"]["customers.email"][0]["name"] == "Ann Example"
    fulfilled = subprocess.run(optout_command() + ["--config", str(config), "requests", "fulfil", "1"],
                               capture_output=True, text=True, env=env)
    assert fulfilled.returncode == 0 and "fulfilled" in fulfilled.stdout, fulfilled.stderr
    data_mail = office.wait_for_mail(3)
    assert data_mail.rcpt_tos == ["ann@example.net"] and list(data_mail.message.iter_attachments())
    again = subprocess.run(optout_command() + ["--config", str(config), "requests", "fulfil", "1"],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 8 and "fulfilled" in again.stderr and "Traceback" not in again.stderr


def test_asking_again_before_confirming_resends_the_acknowledgement_with_a_fresh_token(desk):
    office = desk()
    office.send(make_mail("Please send me a copy of my personal data.", subject="Copy", sender=ANN,
                          message_id="<a5@example.net>"))
    first = office.wait_for_mail(1)
    office.send(make_mail("Did you get my request? Please send me a copy of my personal data.", subject="Copy?",
                          sender=ANN, message_id="<a6@example.net>"))
    time.sleep(0.5)
    assert len(office.relay.received) == 1  # one acknowledgement of a kind a day

    office.clock.now = NOW + timedelta(days=2)
    office.send(make_mail("Third try: please send me a copy of my personal data.", subject="Copy!!",
                          sender=ANN, message_id="<a7@example.net>"))
    second = office.wait_for_mail(2)
    assert token_of(second) != token_of(first)
    reference = re.search(r"\[(A-\w+) ", first.message["Subject"]).group(1)
    assert f"[{reference} " in second.message["Subject"]  # the same request, not a new one
    assert query(office.database, "SELECT count(*) FROM requests") == [(1,)]

    office.send(answer(first, "Confirmed (the first mail)."), to=f"privacy+confirm-{token_of(first)}@example.com")
    time.sleep(0.5)
    assert [e["status"] for e in office.audit("confirmation.refused")] == ["unknown"]
    office.send(answer(second, "Confirmed."), to=f"privacy+confirm-{token_of(second)}@example.com")
    office.wait_for_mail(3)
    assert office.request()["status"] == "fulfilled"


def test_the_daemon_expires_unconfirmed_requests_on_its_own(desk):
    office = desk()
    office.send(make_mail("Please erase my data.", subject="Erase", sender=ANN, message_id="<d8@example.net>"))
    office.wait_for_mail(1)
    office.clock.now = NOW + timedelta(days=7, minutes=1)
    closed = office.wait_for_mail(2)
    assert "was not confirmed" in closed.message["Subject"]
    assert office.request()["status"] == "expired"


def test_a_forged_from_cannot_obtain_anyones_data(desk):
    office = desk()
    # Mallory writes as Ann, from Mallory's own server, asking for Ann's data to be sent to Mallory.
    office.send(make_mail("Send me a copy of all my personal data. Send it to mallory@example.org please.",
                          subject="My data", sender=ANN, message_id="<forged1@example.org>",
                          headers={"Reply-To": MALLORY, "Sender": MALLORY}), sender="mallory@example.org")
    ack = office.wait_for_mail(1)
    assert ack.rcpt_tos == ["ann@example.net"]  # the token goes to Ann, whom Mallory cannot read
    # Mallory, not having the token, guesses; and forges Ann's From again, with a guess in the subject.
    for guess in ("abcdefghijklmnop", "qrstuvwxyz234567"):
        office.send(make_mail("Confirmed.", subject=f"Re: My data [confirm-{guess}]", sender=ANN,
                              to=f"privacy+confirm-{guess}@example.com", message_id=f"<{guess}@example.org>"),
                    to=f"privacy+confirm-{guess}@example.com", sender="mallory@example.org")
    time.sleep(1.0)
    assert [e["status"] for e in office.audit("confirmation.refused")] == ["unknown", "unknown"]
    assert office.request()["status"] == "awaiting-verification"
    assert [m.rcpt_tos for m in office.relay.received] == [["ann@example.net"]]


def test_a_request_and_its_confirmation_from_the_imap_mailbox_with_run_once(mailbox, relay, run_optout, tmp_path):
    env = {**mailbox.env(), "OPTOUT_DATABASE": str(tmp_path / "optout.db"), "OPTOUT_RELAY_URL": relay.url,
           "OPTOUT_NOW": NOW.isoformat()}
    mailbox.append([make_mail("Wat voor persoonsgegevens hebben jullie over mij? Stuur me een kopie.",
                              subject="Inzage", sender=ANN, message_id="<nl1@example.net>")])
    first = run_optout("run", "--once", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    (ack,) = relay.received
    assert ack.rcpt_tos == ["ann@example.net"] and token_of(ack)

    mailbox.append([answer(ack, "Ja, dat klopt.")])
    second = run_optout("run", "--once", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert len(relay.received) == 2 and list(relay.received[1].message.iter_attachments())
    counts = mailbox.counts()
    assert counts.get("INBOX") == 0 and counts.get("Processed.access") == 1 and counts.get("Processed.confirmed") == 1
    assert query(tmp_path / "optout.db", "SELECT status FROM requests") == [("fulfilled",)]
