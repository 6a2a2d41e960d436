"""Replies through the durable outbox to a real relay: a second aiosmtpd on loopback."""

import csv
import email
import email.policy
import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optout.outbox import MaildirTransport, RelayTransport, backoff, flush, relay_settings
from optout.policy import Rules
from optout.process import Pipeline, process
from optout.replies import template_environment
from optout.store import Store

from conftest import NOW, Clock, make_mail

OPTOUT = Path(sys.executable).parent / "optout"


@pytest.fixture
def pipeline(lexicon):
    return Pipeline(lexicon, rules=Rules(own_addresses=("privacy@example.com",)), templates=template_environment(),
                    reply_from="privacy@example.com", organisation="Example Ltd")


def feed(store, pipeline, clock, *bodies, sender="Ann Example <ann@example.net>"):
    for index, body in enumerate(bodies):
        raw = make_mail(body, f"Request {index}", sender=sender, message_id=f"<m{index}.{time.monotonic_ns()}@example.net>")
        process(raw, "file", store, pipeline, clock())


def attempts(store):
    return [row[0] for row in store.db.execute("SELECT result FROM outbox_attempts ORDER BY id")]


def test_a_reply_reaches_the_relay_once(store, pipeline, relay):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me from the newsletter.")
    summary = flush(store, RelayTransport(relay_settings(relay.url)), clock)
    assert (summary.sent, summary.retried, summary.failed) == (1, 0, 0)
    (got,) = relay.received
    assert got.mail_from in ("", "<>")  # RFC 3834 §3.3: a null envelope sender, so nothing bounces back into a loop
    assert got.rcpt_tos == ["ann@example.net"]
    assert got.message["Auto-Submitted"] == "auto-replied"
    assert got.message["Subject"] == "Re: Request 0"
    clock.advance(days=2)
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).sent == 0
    assert len(relay.received) == 1  # marked sent: never sent twice
    assert store.outbox()[0]["status"] == "sent"


def test_relay_down_then_back_nothing_lost(store, pipeline, relay):
    clock = Clock()
    feed(store, pipeline, clock, "Please delete my account and all my data.")
    relay.stop()
    summary = flush(store, RelayTransport(relay_settings(relay.url)), clock)
    assert (summary.sent, summary.retried) == (0, 1)
    (row,) = store.outbox()
    assert row["status"] == "queued" and row["attempts"] == 1 and "unreachable" in row["last_error"]
    relay.start()
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).sent == 0  # not due yet: backoff
    clock.advance(seconds=backoff(0).total_seconds() + 1)
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).sent == 1
    assert len(relay.received) == 1
    assert attempts(store) == ["retry", "sent"]


def test_temporary_refusal_is_retried_with_growing_delays(store, pipeline, relay):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.")
    relay.handler.mode = "tempfail"
    delays = []
    for _ in range(3):
        flush(store, RelayTransport(relay_settings(relay.url)), clock)
        row = store.outbox()[0]
        due = row["next_attempt_at"]
        delays.append(due)
        clock.now = clock.now.fromisoformat(due)
    assert store.outbox()[0]["attempts"] == 3
    assert attempts(store) == ["retry", "retry", "retry"]
    assert backoff(0) < backoff(1) < backoff(2)
    relay.handler.mode = "accept"
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).sent == 1


def test_a_dropped_connection_mid_data_is_retried(store, pipeline, relay):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.")
    relay.handler.mode = "drop"
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).retried == 1
    relay.handler.mode = "accept"
    clock.advance(hours=1)
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).sent == 1


def test_permanent_refusal_fails_the_reply(store, pipeline, relay):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.")
    relay.handler.mode = "permfail"
    summary = flush(store, RelayTransport(relay_settings(relay.url)), clock)
    assert summary.failed == 1
    assert store.outbox()[0]["status"] == "failed" and store.outbox()[0]["last_error"].startswith("550")
    clock.advance(days=1)
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock).failed == 0  # failed is final


def test_hourly_circuit_breaker_holds_replies(store, pipeline, relay, caplog):
    import optout.outbox

    optout.outbox._last_warning[0] = 0.0  # the warning is rate-limited per process
    clock = Clock()
    for index in range(5):
        feed(store, pipeline, clock, "Please unsubscribe me.", sender=f"Person {index} <p{index}@example.net>")
    summary = flush(store, RelayTransport(relay_settings(relay.url)), clock, hourly_cap=2)
    assert (summary.sent, summary.held) == (2, 3)
    assert "circuit breaker" in caplog.text
    assert len(relay.received) == 2
    clock.advance(minutes=61)
    assert flush(store, RelayTransport(relay_settings(relay.url)), clock, hourly_cap=2).sent == 2
    # Suppression never waited for the replies: all five are on the list.
    assert len(store.suppressions()) == 5


def test_one_reply_of_a_kind_per_address_per_day(store, pipeline):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.", "Unsubscribe me now!", "Stop emailing me.")
    assert len(store.outbox()) == 1
    clock.advance(days=1, minutes=1)
    feed(store, pipeline, clock, "I said: unsubscribe me.")
    assert len(store.outbox()) == 2


