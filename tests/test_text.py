import pytest

from optout.text import (COMMA, LINK, NEWLINE, STOP, fold, guess_language, html_to_text, strip_quoted,
                         strip_reply_prefix, strip_signature, tokenise, words)

REPLY = "Please remove me from your list."
QUOTED = "> Our November newsletter\n> Big sale on everything, unsubscribe below"


def test_fold_lower_cases():
    assert fold("PLEASE Unsubscribe Me") == "please unsubscribe me"


def test_fold_removes_accents():
    assert fold("Ça été très Löschen Ñandú") == "ca ete tres loschen nandu"


@pytest.mark.parametrize("apostrophe", ["\u2019", "\u2018", "\u02bc", "`", "\u00b4"])
def test_fold_makes_typographic_apostrophes_plain(apostrophe):
    assert fold(f"Don{apostrophe}t") == "don't"


def test_fold_case_folds_sharp_s_and_full_width_letters():
    assert fold("STRASSE Straße ＡＢＣ") == "strasse strasse abc"


def test_fold_keeps_the_dakuten_of_kana():
    assert fold("ガイド") == "ガイド"


def test_tokenise_gives_words_and_a_sentence_end():
    assert tokenise("Hello World. Next one") == ["hello", "world", STOP, "next", "one"]


@pytest.mark.parametrize("end", ["!", "?", ";", "."])
def test_tokenise_ends_a_sentence_at_each_sentence_mark(end):
    assert tokenise(f"stop it{end} then go") == ["stop", "it", STOP, "then", "go"]


def test_tokenise_ends_a_sentence_at_a_blank_line():
    assert tokenise("first line\n\nsecond") == ["first", "line", STOP, "second"]


def test_tokenise_gives_a_comma_sentinel():
    assert tokenise("Please, stop") == ["please", COMMA, "stop"]


def test_tokenise_gives_a_newline_sentinel_for_a_line_break():
    assert tokenise("first line\nsecond line") == ["first", "line", NEWLINE, "second", "line"]


@pytest.mark.parametrize("text", ["Art. 15 DSGVO", "gemäß Art. 15 DSGVO", "see Art. 17 GDPR"])
def test_tokenise_does_not_end_a_sentence_at_an_article_number(text):
    assert STOP not in tokenise(text)
    assert "15" in tokenise(text) or "17" in tokenise(text)


def test_tokenise_reads_a_full_stop_after_a_number_as_an_ordinal():
    # German and Slavic ordinals: "článku 15. GDPR", "am 3. November" are one sentence each.
    assert tokenise("clanku 15. GDPR") == ["clanku", "15", "gdpr"]
    assert tokenise("am 3. November. Danke") == ["am", "3", "november", STOP, "danke"]


def test_tokenise_does_not_repeat_sentence_ends():
    assert tokenise("Stop!!! Now... Really?!") == ["stop", STOP, "now", STOP, "really", STOP]


def test_tokenise_makes_each_japanese_character_one_token():
    assert tokenise("配信停止してください") == ["配", "信", "停", "止", "し", "て", "く", "だ", "さ", "い"]


def test_tokenise_makes_each_chinese_character_one_token_and_ends_at_the_ideographic_full_stop():
    assert tokenise("请取消订阅。谢谢") == ["请", "取", "消", "订", "阅", STOP, "谢", "谢"]


def test_tokenise_splits_cjk_from_latin_words():
    assert tokenise("Gmailで配信") == ["gmail", "で", "配", "信"]


@pytest.mark.parametrize("link", [
    "https://example.com/unsubscribe?id=42&opt=out",
    "http://example.com/stop",
    "www.example.com/remove-me",
    "<https://example.com/opt-out>",
])
def test_tokenise_takes_no_words_from_a_link(link):
    assert [token for token in tokenise(f"Visit {link} today") if token != LINK] == ["visit", "today"]


@pytest.mark.parametrize("address", [
    "unsubscribe@example.com",
    "<ann.example@example.net>",
    "mailto:unsubscribe@example.com",
    "mailto:unsubscribe@example.com?subject=unsubscribe",
])
def test_tokenise_drops_addresses(address):
    assert tokenise(f"Write to {address} today") == ["write", "to", "today"]


def test_tokenise_folds_its_input():
    assert tokenise("Löschen SIE") == ["loschen", "sie"]


def test_tokenise_splits_words_at_apostrophes():
    assert tokenise("Don’t send") == ["don", "t", "send"]


