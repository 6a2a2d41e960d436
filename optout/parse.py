"""Raw bytes -> Message. The only flanker import; it never raises on bad mail."""

from __future__ import annotations

import binascii
import codecs
import dataclasses
import email.header
import email.parser
import email.policy
import email.utils
import hashlib
import logging
import re
from datetime import datetime, timezone

from optout.model import Attachment, Message, Report, normalise_address
from optout.text import html_to_text

# flanker builds its address parser tables at import and logs every unreachable grammar symbol.
logging.getLogger("flanker.addresslib._parser.parser").setLevel(logging.ERROR)
logging.getLogger("flanker").setLevel(logging.ERROR)

from flanker import mime  # noqa: E402  (after the logger is quiet)
from flanker.mime.message.headers import encodedword  # noqa: E402

MAX_TEXT = 200_000
MAX_PARSE_BYTES = 16 * 1024 * 1024
MAX_HEADERS = 500
MAX_HEADER_VALUE = 4_000
MAX_PARTS = 1_000
REPORT_PARTS = {
    "message/delivery-status": "delivery-status",
    "message/global-delivery-status": "delivery-status",
    "message/feedback-report": "feedback-report",
    "message/disposition-notification": "disposition-notification",
    "message/global-disposition-notification": "disposition-notification",
}


def parse_message(raw: bytes, envelope_sender: str | None = None,
                  envelope_recipients: tuple[str, ...] = ()) -> Message:
    """Parse raw mail into a Message; broken mail comes back marked malformed with what could be read."""
    digest = hashlib.sha256(raw).hexdigest()
    defects: list[str] = []
    raw = _trim_leading(raw)
    content = _content_hash(raw)
    defects += _header_defects(raw)
    size = len(raw)
    if size > MAX_PARSE_BYTES:
        # flanker holds about five times a message in memory: past this, only the start is read (the
        # person's words come first; what is cut is attachments), and a person looks at the rest.
        raw = raw[:MAX_PARSE_BYTES]
        defects.append(f"larger than {MAX_PARSE_BYTES} bytes: only the start was read")
    # flanker turns the whole message into text before it looks at any part, guessing the charset when
    # the bytes are not UTF-8, and never applies a part's declared charset to 8-bit text. So mail that is
    # not UTF-8 is handed over byte for byte as Latin-1, and `_body` decodes each part with its charset.
    source: bytes | str = raw
    if not raw.isascii():  # isascii() copies nothing: a 50 MB message is not decoded just to be checked
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            source = raw.decode("latin-1")
    try:
        root = mime.from_string(source)
    except Exception as error:  # flanker raises many types on broken MIME; recover() is its lenient mode
        defects.append(f"strict parse failed: {type(error).__name__}")
        try:
            root = mime.recover(source)
        except Exception as error2:
            defects.append(f"recover failed: {type(error2).__name__}")
            root = None
    envelope = dict(
        envelope_sender=None if envelope_sender is None else normalise_address(envelope_sender),
        envelope_recipients=tuple(normalise_address(r) for r in envelope_recipients),
    )
    envelope["content_hash"] = content
    if root is None:
        message = _from_stdlib(raw, digest, defects, envelope)
    else:
        try:
            message = _from_flanker(root, raw, digest, defects, envelope, isinstance(source, str))
        except Exception as error:  # a part flanker accepted but cannot decode: keep what the headers say
            defects.append(f"walk failed: {type(error).__name__}")
            message = _from_stdlib(raw, digest, defects, envelope)
    return message if message.size == size else dataclasses.replace(message, size=size)


_STABLE_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"content-type")


def _content_hash(raw: bytes) -> str:
    """Hash the body and the headers the author wrote, not the ones servers add on the way."""
    # Without copying the body again (a 50 MB message costs 50 MB here, not 250): hash it through a view.
    normalised = raw.replace(b"\r\n", b"\n") if b"\r" in raw else raw
    end = normalised.find(b"\n\n")
    head = normalised if end < 0 else normalised[:end]
    body = memoryview(normalised)[end + 2 if end >= 0 else len(normalised):]
    stable = []
    for line in head.replace(b"\n ", b" ").replace(b"\n\t", b" ").split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in _STABLE_HEADERS:
            stable.append(name.strip().lower() + b":" + b" ".join(value.split()))
    digest = hashlib.sha256(b"\n".join(sorted(stable)) + b"\n\n")
    digest.update(body[:_rstripped_length(body)])
    return digest.hexdigest()


