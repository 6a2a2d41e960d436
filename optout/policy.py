"""(Message, Classification, History, now) -> Decision: what to suppress, which request to open, whether to reply. Pure."""

from __future__ import annotations

import base64
import calendar
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from optout.classify import LIST_HEADERS, is_machine_sender, sender_local_part
from optout.model import (Classification, Confirmation, Decision, History, Kind, Message, OpenRequest, Reply, Scope,
                          Suppress, TokenMatch, normalise_address)

COMPLAINANT_FIELDS = ("removal-recipient", "original-rcpt-to")
COMPLAINANT_HEADERS = ("x-hmxmroriginalrecipient", "x-original-to", "delivered-to", "to")

# What each law asks (GDPR Art. 12(3); CCPA regulations §7021): time to acknowledge (business days), time to
# answer, and how much longer an extension may make it.
JURISDICTIONS = {
    "gdpr": {"ack_business_days": None, "answer_months": 1, "answer_days": None, "extension_days": 61},
    "ccpa": {"ack_business_days": 10, "answer_months": None, "answer_days": 45, "extension_days": 45},
}
CONFIRM_PREFIX = "confirm-"
# The confirmation token: 16 characters of base32 (80 random bits), lower case, in a local part or a subject.
CONFIRM_TOKEN = re.compile(r"confirm-([a-z2-7]{16})(?![a-z2-7])", re.IGNORECASE)


@dataclass(frozen=True)
class Rules:
    """The settings `decide()` follows; built from the config by the caller."""

    own_addresses: tuple[str, ...] = ()
    request_days: int | None = None  # None: the jurisdiction's deadline
    child_request_days: int = 14
    reply_to_other: bool = False
    daily_reply_cap: int = 5
    jurisdiction: str = "gdpr"
    verify_days: int = 7


def add_months(moment: datetime, months: int) -> datetime:
    """Return the same day `months` later, or the month's last day when it is shorter (31 Jan + 1 = 28/29 Feb)."""
    month = moment.month - 1 + months
    year, month = moment.year + month // 12, month % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def add_business_days(moment: datetime, days: int) -> datetime:
    """Return the moment `days` working days (Monday to Friday) later."""
    while days > 0:
        moment += timedelta(days=1)
        if moment.weekday() < 5:
            days -= 1
    return moment


def request_deadlines(received_at: datetime, rules: Rules, child: bool = False) -> tuple[datetime | None, datetime]:
    """Return when a request must be acknowledged (None: no separate duty) and answered.

    - GDPR: answer within one month of receipt; CCPA: acknowledge within 10 business days, answer within 45 days;
    - `[requests] days` replaces the jurisdiction's answer period; a child's request gets the shorter child deadline.
    """
    law = JURISDICTIONS[rules.jurisdiction]
    ack = add_business_days(received_at, law["ack_business_days"]) if law["ack_business_days"] else None
    if rules.request_days is not None:
        due = received_at + timedelta(days=rules.request_days)
    elif law["answer_months"]:
        due = add_months(received_at, law["answer_months"])
    else:
        due = received_at + timedelta(days=law["answer_days"])
    if child:
        due = min(due, received_at + timedelta(days=rules.child_request_days))
    return ack, due


def extension_refused(jurisdiction: str, extended_days: int, days: int) -> str | None:
    """Say why extending a request by `days` more is not allowed (past the law's limit in all), or None."""
    allowed = JURISDICTIONS[jurisdiction]["extension_days"]
    if extended_days + days > allowed:
        return (f"{jurisdiction.upper()} allows {allowed} days of extension in all; this request has had "
                f"{extended_days}")
    return None


def confirm_tokens(message: Message, privacy_addresses: tuple[str, ...]) -> list[str]:
    """Return the confirmation tokens a message carries: in privacy+confirm-TOKEN@ first, then in its subject."""
    locals_ = {normalise_address(a).rpartition("@")[0] for a in privacy_addresses}
    found = []
    for address in message.all_recipients:
        local, _, _ = address.rpartition("@")
        base, plus, tag = local.partition("+")
        if plus and base in locals_ and tag.lower().startswith(CONFIRM_PREFIX):
            match = CONFIRM_TOKEN.fullmatch(tag)
            if match:
                found.append(match.group(1).lower())
    found += [m.group(1).lower() for m in CONFIRM_TOKEN.finditer(message.subject or "")]
    return list(dict.fromkeys(found))


