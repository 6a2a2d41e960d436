"""The values every module passes around: messages, classifications, decisions. Stdlib only."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Kind(StrEnum):
    """What a message asks for; the values are the strings the CLI prints."""

    OPT_OUT = "opt-out"
    ACCESS = "access"
    DELETION = "deletion"
    OTHER = "other"


class Scope(StrEnum):
    """How much mail an opt-out stops."""

    ALL = "all"
    NEWSLETTERS = "newsletters"
    PARTNERS = "partners"


SCOPE_ORDER = (Scope.ALL, Scope.NEWSLETTERS, Scope.PARTNERS)


def normalise_address(address: str) -> str:
    """Return the addr-spec trimmed and lower-cased, with an IDNA (punycode) domain.

    Trim and lower-case are the rule of the California DROP hashing spec; the whole address
    is lower-cased, local part included, so that one person is one row.
    """
    address = address.strip().strip("<>").strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    domain = domain.strip().rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local}@{domain}".lower()


def drop_hash(address: str) -> str:
    """Return the DROP form of an address: base64 of the SHA-256 of the normalised address."""
    digest = hashlib.sha256(normalise_address(address).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class Attachment:
    """A part of a message that is not its text."""

    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True)
class Report:
    """A machine report carried by a message: RFC 3464 DSN, RFC 5965 ARF or RFC 8098 MDN."""

    report_type: str
    fields: tuple[tuple[str, str], ...] = ()
    original_headers: tuple[tuple[str, str], ...] = ()

    def field(self, name: str) -> str | None:
        """Return the first report field of that name (case-insensitive)."""
        name = name.lower()
        return next((value for key, value in self.fields if key == name), None)

    def original(self, name: str) -> str | None:
        """Return the first header of that name from the original message."""
        name = name.lower()
        return next((value for key, value in self.original_headers if key == name), None)


@dataclass(frozen=True)
class Message:
    """Everything optout reads from one mail, parsed once; never the raw bytes."""

    sha256: str
    size: int
    content_hash: str = ""
    sender: str | None = None
    sender_display: str | None = None
    reply_to: tuple[str, ...] = ()
    sender_header: str | None = None
    return_path: str | None = None
    envelope_sender: str | None = None
    recipients: tuple[str, ...] = ()
    envelope_recipients: tuple[str, ...] = ()
    subject: str = ""
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    date: datetime | None = None
    content_type: str = "text/plain"
    text: str = ""
    text_from_html: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    report: Report | None = None
    enclosed_headers: tuple[tuple[str, str], ...] = ()
    malformed: bool = False
    defects: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """Return the first header of that name (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def has_header(self, name: str) -> bool:
        """Say whether a header of that name is present."""
        name = name.lower()
        return any(key == name for key, _ in self.headers)

    @property
    def key(self) -> str:
        """Return the ledger key: Message-ID plus a hash of the content, or the hash alone.

        The content hash leaves out trace headers (Received, Return-Path, Delivered-To …), which differ
        between the copy that arrives over SMTP and the one in the IMAP mailbox.
        """
        digest = self.content_hash or self.sha256
        if self.message_id:
            return f"{self.message_id}|{digest[:32]}"
        return digest

    @property
    def all_recipients(self) -> tuple[str, ...]:
        """Return header and envelope recipients, each once."""
        return tuple(dict.fromkeys(self.recipients + self.envelope_recipients))


@dataclass(frozen=True)
class Classification:
    """What a message is, and why: the rule that decided and the words it rested on."""

    kind: Kind
    reason: str
    rule: str
    confidence: float
    scopes: tuple[Scope, ...] = ()
    language: str | None = None
    evidence: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    machine: bool = False

    @property
    def scope(self) -> str | None:
        """Return the scopes as one string (e.g. "all" or "newsletters,partners"), None when none."""
        return ",".join(self.scopes) if self.scopes else None


@dataclass(frozen=True)
class Suppress:
    """Effect: stop mailing an address in a scope."""

    address: str
    display: str
    scope: Scope | str  # a Scope, or the name of one list (from a signed unsubscribe token)
    reason: str


@dataclass(frozen=True)
class OpenRequest:
    """Effect: open an access or deletion case with a due date."""

    kind: Kind
    address: str
    display: str
    due_at: datetime
    flags: tuple[str, ...] = ()
    language: str | None = None
    reference: str = ""
    ack_due_at: datetime | None = None
    jurisdiction: str = "gdpr"
    token: str = field(default="", repr=False)  # the confirmation token; the store keeps only its hash
    token_expires_at: datetime | None = None


@dataclass(frozen=True)
class Reply:
    """Effect: answer the sender with a template (opt-out, access, deletion or other) in their language."""

    template: str
    to: str
    display: str
    language: str
    scopes: tuple[str, ...] = ()
    reference: str = ""
    due_at: datetime | None = None
    flags: tuple[str, ...] = ()
    confirm_token: str = field(default="", repr=False)  # asks the requester to confirm: Reply-To privacy+confirm-TOKEN@
    token_expires_at: datetime | None = None
    facts: tuple[tuple[str, object], ...] = ()  # more template variables (what was found, what was erased …)
    attachments: tuple[tuple[str, str, bytes], ...] = ()  # (filename, content type, bytes)


@dataclass(frozen=True)
class TokenMatch:
    """An unsubscribe token in a recipient address, checked: for which address and list, and its verdict."""

    token: str
    status: str  # valid | forged | expired | unknown | malformed
    address: str | None = None
    list_name: str | None = None


class RequestStatus(StrEnum):
    """Where an access or deletion request stands; the values are the strings the CLI prints."""

    AWAITING = "awaiting-verification"
    VERIFIED = "verified"
    FULFILLED = "fulfilled"
    REJECTED = "rejected"
    EXPIRED = "expired"


OPEN_STATUSES = (RequestStatus.AWAITING.value, RequestStatus.VERIFIED.value)


@dataclass(frozen=True)
class Confirmation:
    """A confirmation token found in a message (privacy+confirm-TOKEN@ or the subject), checked.

    status: valid | other-address | expired | used | unknown | machine
    """

    token: str
    status: str
    request_id: int | None = None
    reference: str = ""
    kind: str = ""


@dataclass(frozen=True)
class History:
    """What the store already knows about a sender, as `decide()` needs it."""

    suppressed_scopes: frozenset[str] = frozenset()
    open_requests: frozenset[str] = frozenset()
    replies_today: int = 0
    replied_today: frozenset[str] = frozenset()
    awaiting: tuple[tuple[str, str, datetime], ...] = ()  # (kind, reference, due_at) of requests not yet confirmed


@dataclass(frozen=True)
class Decision:
    """What to do about one message: its effects, whether a reply is allowed, and why."""

    action: str
    suppressions: tuple[Suppress, ...] = ()
    requests: tuple[OpenRequest, ...] = ()
    may_reply: bool = False
    no_reply_reason: str | None = None
    notes: tuple[str, ...] = field(default=())
    reply: Reply | None = None
    verify: tuple[int, ...] = ()  # request ids this message confirms
    reissue: tuple[OpenRequest, ...] = ()  # a request asked again before it was confirmed: a fresh token for it
