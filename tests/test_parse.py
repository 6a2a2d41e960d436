import base64
import quopri
import random
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path

import flanker
import pytest

from optout.parse import parse_message

HEADERS = (
    b"Return-Path: <Bounce+Ann@Lists.Example.ORG>\r\n"
    b"From: =?iso-8859-1?q?Ren=E9e_Dupr=E9?= <Renee@Example.FR>\r\n"
    b"Reply-To: Other Person <Other@Example.FR>\r\n"
    b"To: Privacy Team <PRIVACY@Example.com>, b@x.example\r\n"
    b"Cc: =?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <Juergen@Y.Example>\r\n"
    b"Subject: =?utf-8?b?TMO2c2NoZW4gU2llIG1laW5lIERhdGVu?=\r\n"
    b"Message-ID: <abc.1@mail.example.fr>\r\n"
    b"In-Reply-To: <prev.1@example.com>\r\n"
    b"References: <first.1@example.com>\r\n <prev.1@example.com>\r\n"
    b"Date: Sun, 29 Nov 2026 13:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Bitte l\xc3\xb6schen Sie meine Daten.\r\n"
)


def text_mail(body: bytes, charset: str, encoding: str = "8bit", subtype: str = "plain") -> bytes:
    return (b"From: ann@example.net\nTo: privacy@example.com\nSubject: test\nMessage-ID: <cs@example.net>\n"
            b"MIME-Version: 1.0\nContent-Type: text/" + subtype.encode() + b"; charset=" + charset.encode()
            + b"\nContent-Transfer-Encoding: " + encoding.encode() + b"\n\n" + body)


def dsn_mail() -> bytes:
    return (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n"
        b"To: privacy@example.com\n"
        b"Subject: Undelivered Mail Returned to Sender\n"
        b"Message-ID: <dsn.1@mx.example.org>\n"
        b"Date: Sun, 29 Nov 2026 12:00:00 +0000\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="DSN-BOUNDARY"\n'
        b"\n"
        b"--DSN-BOUNDARY\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"This is the mail system. Your message could not be delivered.\n"
        b"\n"
        b"--DSN-BOUNDARY\n"
        b"Content-Type: message/delivery-status\n"
        b"\n"
        b"Reporting-MTA: dns; mx.example.org\n"
        b"\n"
        b"Final-Recipient: rfc822; gone@example.org\n"
        b"Action: failed\n"
        b"Status: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\n"
        b"\n"
        b"--DSN-BOUNDARY\n"
        b"Content-Type: message/rfc822\n"
        b"\n"
        b"From: Privacy Team <privacy@example.com>\n"
        b"To: gone@example.org\n"
        b"Subject: Opt-out\n"
        b"Message-ID: <original.1@example.com>\n"
        b"\n"
        b"Your opt-out request was received.\n"
        b"\n"
        b"--DSN-BOUNDARY--\n"
    )


def arf_mail() -> bytes:
    return (
        b"From: complaints@feedback.example.net\n"
        b"To: privacy@example.com\n"
        b"Subject: complaint about message from 192.0.2.1\n"
        b"Message-ID: <arf.1@feedback.example.net>\n"
        b"Date: Sun, 29 Nov 2026 12:00:00 +0000\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF-BOUNDARY"\n'
        b"\n"
        b"--ARF-BOUNDARY\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"This is an email abuse report for a message received from 192.0.2.1.\n"
        b"\n"
        b"--ARF-BOUNDARY\n"
        b"Content-Type: message/feedback-report\n"
        b"\n"
        b"Feedback-Type: abuse\n"
        b"User-Agent: ExampleFBL/1.0\n"
        b"Version: 1\n"
        b"Original-Mail-From: <news@example.com>\n"
        b"Original-Rcpt-To: <Complainer@Example.org>\n"
        b"Arrival-Date: Sun, 29 Nov 2026 11:00:00 +0000\n"
        b"\n"
        b"--ARF-BOUNDARY\n"
        b"Content-Type: message/rfc822\n"
        b"\n"
        b"From: Example News <news@example.com>\n"
        b"To: complainer@example.org\n"
        b"Subject: Our November newsletter\n"
        b"Message-ID: <news.42@example.com>\n"
        b"\n"
        b"Big sale!\n"
        b"\n"
        b"--ARF-BOUNDARY--\n"
    )


def test_parse_reads_sender_and_display_name_decoding_rfc2047_iso_8859_1_q():
    message = parse_message(HEADERS)

    assert message.sender == "renee@example.fr"
    assert message.sender_display.startswith("Renée Dupré")
    assert "Renee@Example.FR" in message.sender_display