def check_confirmation(message: Message, classification: Classification, token: str, request: dict | None,
                       now: datetime) -> Confirmation:
    """Judge a confirmation of a request: only its requester, only once, only in time, only a person.

    - unknown: no request waits for this token; used: the request is no longer awaiting verification;
    - machine: an auto-reply or a bounce that carries the token (an out-of-office answering our request
      for confirmation must not confirm it);
    - other-address: the confirmation does not come from the address the request came from (Reply-To and
      addresses in the body count for nothing);
    - expired: the token's time has passed.
    """
    if request is None:
        return Confirmation(token, "unknown")
    found = dict(request_id=request["id"], reference=request.get("reference") or "", kind=request["kind"])
    if request["status"] != "awaiting-verification":
        return Confirmation(token, "used", **found)
    if classification.machine or classification.reason in ("auto-reply", "bounce") or message.malformed:
        return Confirmation(token, "machine", **found)
    if not message.sender or normalise_address(message.sender) != request["address"]:
        return Confirmation(token, "other-address", **found)
    expires = request.get("token_expires_at")
    if expires and datetime.fromisoformat(expires) < now:
        return Confirmation(token, "expired", **found)
    return Confirmation(token, "valid", **found)


def may_auto_reply(message: Message, classification: Classification, own_addresses: tuple[str, ...] = ()) -> tuple[bool, str | None]:
    """Say whether a reply is safe from loops and backscatter, and if not, why.

    Never reply when (RFC 3834 §2, and against backscatter):
    - the message is machine mail: a bounce, report, auto-reply, list mail or a client's unsubscribe button;
    - Auto-Submitted is present and not "no"; Precedence is bulk, junk, list or auto_reply;
    - any List-* header is present;
    - X-Auto-Response-Suppress asks for no auto-replies (Microsoft's equivalent);
    - the return path is null, there is no sender, or the sender is a daemon or no-reply address;
    - the sender is one of our own addresses;
    - no To or Cc is visible (the mail came as Bcc, as bulk mail does);
    - the message could not be parsed.
    """
    if classification.machine:
        return False, f"machine mail ({classification.reason})"
    auto_submitted = (message.header("auto-submitted") or "").strip().lower()
    if auto_submitted and not auto_submitted.startswith("no"):
        return False, "Auto-Submitted"
    precedence = (message.header("precedence") or "").strip().lower()
    if precedence in ("bulk", "junk", "list", "auto_reply", "auto-reply"):
        return False, f"Precedence: {precedence}"
    if any(message.has_header(name) for name in LIST_HEADERS):
        return False, "List-* header"
    suppress = (message.header("x-auto-response-suppress") or "").lower()
    if any(word in suppress for word in ("all", "autoreply", "oof")):
        return False, "X-Auto-Response-Suppress"
    if message.return_path == "" or message.envelope_sender == "":
        return False, "null return path"
    if not message.sender or "@" not in message.sender:
        return False, "no sender"
    if is_machine_sender(sender_local_part(message.sender)):
        return False, "daemon or no-reply sender"
    own = {normalise_address(a) for a in own_addresses}
    if message.sender in own:
        return False, "our own address"
    if not message.recipients:
        return False, "no To or Cc (Bcc)"
    if message.malformed:
        return False, "malformed"
    return True, None


def mailbox_folder(classification: Classification, review_reasons: tuple[str, ...], action: str = "") -> str | None:
    """Say where a processed message is filed: None for the review folder, else the name of its kind.

    A confirmation of a request (action "verify") is filed as "confirmed", whatever its words; mail a person
    should read (`other` for one of the review reasons: unclear, question, malformed …) goes to review;
    everything else is filed by kind.
    """
    if action == "verify":
        return "confirmed"
    if classification.kind is Kind.OTHER and classification.reason in review_reasons:
        return None
    return classification.kind.value


