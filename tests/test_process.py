import sqlite3
from datetime import timedelta

import pytest

from conftest import NOW
from optout.model import Kind
from optout.process import Pipeline, process
from optout.store import Store

from conftest import make_mail

TRACE = (b"Return-Path: <ann@example.net>\r\n"
         b"Delivered-To: privacy@example.com\r\n"
         b"Received: from mx.example.net (mx.example.net [192.0.2.7])\r\n"
         b"\tby imap.example.com with LMTP id Zx81; Sun, 29 Nov 2026 12:00:02 +0000\r\n"
         b"Received: from out.example.net by mx.example.net; Sun, 29 Nov 2026 12:00:01 +0000\r\n")


@pytest.fixture
def pipeline(lexicon):
    return Pipeline(lexicon)


def rows(store, sql):
    with sqlite3.connect(store.path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql)]


def counts(store):
    return {table: rows(store, f"SELECT count(*) AS n FROM {table}")[0]["n"]
            for table in ("ledger", "suppressions", "requests", "audit")}


def opt_out_mail(mail):
    return mail("Please stop sending me emails. I want to opt out of everything.", subject="Opt-out")


def test_an_opt_out_mail_suppresses_the_sender(store, pipeline, mail):
    outcome = process(opt_out_mail(mail), "file", store, pipeline, NOW)

    assert outcome.duplicate is False
    assert outcome.classification.kind is Kind.OPT_OUT
    assert [(s["address"], s["scope"]) for s in store.suppressions()] == [("ann@example.net", "all")]
    assert rows(store, "SELECT count(*) AS n FROM requests") == [{"n": 0}]
    assert store.ledger(outcome.key)["kind"] == "opt-out"