def test_parse_reads_reply_to_normalised():
    assert parse_message(HEADERS).reply_to == ("other@example.fr",)


def test_parse_reads_return_path_normalised():
    assert parse_message(HEADERS).return_path == "bounce+ann@lists.example.org"


@pytest.mark.parametrize("value", [b"<>", b" <> "])
def test_parse_reads_a_null_return_path_as_empty_string(value):
    message = parse_message(b"Return-Path: " + value + b"\nFrom: x@example.org\nSubject: s\n\nbody\n")

    assert message.return_path == ""


def test_parse_without_return_path_has_none():
    message = parse_message(b"From: x@example.org\nSubject: s\n\nbody\n")

    assert message.return_path is None


def test_parse_reads_to_and_cc_as_normalised_recipients():
    assert parse_message(HEADERS).recipients == ("privacy@example.com", "b@x.example", "juergen@y.example")


def test_parse_keeps_envelope_sender_and_recipients_normalised():
    message = parse_message(HEADERS, envelope_sender="<Env@Example.FR>",
                            envelope_recipients=("Privacy@Example.COM", "unsubscribe@example.com"))

    assert message.envelope_sender == "env@example.fr"
    assert message.envelope_recipients == ("privacy@example.com", "unsubscribe@example.com")
    assert "unsubscribe@example.com" in message.all_recipients


def test_parse_keeps_a_null_envelope_sender_as_empty_string():
    assert parse_message(HEADERS, envelope_sender="").envelope_sender == ""


def test_parse_without_envelope_has_none():
    message = parse_message(HEADERS)

    assert message.envelope_sender is None
    assert message.envelope_recipients == ()


def test_parse_decodes_an_rfc2047_utf_8_base64_subject():
    assert parse_message(HEADERS).subject == "Löschen Sie meine Daten"


def test_parse_decodes_an_rfc2047_iso_8859_1_quoted_printable_subject():
    raw = b"From: a@example.org\nSubject: =?iso-8859-1?q?Caf=E9_cr=E8me?=\n\nbody\n"

    assert parse_message(raw).subject == "Café crème"


def test_parse_decodes_an_rfc2047_utf_8_display_name():
    raw = b"From: =?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <j@example.de>\nSubject: s\n\nbody\n"

    assert parse_message(raw).sender_display == "Jürgen Müller <j@example.de>"


def test_parse_reads_message_id_in_reply_to_and_folded_references():
    message = parse_message(HEADERS)

    assert message.message_id == "<abc.1@mail.example.fr>"
    assert message.in_reply_to == "<prev.1@example.com>"
    assert message.references == ("<first.1@example.com>", "<prev.1@example.com>")


def test_parse_returns_an_aware_utc_date():
    date = parse_message(HEADERS).date

    assert date == datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    assert date.utcoffset().total_seconds() == 0


@pytest.mark.parametrize("value", [b"not a date", b"Sun, 99 Foo 2026 99:99:99 +0000", b""])
def test_parse_reads_a_bad_date_as_none(value):
    message = parse_message(b"From: a@example.org\nDate: " + value + b"\nSubject: s\n\nbody\n")

    assert message.date is None
    assert message.sender == "a@example.org"


def test_parse_prefers_text_plain_over_html_in_multipart_alternative(mail):
    message = parse_message(mail("The plain words.", html="<p>The <b>HTML</b> words.</p>"))

    assert "The plain words." in message.text
    assert "HTML" not in message.text
    assert message.text_from_html is False


def test_parse_turns_html_only_mail_into_text_without_tags(mail):
    html = ("<html><head><style>p { color: red }</style><script>var secret = 1;</script></head>"
            "<body><p>Please <b>remove</b> me</p><div>from your list</div></body></html>")
    message = parse_message(mail(html=html))

    assert message.text_from_html is True
    assert "Please remove me" in message.text
    assert "from your list" in message.text
    assert "<" not in message.text and ">" not in message.text
    assert "secret" not in message.text
    assert "color" not in message.text


def test_parse_decodes_iso_8859_1():
    text = "Bitte löschen Sie meine Daten. Grüße aus Köln, à bientôt."

    assert text in parse_message(text_mail(text.encode("iso-8859-1"), "iso-8859-1")).text


def test_parse_decodes_windows_1252():
    text = "Please don’t email me – “ever” again, it costs me 5 €."

    assert text in parse_message(text_mail(text.encode("windows-1252"), "windows-1252")).text


def test_parse_decodes_iso_2022_jp_in_7bit():
    text = "配信停止してください。"

    assert text in parse_message(text_mail(text.encode("iso-2022-jp"), "iso-2022-jp", "7bit")).text


