import csv

import pytest

from optout.classify import classify, is_unsubscribe_address, read_person
from optout.model import Kind
from optout.parse import parse_message

from conftest import FIXTURES, make_mail


def labels():
    with open(FIXTURES / "labels.tsv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def judge(lexicon, body="", subject="Hello", **kwargs):
    return classify(parse_message(make_mail(body, subject, **kwargs)), lexicon)


@pytest.mark.parametrize("row", labels(), ids=lambda row: row["path"])
def test_fixture(lexicon, row):
    raw = (FIXTURES / row["path"]).read_bytes()
    result = classify(parse_message(raw), lexicon)
    assert result.language is None or isinstance(result.language, str)
    assert all(isinstance(scope, str) for scope in result.scopes)
    assert all(isinstance(words, str) for words in result.evidence)
    assert result.kind.value == row["kind"], (result.reason, result.rule, result.evidence)
    if row["reason"]:
        assert result.reason == row["reason"], (result.rule, result.evidence)
    if row["scope"]:
        assert result.scope == row["scope"], (result.rule, result.evidence)
    assert ("child" in result.flags) == ("child" in row["flags"]), result.evidence


def test_every_fixture_file_has_a_label():
    listed = {row["path"] for row in labels()}
    on_disk = {str(path.relative_to(FIXTURES)) for path in FIXTURES.rglob("*.eml")}
    assert listed == on_disk


def test_fixture_folders_name_the_kind():
    for row in labels():
        folder = row["path"].split("/")[0]
        if folder != "never-reply":
            assert folder == row["kind"], row["path"]


def test_fixtures_cover_every_rule_family(lexicon):
    rules = {classify(parse_message((FIXTURES / row["path"]).read_bytes()), lexicon).rule for row in labels()}
    for family in ("machine.dsn", "machine.arf", "machine.auto-submitted", "machine.auto-reply-text",
                   "button.apple", "button.gmail", "words.deletion", "words.access", "words.rectification",
                   "words.opt-out", "addressed.unsubscribe", "words.negated", "words.subscribe"):
        assert family in rules, family


def test_fixtures_cover_the_languages():
    languages = {row["language"] for row in labels() if row["kind"] != "other"}
    assert {"en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "da", "ja", "zh"} <= languages


def test_opt_out_scopes(lexicon):
    assert judge(lexicon, "", "Opt-out").scope == "all"
    assert judge(lexicon, "Please remove me from your mailing list.").scope == "newsletters"
    assert judge(lexicon, "Do not sell or share my personal information.").scope == "partners"
    assert judge(lexicon, "Don't pass my details to your partners, thanks.").scope == "partners"


def test_remove_me_is_opt_out_but_remove_my_information_is_deletion(lexicon):
    assert judge(lexicon, "Remove me from your list").kind is Kind.OPT_OUT
    assert judge(lexicon, "Please remove my personal information from your servers.").kind is Kind.DELETION


def test_negation_turns_an_intent_away(lexicon):
    result = judge(lexicon, "Please do NOT unsubscribe me, I love the newsletter. Keep them coming!")
    assert result.kind is Kind.OTHER
    assert result.rule == "words.negated"
    asked = judge(lexicon, "I'm not asking you to delete my account. I just want to know what data you hold about me.")
    assert asked.kind is Kind.ACCESS


def test_do_not_unsubscribe_me_but_update_my_address_is_access(lexicon):
    result = judge(lexicon, "Please do NOT unsubscribe me, just update my address to 4 Elm Road, Leeds.",
                   to="unsubscribe@example.com")
    assert result.kind is Kind.ACCESS
    assert result.reason == "rectification"


def test_priority_deletion_over_access_over_opt_out(lexicon):
    both = "Unsubscribe me and delete all my personal data. Also send me a copy of my data first."
    assert judge(lexicon, both).kind is Kind.DELETION
    assert judge(lexicon, "Unsubscribe me. And send me a copy of all my personal data.").kind is Kind.ACCESS


def test_child_deletion_is_flagged(lexicon):
    result = judge(lexicon, "I am the father of Tom, who is 11. Please delete his account and all his data.")
    assert result.kind is Kind.DELETION
    assert result.flags == ("child",)
    assert "child" not in judge(lexicon, "Please delete my account and all my data.").flags


def test_quoted_newsletter_footer_is_not_the_persons_words(lexicon):
    body = ("Do you ship to Norway?\n\nOn Mon, 3 Nov 2026 at 10:02, Example News <news@example.com> wrote:\n"
            "> Our autumn sale starts today!\n> To unsubscribe from these emails click here.\n")
    result = judge(lexicon, body, "Re: Autumn sale")
    assert result.kind is Kind.OTHER
    assert result.reason == "question"


def test_unquoted_footer_line_is_dropped(lexicon):
    body = "Thanks for the great tips!\n\nIf you no longer wish to receive these emails, unsubscribe here.\n"
    assert judge(lexicon, body).kind is Kind.OTHER


def test_reply_subject_is_our_subject_not_the_persons(lexicon):
    result = judge(lexicon, "Great, thanks!", "Re: How to unsubscribe from other shops' spam",
                   headers={"In-Reply-To": "<n1@example.com>"})
    assert result.kind is Kind.OTHER


def test_bounce_quoting_an_opt_out_is_other(lexicon):
    body = ("This is the mail system at host mx.example.net.\n\nI'm sorry to have to inform you that your message "
            "could not be delivered to one or more recipients.\n\n--- original message ---\nSubject: Opt-out\n\n"
            "Please unsubscribe me and delete all my data.\n")
    result = judge(lexicon, body, "Undelivered Mail Returned to Sender",
                   sender="MAILER-DAEMON@mx.example.net", headers={"Return-Path": "<>"})
    assert result.kind is Kind.OTHER
    assert result.reason == "bounce"
    assert result.machine


def test_auto_submitted_is_other_whatever_it_says(lexicon):
    result = judge(lexicon, "Please delete my data", "Opt-out", headers={"Auto-Submitted": "auto-replied"})
    assert (result.kind, result.reason) == (Kind.OTHER, "auto-reply")
    assert judge(lexicon, "Please delete my data", headers={"Auto-Submitted": "no"}).kind is Kind.DELETION


def test_out_of_office_by_words(lexicon):
    result = judge(lexicon, "I am out of the office until 3 December with limited access to email.",
                   "Automatic reply: Opt-out")
    assert (result.kind, result.reason) == (Kind.OTHER, "auto-reply")


def test_apple_unsubscribe_button_is_an_opt_out_never_answered(lexicon):
    result = judge(lexicon, "Apple Mail sent this email to unsubscribe from the message \u201cNews\u201d.",
                   "unsubscribe", to="unsubscribe+n1@example.com",
                   headers={"Auto-Submitted": "auto-replied", "X-Apple-Unsubscribe": "true"})
    assert (result.kind, result.reason, result.rule) == (Kind.OPT_OUT, "button", "button.apple")
    assert result.machine


def test_list_mail_is_bulk(lexicon):
    result = judge(lexicon, "Unsubscribe: click here", headers={"List-Id": "<news.example.org>"})
    assert (result.kind, result.reason) == (Kind.OTHER, "bulk")


def test_mail_to_the_unsubscribe_address_is_an_opt_out(lexicon):
    result = judge(lexicon, "", "", to="unsubscribe+spring-2026@example.com")
    assert (result.kind, result.rule) == (Kind.OPT_OUT, "addressed.unsubscribe")
    assert judge(lexicon, "Please delete all my data.", to="unsubscribe@example.com").kind is Kind.DELETION


def test_unsubscribe_address_patterns():
    assert is_unsubscribe_address("unsubscribe+x1@example.com", ("unsubscribe@example.com",))
    assert not is_unsubscribe_address("unsubscribe@example.org", ("unsubscribe@example.com",))
    assert is_unsubscribe_address("unsubscribe@anything.example", ("unsubscribe@*",))
    assert not is_unsubscribe_address("privacy@example.com", ("unsubscribe@*",))


def test_empty_and_question_and_unclear(lexicon):
    assert judge(lexicon, "", "").reason == "empty"
    assert judge(lexicon, "What time do you open on Sundays?", "Opening hours").reason == "question"
    assert judge(lexicon, "Lovely weather today.", "Hi").reason == "unclear"


def test_html_only_request(lexicon):
    result = judge(lexicon, "", "Hi", html="<html><body><p>Please <b>delete</b> my account and data.</p></body></html>")
    assert result.kind is Kind.DELETION


def test_evidence_and_rule_explain_the_decision(lexicon):
    result = judge(lexicon, "Hello, please unsubscribe me from the newsletter. Regards, Ann")
    assert result.rule == "words.opt-out"
    assert any("unsubscribe" in words for words in result.evidence)
    assert 0 < result.confidence <= 1
    assert result.language == "en"


def test_languages_are_guessed(lexicon):
    assert judge(lexicon, "Bitte löschen Sie meine Daten und mein Konto.").language == "de"
    assert judge(lexicon, "配信停止をお願いします。").language == "ja"
    assert judge(lexicon, "请把我从邮件列表中删除。").language == "zh"


def test_reading_drops_signature_and_quote(lexicon):
    raw = make_mail("Unsubscribe please\n\nSent from my iPhone\n\n> old text about deleting data\n")
    reading = read_person(parse_message(raw), lexicon)
    assert "iphone" not in reading.tokens
    assert "deleting" not in reading.tokens


def test_a_plain_text_read_receipt_is_machine_mail(lexicon):
    body = "Ihre Nachricht\n\n  An: Anna Roth\n  Betreff: Ihr Auskunftsersuchen\n\nwurde am 3. Dezember 2026 gelesen.\n"
    result = judge(lexicon, body, "Gelesen: Ihr Auskunftsersuchen")
    assert (result.kind, result.reason, result.machine) == (Kind.OTHER, "receipt", True)
    # A person whose subject merely starts with a word like it is not a receipt.
    assert judge(lexicon, "Please delete my account and all my data.", "Re: delete").kind is Kind.DELETION


@pytest.mark.parametrize("body", [
    "If I unsubscribe, do I lose my loyalty points?",
    "Wenn ich mich abmelde, verliere ich dann meine Punkte?",
    "Si je me désinscris, est-ce que je perds mes points ?",
    "如果我退订，积分还在吗？",
    "退会したらポイントはどうなりますか？",
])
def test_a_question_about_unsubscribing_is_not_a_request(lexicon, body):
    result = judge(lexicon, body, "Points")
    assert (result.kind, result.reason) == (Kind.OTHER, "question")


def test_a_request_asked_as_a_question_is_still_a_request(lexicon):
    assert judge(lexicon, "Can you unsubscribe me?").kind is Kind.OPT_OUT
    assert judge(lexicon, "Could you please delete my account?").kind is Kind.DELETION
    assert judge(lexicon, "I want to unsubscribe. If I do, will I still get order emails?").kind is Kind.OPT_OUT