def test_words_drops_the_sentinels():
    assert words(tokenise("One, two.\nThree")) == ["one", "two", "three"]


@pytest.mark.parametrize("attribution", [
    "On Mon, 3 Nov 2026 at 10:02, Example News <news@example.com> wrote:",
    "On Mon, 3 Nov 2026 at 10:02, Example News <news@example.com>\nwrote:",
    "On 03/11/2026 10:02, Example News wrote:",
    "Example News <news@example.com> wrote:",
], ids=["gmail", "gmail-wrapped", "outlook-mac", "short"])
def test_strip_quoted_cuts_at_an_english_attribution(lexicon, attribution):
    text = f"{REPLY}\n\n{attribution}\n{QUOTED}\nunquoted tail of the original"

    assert strip_quoted(text, lexicon.markers).strip() == REPLY


@pytest.mark.parametrize("request_text, attribution", [
    ("Bitte tragen Sie mich aus.", "Am 03.11.2026 um 10:02 schrieb Example News <news@example.com>:"),
    ("Bitte tragen Sie mich aus.", "Am Mo., 3. Nov. 2026 um 10:02 Uhr schrieb Example News <news@example.com>:"),
    ("Merci de me désinscrire.", "Le lun. 3 nov. 2026 à 10:02, Example News <news@example.com> a écrit :"),
    ("Merci de me désinscrire.", "Le 03/11/2026 à 10:02, Example News a écrit :"),
    ("Por favor, darme de baja.", "El lun, 3 nov 2026 a las 10:02, Example News (<news@example.com>) escribió:"),
    ("Por favor, darme de baja.", "El 03/11/2026 a las 10:02, Example News escribió:"),
], ids=["de-thunderbird", "de-gmail", "fr-gmail", "fr-thunderbird", "es-gmail", "es-thunderbird"])
def test_strip_quoted_cuts_at_an_attribution_in_the_writers_language(lexicon, request_text, attribution):
    text = f"{request_text}\n\n{attribution}\n{QUOTED}\nunquoted tail of the original"

    assert strip_quoted(text, lexicon.markers).strip() == request_text


@pytest.mark.parametrize("banner", [
    "-----Original Message-----",
    "----- Original Message -----",
    "________________________________",
    "---------- Forwarded message ---------",
])
def test_strip_quoted_cuts_at_a_banner(lexicon, banner):
    text = f"{REPLY}\n\n{banner}\nnewsletter text that is not quoted with >"

    assert strip_quoted(text, lexicon.markers).strip() == REPLY


def test_strip_quoted_cuts_at_an_outlook_header_block(lexicon):
    text = (f"{REPLY}\n\nFrom: Example News <news@example.com>\nSent: Monday, November 3, 2026 10:02 AM\n"
            "To: Ann Example\nSubject: November news\n\nnewsletter text")

    assert strip_quoted(text, lexicon.markers).strip() == REPLY


def test_strip_quoted_cuts_at_a_bold_outlook_header_block(lexicon):
    text = (f"{REPLY}\n\n*From:* Example News <news@example.com>\n*Sent:* Monday, November 3, 2026 10:02 AM\n"
            "*Subject:* November news\n\nnewsletter text")

    assert strip_quoted(text, lexicon.markers).strip() == REPLY


def test_strip_quoted_cuts_at_a_german_outlook_header_block(lexicon):
    text = ("Bitte tragen Sie mich aus.\n\nVon: Example News <news@example.com>\n"
            "Gesendet: Montag, 3. November 2026 10:02\nAn: Ann Example\nBetreff: Neuigkeiten\n\nnewsletter text")

    assert strip_quoted(text, lexicon.markers).strip() == "Bitte tragen Sie mich aus."


def test_strip_quoted_keeps_a_from_line_that_starts_no_header_block(lexicon):
    text = "From: my old address I got your mail.\nPlease remove me.\n\nThanks"

    assert strip_quoted(text, lexicon.markers) == text


def test_strip_quoted_drops_quoted_lines_and_keeps_interleaved_replies(lexicon):
    text = "> Do you want to stay subscribed?\nNo, remove me.\n> Which address?\nThis one.\n>> older quote"

    assert strip_quoted(text, lexicon.markers) == "No, remove me.\nThis one."


def test_strip_quoted_keeps_text_without_quotes(lexicon):
    text = "Please remove me.\nThanks,\nAnn"

    assert strip_quoted(text, lexicon.markers) == text


