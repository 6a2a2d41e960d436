import email
import email.policy
from datetime import timedelta

import jinja2
import pytest

from optout.classify import classify
from optout.model import History, Reply
from optout.parse import parse_message
from optout.policy import Rules, decide
from optout.replies import header_safe, message_id_for, render_reply, template_environment

from conftest import NOW, make_mail

KINDS = ("opt-out", "access", "deletion", "other")
LANGUAGES = ("en", "de", "fr", "es")


def rendered(lexicon, raw, env=None, rules=Rules(reply_to_other=True)):
    message = parse_message(raw)
    decision = decide(message, classify(message, lexicon), History(), NOW, rules)
    assert decision.reply is not None, decision.no_reply_reason
    out = render_reply(decision.reply, message, env or template_environment(), "privacy@example.com", NOW, "Example Ltd")
    return out, email.message_from_bytes(out.raw, policy=email.policy.default)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_kind_has_a_template_in_every_required_language(kind, language):
    env = template_environment()
    template = env.get_template(f"{kind}.{language}.txt")
    assert "subject" in template.blocks and "body" in template.blocks


def test_a_reply_is_threaded_auto_submitted_and_from_the_privacy_address(lexicon):
    raw = make_mail("Please unsubscribe me from the newsletter.", "Weekly tips", headers={"References": "<r0@example.net>"})
    out, mail = rendered(lexicon, raw)
    assert mail["From"] == "Example Ltd <privacy@example.com>"
    assert mail["To"] == "Ann Example <ann@example.net>"
    assert mail["Subject"] == "Re: Weekly tips"
    assert mail["In-Reply-To"] == "<m1@example.net>"
    assert mail["References"].split() == ["<r0@example.net>", "<m1@example.net>"]
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail["Message-ID"] == out.message_id
    assert out.message_id.endswith("@example.com>")
    assert "newsletters" in mail.get_body(("plain",)).get_content()


def test_the_message_id_is_stable_for_the_same_message(lexicon):
    raw = make_mail("Unsubscribe me please")
    first, _ = rendered(lexicon, raw)
    second, _ = rendered(lexicon, raw)
    assert first.message_id == second.message_id
    assert first.message_id == message_id_for(parse_message(raw).key, "opt-out", "example.com")


def test_a_reply_never_copies_the_original(lexicon):
    marker = "Zebra-Marmalade-4417"
    out, mail = rendered(lexicon, make_mail(f"Please delete my account and all my data. {marker}"))
    assert marker.encode() not in out.raw
    assert all(part.get_content_type().startswith(("text/plain", "text/html", "multipart/")) for part in mail.walk())


def test_header_injection_is_impossible(lexicon):
    raw = (b"From: =?utf-8?q?Ann=0D=0ABcc:_victim@example.org?= <ann@example.net>\r\n"
           b"To: privacy@example.com\r\nMessage-ID: <inj@example.net>\r\n"
           b"Subject: =?utf-8?q?hello=0D=0ABcc:_victim@example.org=0D=0AX-Evil:_1?=\r\n\r\n"
           b"Please unsubscribe me.\r\n")
    out, mail = rendered(lexicon, raw)
    assert mail["Bcc"] is None and mail["X-Evil"] is None
    assert b"\r\nBcc:" not in out.raw and b"\nX-Evil" not in out.raw
    assert "victim@example.org" in mail["Subject"]  # kept as text, on one line
    assert header_safe("a\r\nb\x00c\u2028d") == "a b c d"


def test_the_reply_speaks_the_language_of_the_request(lexicon):
    _, german = rendered(lexicon, make_mail("Bitte löschen Sie mein Konto und alle meine Daten."))
    assert german["Content-Language"] == "de"
    assert "Vorgangsnummer" in german.get_body(("plain",)).get_content()
    _, japanese = rendered(lexicon, make_mail("配信停止をお願いします。"))
    assert japanese["Content-Language"] == "en"  # no Japanese template: English, not nothing


def test_access_and_deletion_acknowledgements_give_the_reference_and_due_date(lexicon):
    raw = make_mail("Please delete my account and all my personal data.")
    message = parse_message(raw)
    decision = decide(message, classify(message, lexicon), History(), NOW, Rules())
    out = render_reply(decision.reply, message, template_environment(), "privacy@example.com", NOW)
    body = email.message_from_bytes(out.raw, policy=email.policy.default).get_body(("plain",)).get_content()
    assert decision.requests[0].reference in body
    assert (NOW + timedelta(days=30)).date().isoformat() in body
    assert "stays on our suppression list" in body


def test_html_is_autoescaped(lexicon):
    raw = make_mail("Please unsubscribe me", sender='"<script>alert(1)</script>" <ann@example.net>')
    _, mail = rendered(lexicon, raw)
    html = mail.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_templates_can_be_overridden_per_file(tmp_path, lexicon):
    (tmp_path / "opt-out.en.txt").write_text("{% block subject %}Bye{% endblock %}{% block body %}Gone, {{ address }}.{% endblock %}")
    _, mail = rendered(lexicon, make_mail("unsubscribe me please", ""), env=template_environment(tmp_path))
    assert mail.get_body(("plain",)).get_content().strip() == "Gone, ann@example.net."
    assert mail["Subject"] == "Bye"
    with pytest.raises(jinja2.TemplateNotFound):
        render_reply(Reply("nonsense", "a@example.net", "a@example.net", "en"), parse_message(make_mail("x")),
                     template_environment(tmp_path), "privacy@example.com", NOW)