def request_reference(kind: Kind, key: str) -> str:
    """Return the reference of the request a message opens: a letter for its kind and eight characters."""
    code = base64.b32encode(hashlib.sha256(f"{kind.value}\x1f{key}".encode()).digest()).decode()[:8]
    return f"{'A' if kind is Kind.ACCESS else 'D'}-{code}"


def complainant(message: Message) -> str | None:
    """Return the recipient a feedback report (RFC 5965) complains about, or None."""
    report = message.report
    candidates: list[str] = []
    if report is not None:
        candidates += [report.field(name) or "" for name in COMPLAINANT_FIELDS]
    enclosed = dict(message.enclosed_headers)
    candidates += [enclosed.get(name, "") for name in COMPLAINANT_HEADERS]
    for value in candidates:
        value = value.strip()
        if value.lower().startswith("rfc822;"):
            value = value[7:].strip()
        if "<" in value:
            value = value[value.index("<") + 1:].split(">", 1)[0]
        value = value.split(",")[0].strip()
        if "@" in value and " " not in value and "redacted" not in value.lower():
            return normalise_address(value)
    return None


def decide(message: Message, classification: Classification, history: History, now: datetime,
           rules: Rules = Rules(), token: TokenMatch | None = None, confirmation: Confirmation | None = None,
           new_token: str = "") -> Decision:
    """Decide the effects of one message.

    - opt-out: suppress the sender in each scope not already suppressed (`all` covers every scope);
    - access: open a request, unless one of that kind is open already;
    - deletion: suppress the sender (`all`) at once and open a request;
    - an ARF complaint: suppress the complaining recipient (`all`, reason complaint);
    - mail to unsubscribe+TOKEN@ with a valid token: suppress the token's address on the token's list, whoever
      sent it (forwarding, aliases), unless the words ask for something else; a forged, expired or unknown
      token acts for nobody, and the mail is judged on its words like any other;
    - a valid confirmation (privacy+confirm-TOKEN@, from the requester): verify the request, nothing else;
      a confirmation that fails acts for nobody and the mail is judged on its words;
    - a new access or deletion request waits for verification: `new_token` (random, from the caller) goes
      into the acknowledgement, which asks the requester to confirm by replying;
    - anything else: no effect.
    """
    if confirmation is not None and confirmation.status == "valid":
        return Decision("verify", may_reply=False, no_reply_reason="confirmation of a request",
                        notes=(f"confirms {confirmation.reference or confirmation.request_id}",),
                        verify=(confirmation.request_id,))
    if token is not None and token.status == "valid" and (
            classification.kind is Kind.OPT_OUT
            or (classification.kind is Kind.OTHER and classification.reason in ("unclear", "empty", "question"))):
        return _token_decision(message, classification, token)
    may_reply, no_reply_reason = may_auto_reply(message, classification, rules.own_addresses)
    if may_reply and classification.kind is Kind.OTHER and not rules.reply_to_other:
        may_reply, no_reply_reason = False, "replies to other are off"
    if may_reply and history.replies_today >= rules.daily_reply_cap:
        may_reply, no_reply_reason = False, f"daily reply cap ({rules.daily_reply_cap}) reached"
    kind = classification.kind
    quiet = dict(may_reply=False, no_reply_reason=no_reply_reason or "machine mail")
    if kind is Kind.OTHER and classification.reason == "complaint":
        address = complainant(message)
        if address is None:
            return Decision("nothing", notes=("complaint names no recipient",), **quiet)
        if Scope.ALL in history.suppressed_scopes:
            return Decision("nothing", notes=("already suppressed",), **quiet)
        return Decision("suppress", (Suppress(address, address, Scope.ALL, "complaint"),), **quiet)
    if kind is Kind.OTHER:
        return Decision("nothing", **_reply(message, classification, history, rules, (), may_reply,
                                              no_reply_reason, ()))
    if not message.sender or "@" not in message.sender:
        return Decision("nothing", notes=("no sender address to act on",), may_reply=False,
                        no_reply_reason="no sender")
    display = message.sender_display or message.sender
    scopes = classification.scopes or (Scope.ALL,)
    if kind is Kind.DELETION:
        scopes = (Scope.ALL,)
    suppressions: tuple[Suppress, ...] = ()
    if kind in (Kind.OPT_OUT, Kind.DELETION) and Scope.ALL not in history.suppressed_scopes:
        reason = "deletion" if kind is Kind.DELETION else classification.reason
        suppressions = tuple(Suppress(message.sender, display, scope, reason) for scope in scopes
                             if scope not in history.suppressed_scopes)
    requests: tuple[OpenRequest, ...] = ()
    reissue: tuple[OpenRequest, ...] = ()
    notes: tuple[str, ...] = ()
    if kind in (Kind.ACCESS, Kind.DELETION):
        waiting = {k: (reference, due) for k, reference, due in history.awaiting}
        if kind.value in waiting and new_token:
            # Asked again before confirming: the acknowledgement was probably lost. Send it again with a
            # fresh token (the old one stops working), under the same reference and due date.
            reference, due = waiting[kind.value]
            reissue = (OpenRequest(kind, message.sender, display, due, classification.flags, classification.language,
                                   reference, None, rules.jurisdiction, new_token,
                                   now + timedelta(days=rules.verify_days)),)
            notes = (f"{reference} asked again before it was confirmed",)
        elif kind.value in history.open_requests:
            notes = (f"an {kind.value} request is already open",)
        else:
            ack_due, due = request_deadlines(now, rules, "child" in classification.flags)
            requests = (OpenRequest(kind, message.sender, display, due, classification.flags, classification.language,
                                    request_reference(kind, message.key), ack_due, rules.jurisdiction, new_token,
                                    now + timedelta(days=rules.verify_days) if new_token else None),)
    reply = _reply(message, classification, history, rules, requests or reissue, may_reply, no_reply_reason, notes)
    if reply.get("reply") is None:
        reissue = ()  # a fresh token nobody is told of would only disable the one the requester has
    if not suppressions and not requests and not reissue:
        return Decision("nothing", notes=notes or ("already suppressed",), **reply)
    action = "+".join(a for a, present in (("suppress", suppressions), ("open-request", requests),
                                           ("reissue", reissue)) if present)
    return Decision(action, suppressions, requests, notes=notes, reissue=reissue, **reply)


