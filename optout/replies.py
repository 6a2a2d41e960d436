"""Render a Reply effect into a mail from a Jinja2 template: text and optional HTML, in the requester's language. Pure."""

from __future__ import annotations

import hashlib
import re
import weakref
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.message import Message as MimePart
from email.policy import Compat32
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path

import jinja2

from optout.model import Message, Reply

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "templates"
FALLBACK_LANGUAGE = "en"
# CR, LF and every other control character: stripped before anything reaches a header (no injection).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


@dataclass(frozen=True)
class Rendered:
    """A reply ready for the outbox: its envelope, headers that matter, and the bytes to send."""

    to: str
    subject: str
    message_id: str
    language: str
    template: str
    raw: bytes


def template_environment(override: Path | None = None) -> jinja2.Environment:
    """Return the Jinja2 environment: templates from `override` first, then the shipped ones.

    HTML templates are autoescaped; text templates are not (they are sent as text/plain).
    """
    loaders = [jinja2.FileSystemLoader(str(override))] if override else []
    loaders.append(jinja2.FileSystemLoader(str(SHIPPED)))
    # auto_reload=False: templates are read once per process, not stat()ed at every reply.
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=jinja2.select_autoescape(["html"]),
                              auto_reload=False,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                              lstrip_blocks=True)


def header_safe(text: str | None, limit: int = 200) -> str:
    """Return text fit for a header: control characters (CR and LF included) replaced by a space, trimmed."""
    return " ".join(_CONTROL.sub(" ", text or "").split())[:limit]


_PICKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pick(env: jinja2.Environment, name: str, language: str, suffix: str) -> jinja2.Template | None:
    # Remembered per environment: a missing language would otherwise cost a failed lookup at every reply.
    picks = _PICKS.setdefault(env, {})
    key = (name, language, suffix)
    if key not in picks:
        picks[key] = None
        for candidate in (language, FALLBACK_LANGUAGE):
            try:
                picks[key] = env.get_template(f"{name}.{candidate}.{suffix}")
                break
            except jinja2.TemplateNotFound:
                continue
    return picks[key]


def _block(template: jinja2.Template, block: str, context: dict) -> str:
    render = template.blocks.get(block)
    if render is None:
        return ""
    return "".join(render(template.new_context(context))).strip()


def confirm_address(sender: str, token: str) -> str:
    """Return the address a requester confirms at: privacy+confirm-TOKEN@ our domain (RFC 5233 subaddress)."""
    local, _, domain = sender.rpartition("@")
    return f"{local.partition('+')[0]}+confirm-{token}@{domain}"


def message_id_for(key: str, template: str, domain: str) -> str:
    """Return the stable Message-ID of the reply to a message: the same however often it is rendered or sent."""
    digest = hashlib.sha256(f"{template}\x1f{key}".encode()).hexdigest()[:24]
    return f"<optout.{digest}@{domain}>"