def _rstripped_length(data: memoryview, chunk: int = 65536) -> int:
    """Return the length of data without its trailing whitespace (as bytes.rstrip() counts it), copying a chunk at a time."""
    end = len(data)
    while end > 0:
        start = max(0, end - chunk)
        kept = len(bytes(data[start:end]).rstrip())
        if kept:
            return start + kept
        end = start
    return 0


_JMRP = re.compile(rb"x-hmxmroriginalrecipient", re.I)
ENCLOSED_TYPES = frozenset({"message/rfc822", "message/global", "text/rfc822-headers", "text/rfc822-header",
                            "message/rfc822-headers"})
ENCLOSED_WANTED = ("from", "to", "cc", "subject", "date", "message-id", "x-hmxmroriginalrecipient", "x-original-to",
                   "delivered-to", "return-path")
_HEADER_LINE = re.compile(rb"^(?:[!-9;-~]+[ \t]*:|[ \t])")


def _header_defects(raw: bytes) -> list[str]:
    """Name what is wrong in the header block: lines that are no header, 8-bit bytes that are not UTF-8."""
    head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    defects = []
    for line in head[:65536].splitlines()[:MAX_HEADERS]:
        if line.strip() and not _HEADER_LINE.match(line):
            defects.append("a header line without a colon")
            break
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            defects.append("8-bit bytes in the headers in no declared charset")
    return defects


def _trim_leading(raw: bytes) -> bytes:
    # Saved mail often starts with blank lines or an mbox "From " line; neither is a header.
    raw = raw.lstrip(b" \t\r\n")
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return raw


def _headers_of(items, latin: bool = False) -> tuple[tuple[str, str], ...]:
    result = []
    for index, (name, value) in enumerate(items):
        if index >= MAX_HEADERS:
            break
        value = str(value)
        if latin and not value.isascii():
            value = _utf8_or_latin(value)
        result.append((str(name).lower(), _clean(value)[:MAX_HEADER_VALUE]))
    return tuple(result)


def _utf8_or_latin(value: str) -> str:
    # A raw 8-bit header (SMTPUTF8 mail) came through as Latin-1: it is most likely UTF-8.
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _clean(value: str) -> str:
    return " ".join(value.replace("\x00", "").split())