@pytest.mark.parametrize("text", ["请取消订阅", "请取消订阅，谢谢。"], ids=["five-characters", "sentence"])
def test_parse_decodes_gb2312(text):
    assert text in parse_message(text_mail(text.encode("gb2312"), "gb2312")).text


def test_parse_decodes_utf_8_quoted_printable():
    text = "Grüße – naïve ünïcode, 配信停止"

    assert text in parse_message(text_mail(quopri.encodestring(text.encode("utf-8")), "utf-8", "quoted-printable")).text


def test_parse_decodes_utf_8_base64():
    text = "Grüße – naïve ünïcode, 配信停止"

    assert text in parse_message(text_mail(base64.encodebytes(text.encode("utf-8")), "utf-8", "base64")).text


def test_parse_gives_the_same_text_and_content_hash_for_crlf_and_lf(mail):
    lf = mail("line one\nline two\n\nline four\n")
    crlf = lf.replace(b"\n", b"\r\n")
    assert lf != crlf

    first, second = parse_message(lf), parse_message(crlf)

    assert first.text == second.text
    assert "\r" not in second.text
    assert first.content_hash == second.content_hash
    assert first.key == second.key


def attachment_mail() -> bytes:
    message = EmailMessage()
    message["From"] = "ann@example.net"
    message["To"] = "privacy@example.com"
    message["Subject"] = "My form"
    message["Message-ID"] = "<att.1@example.net>"
    message.set_content("Please see the attached form.")
    message.add_attachment(b"%PDF-1.4 pdfsecretword", maintype="application", subtype="pdf", filename="form.pdf")
    message.add_attachment("csvsecretword,b\n", subtype="csv", filename="list.csv")
    return message.as_bytes()


def test_parse_lists_attachments_by_filename_and_content_type():
    message = parse_message(attachment_mail())

    assert {(a.filename, a.content_type) for a in message.attachments} == {
        ("form.pdf", "application/pdf"), ("list.csv", "text/csv")}


def test_parse_keeps_attachments_out_of_the_text():
    message = parse_message(attachment_mail())

    assert "Please see the attached form." in message.text
    assert "pdfsecretword" not in message.text
    assert "csvsecretword" not in message.text


def test_parse_reads_a_delivery_status_report():
    report = parse_message(dsn_mail()).report

    assert report is not None
    assert report.report_type == "delivery-status"
    assert report.field("action") == "failed"
    assert report.field("Status") == "5.1.1"
    assert "gone@example.org" in report.field("final-recipient")


def test_parse_keeps_the_returned_message_headers_of_a_delivery_status_report():
    report = parse_message(dsn_mail()).report

    assert report.original("subject") == "Opt-out"
    assert report.original("message-id") == "<original.1@example.com>"


def test_parse_keeps_the_returned_message_out_of_a_bounce_text():
    message = parse_message(dsn_mail())

    assert "could not be delivered" in message.text
    assert "Your opt-out request was received" not in message.text


def test_parse_reads_a_feedback_report():
    message = parse_message(arf_mail())

    assert message.report.report_type == "feedback-report"
    assert message.report.field("feedback-type") == "abuse"
    assert "complainer@example.org" in message.report.field("original-rcpt-to").lower()
    assert message.report.original("subject") == "Our November newsletter"


def test_parse_keeps_the_returned_message_headers_out_of_feedback_report_fields():
    report = parse_message(arf_mail()).report

    assert report.field("subject") is None
    assert report.field("message-id") is None


def test_parse_never_raises_on_empty_bytes():
    message = parse_message(b"")

    assert message.sender is None
    assert message.text == ""
    assert message.size == 0


@pytest.mark.parametrize("seed", range(5))
def test_parse_never_raises_on_random_bytes_and_marks_them_malformed(seed):
    generator = random.Random(seed)
    raw = generator.randbytes(generator.randrange(200, 5000))

    message = parse_message(raw)

    assert message.malformed is True
    assert message.defects


def test_parse_marks_a_truncated_multipart_malformed():
    raw = (b'From: ann@example.net\nTo: privacy@example.com\nSubject: truncated\nMIME-Version: 1.0\n'
           b'Content-Type: multipart/mixed; boundary="XX"\n\n'
           b"--XX\nContent-Type: text/plain\n\nPlease unsubscribe me.\n"
           b"--XX\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERi0xLjQKJcfs")

    message = parse_message(raw)

    assert message.sender == "ann@example.net"
    assert "Please unsubscribe me." in message.text
    assert message.malformed is True