def render_reply(reply: Reply, original: Message, env: jinja2.Environment, sender: str, now: datetime,
                 organisation: str = "") -> Rendered:
    """Render a reply: From our privacy address, To the requester, "Re:" the subject, threaded, auto-replied.

    - The requester's own words are never copied (no backscatter): only their name and subject line.
    - Auto-Submitted: auto-replied (RFC 3834) and X-Auto-Response-Suppress keep responders from answering it.
    - Language: the reply's language when a template exists for it, else English.
    """
    text_template = _pick(env, reply.template, reply.language, "txt")
    if text_template is None:
        raise jinja2.TemplateNotFound(f"{reply.template}.{FALLBACK_LANGUAGE}.txt")
    language = reply.language if text_template.name.split(".")[-2] == reply.language else FALLBACK_LANGUAGE
    html_template = _pick(env, reply.template, language, "html")
    display_name = header_safe(parseaddr(reply.display)[0], 80)
    context = {
        "name": display_name,
        "address": reply.to,
        "scopes": list(reply.scopes),
        "reference": reply.reference,
        "due_date": reply.due_at.date().isoformat() if reply.due_at else "",
        "child": "child" in reply.flags,
        "privacy_address": sender,
        "organisation": organisation,
        "original_subject": header_safe(original.subject),
        "language": language,
        "confirm_address": confirm_address(sender, reply.confirm_token) if reply.confirm_token else "",
        "confirm_by": reply.token_expires_at.date().isoformat() if reply.token_expires_at else "",
        **dict(reply.facts),
    }
    original_subject = header_safe(original.subject)
    if original_subject:
        subject = original_subject if original_subject.lower().startswith("re:") else f"Re: {original_subject}"
    else:
        subject = header_safe(_block(text_template, "subject", context))
    if reply.confirm_token:
        # The token in the subject too: some clients answer the From address and drop Reply-To's +tag.
        subject = f"{header_safe(subject, 200)} [{reply.reference} confirm-{reply.confirm_token}]"
    body = _block(text_template, "body", context) + "\n"
    domain = sender.rpartition("@")[2] or "localhost"
    message_id = message_id_for(original.key, reply.template, domain)
    # The compat32 classes build a message several times faster than EmailMessage's header registry,
    # which made rendering the most expensive step of processing a request.
    # A boundary of our own (from the Message-ID, never in a template's text): the generator would otherwise
    # compile a fresh regular expression for every random boundary it tries.
    boundary = f"=_optout_{hashlib.sha256(message_id.encode()).hexdigest()[:24]}"
    mail = _text_part(body, "plain")
    if html_template is not None:
        mail = _multipart("alternative", f"{boundary}_a",
                          (mail, _text_part(_block(html_template, "body", context) + "\n", "html")))
    if reply.attachments:
        parts = [mail]
        for filename, content_type, data in reply.attachments:
            maintype, _, subtype = content_type.partition("/")
            part = MIMEApplication(data, subtype) if maintype == "application" else _text_part(data.decode(), subtype)
            del part["MIME-Version"]
            part.add_header("Content-Disposition", "attachment", filename=header_safe(filename, 100))
            parts.append(part)
        mail = _multipart("mixed", f"{boundary}_m", parts)
    mail["MIME-Version"] = "1.0"
    mail["From"] = _address_header(header_safe(organisation, 80), sender)
    mail["To"] = _address_header(display_name, reply.to)
    if reply.confirm_token:
        mail["Reply-To"] = context["confirm_address"]
    mail["Subject"] = _text_header(header_safe(subject, 250))
    mail["Date"] = format_datetime(now)
    mail["Message-ID"] = message_id
    if original.message_id:
        mail["In-Reply-To"] = original.message_id
        references = [r for r in original.references if r != original.message_id][-10:] + [original.message_id]
        mail["References"] = " ".join(references)
    mail["Auto-Submitted"] = "auto-replied"
    mail["X-Auto-Response-Suppress"] = "All"
    mail["Content-Language"] = language
    subject_text = header_safe(subject, 250)
    raw = mail.as_bytes(policy=_WIRE)
    return Rendered(reply.to, subject_text, message_id, language, reply.template, raw)


class _WirePolicy(Compat32):
    """compat32 with CRLF line ends, lines up to RFC 5322's 998 (message ids are never folded), and
    plain ASCII header values written as they are instead of through a Header object each."""

    def _fold(self, name, value, sanitize):
        if isinstance(value, str) and value.isascii() and "\n" not in value and len(name) + len(value) < 996:
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


_WIRE = _WirePolicy(linesep="\r\n", max_line_length=998)


def _text_part(text: str, subtype: str) -> MimePart:
    """Return a UTF-8 text part, built directly (MIMEText's charset handling costs more).

    Quoted-printable keeps the text readable in a raw message (base64 is the default for UTF-8).
    """
    part = MimePart()
    part["Content-Type"] = f'text/{subtype}; charset="utf-8"'
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(quoprimime.body_encode(text.encode("utf-8").decode("latin-1")))
    return part


def _multipart(subtype: str, boundary: str, parts) -> MIMEMultipart:
    mail = MIMEMultipart(subtype, boundary=boundary)
    del mail["MIME-Version"]  # belongs to the whole message, set once at the top
    for part in parts:
        mail.attach(part)
    return mail


def _text_header(text: str) -> str | Header:
    return text if text.isascii() else Header(text, "utf-8")


def _address_header(name: str, address: str) -> str:
    if not name:
        return address
    if name.isascii():
        return formataddr((name, address))
    return formataddr((str(Header(name, "utf-8").encode()), address))