def test_daily_cap_per_address(store, lexicon):
    pipeline = Pipeline(lexicon, rules=Rules(daily_reply_cap=2), templates=template_environment())
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.", "What personal data do you hold about me?",
         "Please delete my account and all my data.")
    assert [row["kind"] for row in store.outbox()] == ["access", "opt-out"]


def test_without_a_relay_replies_go_to_a_maildir(store, pipeline, tmp_path):
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.")
    assert flush(store, MaildirTransport(tmp_path / "sent"), clock).sent == 1
    (file,) = (tmp_path / "sent" / "new").iterdir()
    assert email.message_from_bytes(file.read_bytes())["To"] == "Ann Example <ann@example.net>"


def test_no_reply_to_any_never_reply_row_of_the_corpora(corpora, lexicon, tmp_path):
    pipeline = Pipeline(lexicon, rules=Rules(reply_to_other=True), templates=template_environment())
    with Store(tmp_path / "corpus.db") as store, open(corpora / "labels.tsv", encoding="utf-8") as handle:
        never = [row["path"] for row in csv.DictReader(handle, delimiter="\t") if row["reply"] == "never"]
        for path in never:
            process((corpora / path).read_bytes(), "file", store, pipeline, NOW)
        assert len(never) > 800
        assert store.outbox() == []


def test_dkim_signature_verifies(store, pipeline, relay, tmp_path):
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from optout.signing import dkim_signer

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    (tmp_path / "dkim.pem").write_bytes(pem)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    clock = Clock()
    feed(store, pipeline, clock, "Please unsubscribe me.")
    flush(store, RelayTransport(relay_settings(relay.url)), clock, signer=dkim_signer("sel", "example.com", tmp_path / "dkim.pem"))
    raw = relay.received[0].raw
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record if name == b"sel._domainkey.example.com." else None)
    assert b"Hello" in raw
    assert not dkim.verify(raw.replace(b"Hello", b"Howdy"), dnsfunc=lambda name, timeout=5: record)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_daemon(tmp_path, name, port, relay_port, privacy):
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[addresses]\nprivacy = ["{privacy}"]\n[replies]\norganisation = "{name}"\n')
    env = {**os.environ, "OPTOUT_CONFIG": str(config), "OPTOUT_DATABASE": str(tmp_path / f"{name}.db"),
           "OPTOUT_SMTP_LISTEN": f"127.0.0.1:{port}", "OPTOUT_RELAY_URL": f"smtp://127.0.0.1:{relay_port}"}
    log = open(tmp_path / f"{name}.log", "w")
    process_ = subprocess.Popen([str(OPTOUT), "daemon"], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    assert wait_for(lambda: _accepts(port)), (tmp_path / f"{name}.log").read_text()
    return process_, log


def _accepts(port):
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def outbox_of(tmp_path, name):
    result = subprocess.run([str(OPTOUT), "outbox", "list", "--json"], capture_output=True, text=True,
                            env={**os.environ, "OPTOUT_DATABASE": str(tmp_path / f"{name}.db")}, cwd=tmp_path)
    return json.loads(result.stdout) if result.stdout.strip().startswith("[") else []


def test_two_instances_that_answer_each_other_do_not_loop(tmp_path):
    port_a, port_b = free_port(), free_port()
    a, log_a = start_daemon(tmp_path, "alpha", port_a, port_b, "privacy@alpha.example")
    b, log_b = start_daemon(tmp_path, "beta", port_b, port_a, "privacy@beta.example")
    try:
        # Beta's privacy team writes to alpha: alpha confirms the opt-out; the confirmation lands at beta.
        raw = make_mail("Please unsubscribe me from your newsletter.", "Unsubscribe",
                        sender="Beta Privacy <privacy@beta.example>", to="privacy@alpha.example")
        with smtplib.SMTP("127.0.0.1", port_a, timeout=10) as client:
            client.sendmail("privacy@beta.example", ["privacy@alpha.example"], raw)
        assert wait_for(lambda: any(r["status"] == "sent" for r in outbox_of(tmp_path, "alpha")))
        assert wait_for(lambda: "source=smtp kind=other reason=auto-reply" in (tmp_path / "beta.log").read_text())
        time.sleep(2)  # time enough for a loop to show itself
        assert len(outbox_of(tmp_path, "alpha")) == 1
        assert outbox_of(tmp_path, "beta") == []
    finally:
        for proc, log in ((a, log_a), (b, log_b)):
            proc.terminate()
            proc.wait(20)
            log.close()
    assert a.returncode == 0 and b.returncode == 0


def test_the_pipeline_the_commands_build_queues_replies(tmp_path):
    from optout.config import Settings
    from optout.daemon import make_pipeline

    pipeline = make_pipeline(Settings(organisation="Example Ltd"))
    with Store(tmp_path / "cli.db") as store:
        outcome = process(make_mail("Please unsubscribe me."), "smtp", store, pipeline, NOW)
        assert outcome.reply is not None
        assert b"From: Example Ltd <privacy@example.com>" in outcome.reply.raw
        assert [row["status"] for row in store.outbox()] == ["queued"]