def test_parse_marks_a_header_line_without_colon_malformed():
    raw = (b"From: ann@example.net\nTo: privacy@example.com\nthis line has no colon\n"
           b"Subject: hello\n\nPlease unsubscribe me.\n")

    message = parse_message(raw)

    assert message.sender == "ann@example.net"
    assert message.malformed is True


def test_parse_never_raises_on_ten_thousand_headers():
    raw = (b"From: ann@example.net\nSubject: many headers\n"
           + b"".join(b"X-Filler-%d: value %d\n" % (i, i) for i in range(10_000)) + b"\nbody words\n")

    message = parse_message(raw)

    assert message.sender == "ann@example.net"
    assert message.subject == "many headers"
    assert "body words" in message.text
    assert len(message.headers) < 10_000


def test_parse_never_raises_on_a_two_megabyte_header_line():
    raw = b"From: ann@example.net\nSubject: " + b"A" * 2_000_000 + b"\n\nbody words\n"

    message = parse_message(raw)

    assert message.sender == "ann@example.net"
    assert "body words" in message.text
    assert 0 < len(message.subject) < 100_000


def test_parse_never_raises_on_an_unknown_charset():
    message = parse_message(text_mail(b"Please unsubscribe me. Gr\xfc\xdfe", "x-no-such-charset"))

    assert message.sender == "ann@example.net"
    assert "Please unsubscribe me." in message.text


def test_parse_does_not_mark_ordinary_mail_malformed(mail):
    message = parse_message(mail("Please unsubscribe me."))

    assert message.malformed is False
    assert message.defects == ()


def trace_headers() -> bytes:
    return (b"Return-Path: <ann@example.net>\n"
            b"Delivered-To: privacy@example.com\n"
            b"X-Original-To: privacy@example.com\n"
            b"Received: from mx.example.net (mx.example.net [192.0.2.7])\n"
            b"\tby mx.example.com with ESMTPS id 4Xy7\n"
            b"\tfor <privacy@example.com>; Sun, 29 Nov 2026 12:00:01 +0000\n")


def test_parse_gives_the_same_key_to_a_copy_with_extra_trace_headers(mail):
    raw = mail("Please unsubscribe me.", subject="Unsubscribe")
    smtp_copy, imap_copy = parse_message(raw), parse_message(trace_headers() + raw)

    assert smtp_copy.key == imap_copy.key
    assert smtp_copy.sha256 != imap_copy.sha256


def test_parse_gives_the_same_key_to_a_crlf_copy_with_trace_headers(mail):
    raw = mail("Please unsubscribe me.", subject="Unsubscribe")

    assert parse_message((trace_headers() + raw).replace(b"\n", b"\r\n")).key == parse_message(raw).key


def test_parse_gives_different_keys_to_different_bodies_with_one_message_id(mail):
    first = parse_message(mail("Please unsubscribe me."))
    second = parse_message(mail("Please delete my data."))

    assert first.message_id == second.message_id
    assert first.key != second.key


def test_parse_tolerates_leading_blank_lines(mail):
    raw = mail("Please unsubscribe me.", subject="Unsubscribe")

    message = parse_message(b"\r\n\n  \n" + raw)

    assert message.sender == "ann@example.net"
    assert message.subject == "Unsubscribe"
    assert message.malformed is False
    assert message.key == parse_message(raw).key


def test_parse_tolerates_an_mbox_from_line(mail):
    raw = mail("Please unsubscribe me.", subject="Unsubscribe")

    message = parse_message(b"From ann@example.net Sun Nov 29 12:00:00 2026\n" + raw)

    assert message.sender == "ann@example.net"
    assert message.subject == "Unsubscribe"
    assert "From ann@example.net" not in message.text
    assert message.key == parse_message(raw).key


def test_importing_parse_prints_nothing_to_stderr():
    result = subprocess.run([sys.executable, "-c", "import optout.parse"], capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0
    assert result.stderr == ""


def test_importing_parse_is_silent_while_flanker_rebuilds_tables_it_cannot_save(tmp_path):
    # A fresh install, or a read-only site-packages: flanker regenerates its parser tables at import,
    # logs "Symbol … is unreachable", and cannot write them ("Couldn't create …"). A directory in place of
    # each table file makes the write fail even for root.
    copy = tmp_path / "site" / "flanker"
    shutil.copytree(Path(flanker.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tables = sorted((copy / "addresslib" / "_parser").glob("*parsetab.py"))
    assert tables
    for table in tables:
        table.unlink()
        table.mkdir()
    code = "import optout.parse, flanker; print(flanker.__file__)"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(copy))
    assert result.stderr == ""