def test_strip_signature_cuts_at_the_delimiter():
    assert strip_signature("Please remove me.\n-- \nAnn Example\nCEO, Example Ltd") == "Please remove me."


def test_strip_signature_keeps_text_without_a_delimiter():
    text = "Please remove me.\nAnn -- CEO"

    assert strip_signature(text) == text


def test_strip_signature_keeps_a_delimiter_on_the_first_line():
    text = "-- \nPlease remove me."

    assert strip_signature(text) == text


@pytest.mark.parametrize("subject, expected", [
    ("Re: Newsletter", "Newsletter"),
    ("RE: Newsletter", "Newsletter"),
    ("AW: Newsletter", "Newsletter"),
    ("Fwd: Newsletter", "Newsletter"),
    ("FW: Newsletter", "Newsletter"),
    ("SV: Nyhetsbrev", "Nyhetsbrev"),
    ("回复：订阅", "订阅"),
    ("回复: 订阅", "订阅"),
    ("Re: Fwd: Re: Newsletter", "Newsletter"),
    ("Re[2]: Newsletter", "Newsletter"),
])
def test_strip_reply_prefix_removes_prefixes(subject, expected):
    assert strip_reply_prefix(subject) == (expected, True)


@pytest.mark.parametrize("subject", ["Newsletter", "Reply requested", "Research", "Fwding rules", ""])
def test_strip_reply_prefix_keeps_subjects_without_a_prefix(subject):
    assert strip_reply_prefix(subject) == (subject, False)


def test_strip_reply_prefix_handles_none():
    assert strip_reply_prefix(None) == ("", False)


def test_html_to_text_puts_table_rows_on_their_own_lines():
    text = html_to_text("<table><tr><td>Name</td><td>Ann</td></tr><tr><td>Email</td><td>ann at x</td></tr></table>")
    lines = [line.split() for line in text.splitlines() if line.strip()]

    assert lines == [["Name", "Ann"], ["Email", "ann", "at", "x"]]


def test_html_to_text_breaks_lines_at_br_and_paragraphs():
    text = html_to_text("<p>first<br>second</p><p>third</p>")

    assert [line.strip() for line in text.splitlines() if line.strip()] == ["first", "second", "third"]


def test_html_to_text_leaves_out_script_and_style():
    text = html_to_text("<html><head><style>.x { color: red }</style></head><body><p>Remove me</p>"
                        "<script>var tracking = 'pixel';</script></body></html>")

    assert "Remove me" in text
    assert "color" not in text
    assert "tracking" not in text


def test_html_to_text_decodes_entities_and_drops_tags():
    text = html_to_text("<p>Caf&eacute; &amp; <b>bar</b> &lt;3</p>")

    assert text.strip() == "Café & bar <3"


def test_html_to_text_of_empty_html_is_empty():
    assert html_to_text("  ") == ""


@pytest.fixture(scope="module")
def scripts(lexicon):
    return {**lexicon.scripts, "ja": "cjk", "zh": "cjk", "el": "greek"}


def guess(text, lexicon, scripts):
    return guess_language(words(tokenise(text)), lexicon.stopwords, scripts)


def test_guess_language_english(lexicon, scripts):
    assert guess("Please delete all of my data, thank you.", lexicon, scripts) == "en"


def test_guess_language_german(lexicon, scripts):
    assert guess("Bitte löschen Sie meine Daten und schicken Sie mir keine Werbung mehr.", lexicon, scripts) == "de"


def test_guess_language_japanese_by_kana(lexicon, scripts):
    assert guess("配信を停止してください。", lexicon, scripts) == "ja"


def test_guess_language_japanese_with_a_single_kana_among_kanji(lexicon, scripts):
    assert guess("個人情報の削除", lexicon, scripts) == "ja"


def test_guess_language_chinese_has_no_kana(lexicon, scripts):
    assert guess("请删除我的个人信息，谢谢。", lexicon, scripts) == "zh"


def test_guess_language_greek(lexicon, scripts):
    assert guess("Παρακαλώ διαγράψτε τα δεδομένα μου.", lexicon, scripts) == "el"


def test_guess_language_without_any_known_word_is_none(lexicon, scripts):
    assert guess("xyzzy plugh 12345", lexicon, scripts) is None


def test_guess_language_needs_the_script_to_be_loaded(lexicon):
    assert guess_language(words(tokenise("配信を停止してください")), lexicon.stopwords, {"en": "latin"}) is None
