from datetime import timedelta

from optout.classify import classify
from optout.model import History, Kind, Scope
from optout.parse import parse_message
from optout.policy import Rules, complainant, decide, may_auto_reply

from conftest import NOW, make_mail


def run(lexicon, raw, history=History(), rules=Rules(reply_to_other=True)):
    message = parse_message(raw)
    return decide(message, classify(message, lexicon), history, NOW, rules)


def test_opt_out_suppresses_the_sender_in_its_scope(lexicon):
    decision = run(lexicon, make_mail("Please remove me from your mailing list."))
    assert [(s.address, s.scope) for s in decision.suppressions] == [("ann@example.net", Scope.NEWSLETTERS)]
    assert decision.suppressions[0].display == "Ann Example <ann@example.net>"
    assert decision.requests == ()
    assert decision.may_reply


def test_opt_out_already_suppressed_has_no_effect(lexicon):
    decision = run(lexicon, make_mail("Unsubscribe me"), History(frozenset({"all"})))
    assert decision.action == "nothing"
    assert decision.suppressions == ()


def test_deletion_suppresses_all_and_opens_a_request_due_in_30_days(lexicon):
    decision = run(lexicon, make_mail("Please delete my account and all my personal data."))
    assert [s.scope for s in decision.suppressions] == [Scope.ALL]
    (request,) = decision.requests
    assert request.kind is Kind.DELETION
    assert request.due_at == NOW + timedelta(days=30)
    assert decision.action == "suppress+open-request"


def test_child_request_gets_the_child_deadline(lexicon):
    raw = make_mail("I am the mother of Lily (9). Please delete her account and all her data.")
    decision = run(lexicon, raw, rules=Rules(child_request_days=14))
    assert decision.requests[0].due_at == NOW + timedelta(days=14)
    assert decision.requests[0].flags == ("child",)


def test_access_opens_one_request_only(lexicon):
    raw = make_mail("What personal data do you hold about me?")
    assert len(run(lexicon, raw).requests) == 1
    again = run(lexicon, raw, History(open_requests=frozenset({"access"})))
    assert again.requests == ()
    assert "already open" in again.notes[0]


def test_other_has_no_effect(lexicon):
    decision = run(lexicon, make_mail("Do you ship to Norway?"))
    assert decision.action == "nothing"


def test_complaint_suppresses_the_complaining_recipient(lexicon):
    raw = (b"From: Feedback Loop <fbl@isp.example>\nTo: abuse@example.com\nSubject: FW: Newsletter\n"
           b"Message-ID: <fbl1@isp.example>\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/report; report-type=feedback-report; boundary=b1\n\n"
           b"--b1\nContent-Type: text/plain\n\nThis is an abuse report.\n"
           b"--b1\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: FBL/1.0\n"
           b"Version: 1\nOriginal-Rcpt-To: <Bob@Customer.example>\n"
           b"--b1\nContent-Type: message/rfc822\n\nFrom: news@example.com\nTo: bob@customer.example\n"
           b"Subject: News\n\nHello\n--b1--\n")
    message = parse_message(raw)
    assert complainant(message) == "bob@customer.example"
    decision = run(lexicon, raw)
    assert [(s.address, s.scope, s.reason) for s in decision.suppressions] == [("bob@customer.example", Scope.ALL, "complaint")]
    assert not decision.may_reply


def test_replies_to_other_are_off_by_default(lexicon):
    decision = run(lexicon, make_mail("Do you ship to Norway?"), rules=Rules())
    assert not decision.may_reply
    assert decision.no_reply_reason == "replies to other are off"


def test_daily_reply_cap(lexicon):
    decision = run(lexicon, make_mail("Unsubscribe me"), History(replies_today=5), Rules(daily_reply_cap=5))
    assert decision.suppressions
    assert not decision.may_reply


def never(lexicon, raw, own=()):
    message = parse_message(raw)
    return may_auto_reply(message, classify(message, lexicon), own)