@pytest.mark.parametrize("body", ["I want to opt out.", "Hi, I would like to unsubscribe. Thanks"])
def test_an_opt_out_in_the_body_alone_suppresses_the_sender(store, pipeline, mail, body):
    outcome = process(mail(body, subject="Hello"), "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.OPT_OUT
    assert [s["address"] for s in store.suppressions()] == ["ann@example.net"]


def test_a_newsletter_unsubscribe_suppresses_only_newsletters(store, pipeline, mail):
    process(mail("Please unsubscribe me from your newsletter.", subject="Unsubscribe"), "file", store, pipeline, NOW)

    assert [s["scope"] for s in store.suppressions()] == ["newsletters"]


def test_a_deletion_mail_suppresses_all_and_opens_a_request_due_in_one_month(store, pipeline, mail):
    raw = mail("Please delete my personal data and close my account.", subject="Delete my data")

    outcome = process(raw, "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.DELETION
    assert [(s["address"], s["scope"]) for s in store.suppressions()] == [("ann@example.net", "all")]
    requests = rows(store, "SELECT id, kind, address, status, due_at FROM requests")
    assert requests == [{"id": outcome.request_ids[0], "kind": "deletion", "address": "ann@example.net",
                         "status": "awaiting-verification", "due_at": "2026-12-29T12:00:00+00:00"}]
    assert outcome.decision.requests[0].due_at == NOW + timedelta(days=30)


def test_an_access_mail_opens_a_request_and_suppresses_nothing(store, pipeline, mail):
    raw = mail("Please send me a copy of all personal data you hold about me.", subject="Data access request")

    outcome = process(raw, "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.ACCESS
    assert store.suppressions() == []
    assert [(r["kind"], r["address"], r["status"]) for r in rows(store, "SELECT * FROM requests")] == [
        ("access", "ann@example.net", "awaiting-verification")]
    assert store.history("ann@example.net", NOW).open_requests == {"access"}


def test_the_same_bytes_twice_are_processed_once(store, pipeline, mail):
    raw = mail("Please delete my personal data.", subject="Delete my data")
    first = process(raw, "file", store, pipeline, NOW)
    before = counts(store)

    second = process(raw, "file", store, pipeline, NOW + timedelta(minutes=1))

    assert first.duplicate is False
    assert second.duplicate is True
    assert second.key == first.key
    assert second.request_ids == ()
    assert counts(store) == before
    assert before == {"ledger": 1, "suppressions": 1, "requests": 1, "audit": 3}


def test_the_same_message_by_smtp_and_by_imap_is_processed_once(store, pipeline, mail):
    raw = mail("Please delete my personal data.", subject="Delete my data").replace(b"\n", b"\r\n")
    by_smtp = process(raw, "smtp", store, pipeline, NOW, envelope_sender="ann@example.net",
                      envelope_recipients=("privacy@example.com",))
    before = counts(store)

    by_imap = process(TRACE + raw, "imap", store, pipeline, NOW + timedelta(seconds=30))

    assert by_smtp.duplicate is False
    assert by_imap.duplicate is True
    assert by_imap.key == by_smtp.key
    assert by_imap.message.sha256 != by_smtp.message.sha256
    assert counts(store) == before
    assert store.ledger(by_smtp.key)["source"] == "smtp"


def test_two_opt_outs_from_one_sender_make_one_suppression(store, pipeline, mail):
    process(mail("I want to opt out.", subject="Opt-out", message_id="<a@example.net>"), "file", store, pipeline, NOW)
    second = process(mail("Opt me out now, please stop emailing me.", subject="Stop", message_id="<b@example.net>"),
                     "file", store, pipeline, NOW + timedelta(days=1))

    assert second.duplicate is False
    assert len(store.suppressions()) == 1
    assert rows(store, "SELECT count(*) AS n FROM ledger") == [{"n": 2}]


def bounce_quoting_an_opt_out() -> bytes:
    return (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n"
        b"To: ann@example.net\n"
        b"Subject: Undelivered Mail Returned to Sender\n"
        b"Message-ID: <bounce.1@mx.example.org>\n"
        b"Date: Sun, 29 Nov 2026 12:00:00 +0000\n"
        b"Auto-Submitted: auto-replied\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\n'
        b"\n"
        b"--B1\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"This is the mail system at host mx.example.org.\n"
        b"I'm sorry to have to inform you that your message could not be delivered.\n"
        b"\n"
        b"--B1\n"
        b"Content-Type: message/delivery-status\n"
        b"\n"
        b"Reporting-MTA: dns; mx.example.org\n"
        b"\n"
        b"Final-Recipient: rfc822; privacy@example.com\n"
        b"Action: failed\n"
        b"Status: 5.2.2\n"
        b"\n"
        b"--B1\n"
        b"Content-Type: text/rfc822-headers\n"
        b"\n"
        b"From: Ann Example <ann@example.net>\n"
        b"To: privacy@example.com\n"
        b"Subject: Opt-out\n"
        b"Message-ID: <m1@example.net>\n"
        b"\n"
        b"--B1--\n"
    )


def test_a_bounce_that_quotes_an_opt_out_suppresses_nothing(store, pipeline):
    outcome = process(bounce_quoting_an_opt_out(), "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.OTHER
    assert outcome.classification.reason == "bounce"
    assert store.suppressions() == []
    assert store.ledger(outcome.key)["kind"] == "other"


def test_a_plain_text_bounce_that_quotes_an_opt_out_suppresses_nothing(store, pipeline):
    raw = (b"From: MAILER-DAEMON@mx.example.org\n"
           b"To: ann@example.net\n"
           b"Return-Path: <>\n"
           b"Subject: Delivery Status Notification (Failure)\n"
           b"Message-ID: <bounce.2@mx.example.org>\n"
           b"\n"
           b"Delivery to the following recipient failed permanently:\n"
           b"\n"
           b"     privacy@example.com\n"
           b"\n"
           b"----- Original message -----\n"
           b"\n"
           b"From: Ann Example <ann@example.net>\n"
           b"Subject: Opt-out\n"
           b"\n"
           b"Please stop sending me emails. I want to opt out.\n")

    outcome = process(raw, "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.OTHER
    assert store.suppressions() == []


def arf_complaint() -> bytes:
    return (
        b"From: Feedback Loop <fbl@isp.example.org>\n"
        b"To: privacy@example.com\n"
        b"Subject: FW: Our November newsletter\n"
        b"Message-ID: <arf.7@isp.example.org>\n"
        b"Date: Sun, 29 Nov 2026 12:00:00 +0000\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF7"\n'
        b"\n"
        b"--ARF7\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"This is an email abuse report for an email message received from IP 192.0.2.9.\n"
        b"\n"
        b"--ARF7\n"
        b"Content-Type: message/feedback-report\n"
        b"\n"
        b"Feedback-Type: abuse\n"
        b"User-Agent: ISP-FBL/2.0\n"
        b"Version: 1\n"
        b"Original-Mail-From: <bounces@news.example.com>\n"
        b"Original-Rcpt-To: <Complainer@ISP.Example.org>\n"
        b"Arrival-Date: Sun, 29 Nov 2026 11:00:00 +0000\n"
        b"Source-IP: 192.0.2.9\n"
        b"\n"
        b"--ARF7\n"
        b"Content-Type: message/rfc822\n"
        b"\n"
        b"From: Example News <news@example.com>\n"
        b"To: complainer@isp.example.org\n"
        b"Subject: Our November newsletter\n"
        b"Message-ID: <news.99@example.com>\n"
        b"\n"
        b"Big sale! To unsubscribe click here.\n"
        b"\n"
        b"--ARF7--\n"
    )


def test_an_arf_complaint_suppresses_the_complaining_recipient(store, pipeline):
    outcome = process(arf_complaint(), "file", store, pipeline, NOW)

    assert outcome.classification.kind is Kind.OTHER
    assert outcome.classification.reason == "complaint"
    assert [(s["address"], s["scope"], s["reason"]) for s in store.suppressions()] == [
        ("complainer@isp.example.org", "all", "complaint")]
    assert store.suppressed("fbl@isp.example.org") == []
    assert store.suppressed("news@example.com") == []


def test_an_arf_complaint_twice_is_processed_once(store, pipeline):
    process(arf_complaint(), "file", store, pipeline, NOW)

    again = process(arf_complaint(), "imap", store, pipeline, NOW)

    assert again.duplicate is True
    assert len(store.suppressions()) == 1


def test_processing_keeps_the_audit_chain_intact(store, pipeline, mail):
    process(opt_out_mail(mail), "file", store, pipeline, NOW)
    process(arf_complaint(), "file", store, pipeline, NOW)
    process(bounce_quoting_an_opt_out(), "file", store, pipeline, NOW)

    assert store.verify_audit() is None
    assert counts(store)["ledger"] == 3


def test_unparseable_bytes_are_recorded_as_other_and_not_dropped(store, pipeline):
    outcome = process(b"\x00\xff\xfe garbage \x80\x81" * 50, "file", store, pipeline, NOW)

    assert outcome.duplicate is False
    assert outcome.classification.kind is Kind.OTHER
    assert store.seen(outcome.key)
    assert store.ledger(outcome.key)["malformed"] == 1
    assert store.suppressions() == []


def test_a_message_that_breaks_processing_is_kept_for_review_not_fatal(tmp_path, lexicon):
    import pytest as _pytest

    from optout.policy import Rules
    from optout.process import Intake, Pipeline

    # Our own seam: rules that make `decide()` fail for any opt-out (an own address that is not a string).
    broken = Pipeline(lexicon, rules=Rules(own_addresses=(None,)))
    with Store(tmp_path / "optout.db") as store:
        intake = Intake(store, broken, clock=lambda: NOW)
        raw = make_mail("Please unsubscribe me.", message_id="<broken@example.net>")
        with _pytest.raises(Exception):
            intake.submit(raw, "smtp")  # SMTP: raise, so the client is told 451 and nothing is lost
        outcome = intake.submit(raw, "imap", keep_failures=True)  # a mailbox: record it, carry on
        assert (outcome.classification.kind.value, outcome.classification.reason) == ("other", "error")
        assert outcome.classification.rule.startswith("error.")
        row = store.ledger(outcome.key)
        assert row["reason"] == "error" and row["action"] == "nothing"
        # Once the cause is gone, the same mail is processed normally (the failure's key is the bytes alone).
        fixed = Intake(store, Pipeline(lexicon), clock=lambda: NOW).submit(raw, "imap", keep_failures=True)
        assert not fixed.duplicate and fixed.classification.kind.value == "opt-out"


def test_a_confirmation_is_filed_as_confirmed_also_when_it_comes_again(store, lexicon):
    import re

    from optout.replies import template_environment

    pipeline = Pipeline(lexicon, templates=template_environment(), reply_from="privacy@example.com")
    request = process(make_mail("Please send me a copy of my personal data.", message_id="<acc@example.net>"),
                      "imap", store, pipeline, NOW)
    token = re.search(rb"confirm-([a-z2-7]{16})", request.reply.raw).group(1).decode()
    confirmation = make_mail("Yes, that was me.", subject="Re: confirm", to=f"privacy+confirm-{token}@example.com",
                             message_id="<conf@example.net>")

    first = process(confirmation, "imap", store, pipeline, NOW)
    again = process(confirmation, "imap", store, pipeline, NOW)  # a crash between the commit and the move

    assert first.decision.action == "verify" and first.filed_as(("unclear", "question")) == "confirmed"
    assert again.duplicate and again.filed_as(("unclear", "question")) == "confirmed"