def _first(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    return next((value for key, value in headers if key == name), None)


ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to", "sender"})
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets, brackets included


def _addresses(values: list[str], defects: list[str] | None = None) -> list[tuple[str, str]]:
    """Return (display name, address) pairs from raw header values: parsed first, then the names decoded.

    RFC 2047 §5: encoded words are decoded after parsing, or a name that decodes to ":" or "," or
    "@" ("=?utf-8?q?M=C3=BCller=2C_Hans?=") changes which address is read.
    """
    try:
        pairs = email.utils.getaddresses(values)
    except Exception as error:  # the stdlib recurses once per nested comment: "((((…ann@example.net))))"
        if defects is not None:
            defects.append(f"unreadable address header: {type(error).__name__}")
        return []
    result = []
    for name, address in pairs:
        address = address.strip()
        local, at, domain = address.rpartition("@")
        if at and local and domain and len(address) <= MAX_ADDRESS:
            result.append((_decoded(name.strip()), address))
    return result


def _decoded(name: str) -> str:
    if "=?" not in name:
        return name
    try:
        return encodedword.decode(name) or name  # flanker's decoder takes encoded and raw text mixed
    except Exception:  # a broken encoded word stays as it was written
        return name


def _address_headers(items, latin: bool = False) -> tuple[tuple[str, str], ...]:
    """Return the raw (undecoded) address headers among the first MAX_HEADERS headers."""
    return tuple((name, value) for name, value in _headers_of(items, latin) if name in ADDRESS_HEADERS)


def _display(name: str, address: str) -> str:
    """Return "Name <address>", quoting the name where RFC 5322 requires it (formataddr refuses non-ASCII)."""
    name = " ".join(name.replace("\r", " ").replace("\n", " ").split())
    if not name:
        return address
    if any(char in name for char in '()<>@,;:\\".[]'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if "<" in value and ">" in value:
        value = value[value.index("<"): value.index(">", value.index("<")) + 1]
    return value[:998] or None


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None


def _common(headers: tuple[tuple[str, str], ...], raw: bytes, digest: str, defects: list[str],
            envelope: dict, address_headers: tuple[tuple[str, str], ...]) -> dict:
    from_ = _addresses([v for k, v in address_headers if k == "from"], defects)
    sender_display = None
    sender = None
    if from_:
        name, address = from_[0]
        sender = normalise_address(address)
        sender_display = _display(name, address)
    recipients = [normalise_address(a) for _, a in _addresses([v for k, v in address_headers if k in ("to", "cc")],
                                                               defects)]
    return_path = _first(headers, "return-path")
    if return_path is not None:
        return_path = return_path.strip()
        return_path = "" if return_path in ("<>", "") else normalise_address(return_path)
    references = tuple(ref for ref in (_first(headers, "references") or "").split() if ref.startswith("<"))
    sender_header = _addresses([v for k, v in address_headers if k == "sender"], defects)
    return dict(
        sha256=digest,
        size=len(raw),
        sender=sender,
        sender_display=sender_display,
        reply_to=tuple(normalise_address(a) for _, a in _addresses([v for k, v in address_headers if k == "reply-to"],
                                                                   defects)),
        sender_header=normalise_address(sender_header[0][1]) if sender_header else None,
        return_path=return_path,
        recipients=tuple(dict.fromkeys(recipients)),
        subject=_first(headers, "subject") or "",
        message_id=_message_id(_first(headers, "message-id")),
        in_reply_to=_message_id(_first(headers, "in-reply-to")),
        references=references,
        date=_date(_first(headers, "date")),
        headers=headers,
        defects=tuple(defects),
        malformed=bool(defects),
        **envelope,
    )


def _from_flanker(root, raw: bytes, digest: str, defects: list[str], envelope: dict, latin: bool) -> Message:
    headers = _headers_of(root.headers.items(), latin)
    plain: list[str] = []
    html: list[str] = []
    attachments: list[Attachment] = []
    report_type = None
    report_fields: list[tuple[str, str]] = []
    original_headers: tuple[tuple[str, str], ...] = ()
    top_type = str(root.content_type).lower()
    # The returned message's headers matter for complaints only: RFC 5965 reports and Microsoft's JMRP.
    wants_enclosed = top_type == "multipart/report" or _JMRP.search(raw) is not None
    if top_type == "multipart/report":
        report_type = (root.content_type.params.get("report-type") or "").lower() or None
    try:
        parts = root.walk(with_self=True, skip_enclosed=True)
        for count, part in enumerate(parts):
            if count >= MAX_PARTS:
                defects.append(f"more than {MAX_PARTS} parts: the rest ignored")
                break
            try:
                content_type = str(part.content_type).lower()
                if content_type.startswith("multipart/"):
                    boundary = part.content_type.params.get("boundary")
                    if boundary and f"--{boundary}--".encode("utf-8", "replace") not in raw:
                        defects.append("a multipart without its closing boundary (truncated?)")
                    continue
                if content_type in REPORT_PARTS:
                    report_type = report_type or REPORT_PARTS[content_type]
                    report_fields += _report_fields(part)
                    continue
                if content_type in ENCLOSED_TYPES:
                    if not original_headers and wants_enclosed:
                        original_headers = _enclosed_headers(part)
                    if content_type.startswith("message/"):
                        attachments.append(Attachment(None, content_type, _size(part)))
                    continue
                disposition = (part.content_disposition[0] or "").lower() if part.content_disposition else ""
                filename = getattr(part, "detected_file_name", None) or None
                if content_type.startswith("text/") and disposition != "attachment" and not (
                        filename and content_type not in ("text/plain", "text/html")):
                    body = _body(part, defects, latin)
                    if content_type == "text/html":
                        html.append(body)
                    elif content_type in ("text/plain", "text/enriched", "text/richtext") or not content_type[5:]:
                        plain.append(body)
                    else:
                        attachments.append(Attachment(filename, content_type, _size(part)))
                    continue
                attachments.append(Attachment(filename, content_type, _size(part)))
            except Exception as error:  # one broken part must not cost the rest of the message
                defects.append(f"unreadable part: {type(error).__name__}")
    except Exception as error:  # flanker's structure itself gave way while walking
        defects.append(f"walk failed: {type(error).__name__}")
    text_from_html = False
    if any(p.strip() for p in plain):
        text = "\n".join(plain)
    elif html:
        text = html_to_text("\n".join(html))
        text_from_html = True
    else:
        text = ""
    report = None
    if report_type:
        report = Report(report_type, tuple(report_fields), original_headers)
    common = _common(headers, raw, digest, defects, envelope, _address_headers(root.headers.iteritems(raw=True), latin))
    return Message(
        **common,
        content_type=top_type,
        text=text[:2 * MAX_TEXT].replace("\r\n", "\n").replace("\r", "\n")[:MAX_TEXT],
        text_from_html=text_from_html,
        attachments=tuple(attachments),
        report=report,
        enclosed_headers=original_headers,
    )


def _body(part, defects: list[str], latin: bool = False) -> str:
    charset = part.content_type.params.get("charset")
    encoding = str(getattr(part.content_encoding, "value", part.content_encoding) or "").lower()
    if charset:
        try:
            codecs.lookup(charset)
        except LookupError:
            defects.append(f"unknown charset {charset[:40]!r}")
    if encoding == "base64":
        try:
            # flanker's own decoder forgives broken base64; check the encoded text strictly.
            encoded = part._container.read_body()
            binascii.a2b_base64("".join(str(encoded).split()), strict_mode=True)
        except (binascii.Error, ValueError, AttributeError):
            defects.append("broken base64 in a text part")
    try:
        body = part.body
    except Exception as error:  # unknown charset or broken transfer encoding in one part
        defects.append(f"part {part.content_type}: {type(error).__name__}")
        try:
            return part._container.read_body().decode("utf-8", "replace")  # raw, undecoded text
        except Exception:
            return ""
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return ""
    if latin and encoding not in ("base64", "quoted-printable") and not body.isascii():
        return _declared(body.encode("latin-1", "replace"), charset, defects)
    if "\x1b" in body and charset and charset.lower().startswith("iso-2022"):
        # flanker leaves pure 7-bit bodies undecoded, but ISO-2022 (Japanese mail) is 7-bit escapes.
        try:
            return body.encode("ascii").decode(charset)
        except (UnicodeError, LookupError):
            defects.append(f"undecodable {charset[:40]} text")
    return body


def _declared(data: bytes, charset: str | None, defects: list[str]) -> str:
    """Decode 8-bit text with its declared charset; undeclared, UTF-8, then Windows-1252."""
    for candidate in (charset, "utf-8", "cp1252"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except LookupError:
            continue
        except UnicodeDecodeError:
            continue  # mislabelled 8-bit text is common ("us-ascii" over Latin-1): read it, don't flag it
    return data.decode("latin-1")


def _size(part) -> int:
    # flanker's own `size` serialises the part again; the span it was read from costs nothing.
    container = getattr(part, "_container", None)
    try:
        return max(0, int(container.end) - int(container._body_start) + 1)
    except (AttributeError, TypeError, ValueError):
        return 0


def _report_fields(part) -> list[tuple[str, str]]:
    enclosed = getattr(part, "enclosed", None)
    if enclosed is not None:
        items = list(enclosed.headers.items())
            # The fields are the enclosed "headers"; flanker's body of such a part can run on past its boundary.
        return [(str(k).lower(), _clean(str(v))[:MAX_HEADER_VALUE]) for k, v in items][:MAX_HEADERS]
    try:
        body = part.body
    except Exception:
        return []
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return []
    return _fields(body)[:MAX_HEADERS]


def _fields(text: str) -> list[tuple[str, str]]:
    """Read "Name: value" fields (RFC 3464/5965 report bodies, header blocks), folded lines unfolded."""
    fields: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            if name and " " not in name.strip():
                fields.append((name.strip().lower(), value.strip()))
        if len(fields) > MAX_HEADERS:
            break
    return [(name, _clean(value)[:MAX_HEADER_VALUE]) for name, value in fields]


def _enclosed_headers(part) -> tuple[tuple[str, str], ...]:
    """Return the headers that matter of an enclosed original message (the one a report or bounce returns)."""
    enclosed = getattr(part, "enclosed", None)
    if enclosed is not None:
        found = []
        for name in ENCLOSED_WANTED:
            try:
                value = enclosed.headers.get(name)
            except Exception:
                continue
            if value is not None:
                found.append((name, _clean(str(value))[:MAX_HEADER_VALUE]))
        return tuple(found)
    try:
        body = part.body
    except Exception:
        return ()
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return ()
    head = body.replace("\r\n", "\n").split("\n\n", 1)[0]
    return tuple(field for field in _fields(head) if field[0] in ENCLOSED_WANTED)


def _from_stdlib(raw: bytes, digest: str, defects: list[str], envelope: dict) -> Message:
    """Read what the headers say when flanker cannot parse the mail at all."""
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as error:  # the stdlib parser recurses once per nested multipart (RecursionError)
        defects.append(f"stdlib parse failed: {type(error).__name__}")
        parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
        parsed.set_payload(None)
    items = []
    for name, value in parsed.items():
        try:
            value = str(email.header.make_header(email.header.decode_header(value)))
        except Exception:
            value = str(value)
        items.append((name, value))
    headers = _headers_of(items)
    payload = parsed.get_payload(decode=True) if not parsed.is_multipart() else None
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not defects:
        defects.append("unreadable MIME")
    common = _common(headers, raw, digest, defects, envelope, _address_headers(parsed.items()))
    return Message(**common, content_type=parsed.get_content_type(), text=text[:MAX_TEXT])