def test_never_reply_rules(lexicon):
    body = "Please unsubscribe me."
    assert never(lexicon, make_mail(body)) == (True, None)
    assert not never(lexicon, make_mail(body, headers={"Precedence": "bulk"}))[0]
    assert not never(lexicon, make_mail(body, headers={"List-Unsubscribe": "<mailto:x@example.org>"}))[0]
    assert not never(lexicon, make_mail(body, headers={"Return-Path": "<>"}))[0]
    assert not never(lexicon, make_mail(body, headers={"X-Auto-Response-Suppress": "All"}))[0]
    assert not never(lexicon, make_mail(body, sender="noreply@shop.example"))[0]
    assert not never(lexicon, make_mail(body, to="undisclosed-recipients:;"))[0]
    assert never(lexicon, make_mail(body, sender="privacy@example.com"), ("privacy@example.com",)) == (False, "our own address")


def test_deadlines_follow_the_jurisdiction():
    from datetime import datetime, timezone

    from optout.policy import add_business_days, add_months, request_deadlines

    friday = datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)
    assert add_business_days(friday, 10) == datetime(2026, 12, 11, 9, 0, tzinfo=timezone.utc)
    assert add_months(datetime(2027, 1, 31, tzinfo=timezone.utc), 1) == datetime(2027, 2, 28, tzinfo=timezone.utc)
    assert add_months(datetime(2028, 1, 31, tzinfo=timezone.utc), 1).day == 29  # a leap year
    assert add_months(datetime(2026, 12, 15, tzinfo=timezone.utc), 1) == datetime(2027, 1, 15, tzinfo=timezone.utc)

    assert request_deadlines(friday, Rules()) == (None, datetime(2026, 12, 27, 9, 0, tzinfo=timezone.utc))
    ack, due = request_deadlines(friday, Rules(jurisdiction="ccpa"))
    assert (ack, due) == (datetime(2026, 12, 11, 9, 0, tzinfo=timezone.utc), friday + timedelta(days=45))
    assert request_deadlines(friday, Rules(request_days=20))[1] == friday + timedelta(days=20)
    assert request_deadlines(friday, Rules(jurisdiction="ccpa"), child=True)[1] == friday + timedelta(days=14)


def test_a_new_request_carries_the_confirmation_token_and_a_confirmation_verifies_only(lexicon):
    from optout.model import Confirmation

    message = parse_message(make_mail("Please delete all my personal data."))
    classification = classify(message, lexicon)
    decision = decide(message, classification, History(), NOW, Rules(), new_token="abcdefghijklmnop")
    (request,) = decision.requests
    assert request.token == "abcdefghijklmnop" and request.token_expires_at == NOW + timedelta(days=7)
    assert decision.reply.confirm_token == "abcdefghijklmnop"
    assert "abcdefghijklmnop" not in repr(request)  # a token never reaches a log line through repr()

    confirmed = decide(message, classification, History(), NOW, Rules(),
                       confirmation=Confirmation("abcdefghijklmnop", "valid", 7, "D-X", "deletion"))
    assert (confirmed.action, confirmed.verify, confirmed.requests, confirmed.suppressions) == ("verify", (7,), (), ())
    refused = decide(message, classification, History(), NOW, Rules(),
                     confirmation=Confirmation("abcdefghijklmnop", "other-address", 7, "D-X", "deletion"))
    assert refused.verify == () and refused.requests  # judged on its words: the sender's own request


def test_confirmation_tokens_are_found_in_the_address_or_the_subject():
    from optout.policy import confirm_tokens

    plus = parse_message(make_mail("ok", to="privacy+confirm-abcdefghijklmnop@example.com"))
    assert confirm_tokens(plus, ("privacy@example.com",)) == ["abcdefghijklmnop"]
    other = parse_message(make_mail("ok", to="sales+confirm-abcdefghijklmnop@example.com"))
    assert confirm_tokens(other, ("privacy@example.com",)) == []
    subject = parse_message(make_mail("ok", subject="Re: Your request [A-X confirm-QRSTUVWXYZ234567]"))
    assert confirm_tokens(subject, ("privacy@example.com",)) == ["qrstuvwxyz234567"]
    longer = parse_message(make_mail("ok", subject="confirm-abcdefghijklmnopq"))
    assert confirm_tokens(longer, ("privacy@example.com",)) == []