def _token_decision(message: Message, classification: Classification, token: TokenMatch) -> Decision:
    """Suppress the token's address on the token's list; a confirmation only goes to that same address."""
    suppression = Suppress(token.address, token.address, token.list_name, "list-unsubscribe")
    quiet = dict(may_reply=False, no_reply_reason="unsubscribed by token")
    return Decision("suppress", (suppression,), notes=(f"token for list {token.list_name}",), **quiet)


def _reply(message: Message, classification: Classification, history: History, rules: Rules,
           requests: tuple[OpenRequest, ...], may_reply: bool, no_reply_reason: str | None,
           notes: tuple[str, ...]) -> dict:
    """Return the reply part of a decision: at most one reply of a kind per address per day."""
    kind = classification.kind
    if not may_reply:
        return dict(may_reply=False, no_reply_reason=no_reply_reason)
    if kind in (Kind.ACCESS, Kind.DELETION) and not requests:
        return dict(may_reply=False, no_reply_reason=notes[0] if notes else "no new request")
    if kind.value in history.replied_today:
        return dict(may_reply=False, no_reply_reason=f"already answered a {kind.value} today")
    request = requests[0] if requests else None
    scopes = tuple(classification.scopes) if kind is Kind.OPT_OUT else (classification.reason,)
    reply = Reply(kind.value, message.sender, message.sender_display or message.sender,
                  classification.language or "en", scopes, request.reference if request else "",
                  request.due_at if request else None, classification.flags,
                  request.token if request else "", request.token_expires_at if request else None)
    return dict(may_reply=True, no_reply_reason=None, reply=reply)
