"""process(raw, source, store, pipeline, now) -> Outcome: the single entry every source calls."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from optout.classify import classify, is_unsubscribe_address
from optout.errors import StoreError
from optout.fulfil import Fulfilment, fulfil, hold
from optout.lexicon import Lexicon
from optout.model import Classification, Confirmation, Decision, Kind, Message, TokenMatch
from optout.parse import parse_message
from optout.policy import Rules, check_confirmation, confirm_tokens, decide, mailbox_folder
from optout.replies import Rendered, render_reply
from optout.store import Store
from optout.tokens import TOKEN_LENGTH, new_confirmation_token, verify_token


log = logging.getLogger("optout.process")


@dataclass(frozen=True)
class Pipeline:
    """What processing needs besides the store: the phrase tables, our unsubscribe addresses, the rules."""

    lexicon: Lexicon
    unsubscribe_addresses: tuple[str, ...] = ("unsubscribe@*",)
    rules: Rules = Rules()
    templates: object = None  # a Jinja2 environment; None: no replies are rendered
    reply_from: str = "privacy@example.com"
    organisation: str = ""
    token_key: bytes | None = field(default=None, repr=False)  # signs unsubscribe tokens; None: tokens act for nobody
    token_max_age_days: int = 365
    privacy_addresses: tuple[str, ...] = ("privacy@example.com",)  # where privacy+confirm-TOKEN@ confirmations arrive
    fulfilment: Fulfilment | None = None  # None: verified requests wait for `optout requests fulfil`


@dataclass(frozen=True)
class Outcome:
    """What happened to one message."""

    key: str
    source: str
    duplicate: bool
    message: Message
    classification: Classification
    decision: Decision
    request_ids: tuple[int, ...] = ()
    reply: Rendered | None = None
    recorded_action: str = ""  # a duplicate: what was done when the message was first recorded

    def filed_as(self, review_reasons: tuple[str, ...]) -> str | None:
        """Return the kind a mailbox files this message under, or None for the review folder (policy decides).

        A duplicate (a crash between the commit and the move) is filed as it would have been the first time.
        """
        action = self.recorded_action if self.duplicate else self.decision.action
        return mailbox_folder(self.classification, review_reasons, action)


def examine(raw: bytes, pipeline: Pipeline, envelope_sender: str | None = None,
            envelope_recipients: tuple[str, ...] = ()) -> tuple[Message, Classification]:
    """Parse and classify raw mail without deciding or writing anything."""
    message = parse_message(raw, envelope_sender, envelope_recipients)
    return message, classify(message, pipeline.lexicon, pipeline.unsubscribe_addresses)


def process(raw: bytes, source: str, store: Store, pipeline: Pipeline, now: datetime,
            envelope_sender: str | None = None, envelope_recipients: tuple[str, ...] = ()) -> Outcome:
    """Parse, classify, decide and record one message, exactly once.

    A message whose key is already in the ledger has no effects; the caller acknowledges it all the same.
    """
    message, classification = examine(raw, pipeline, envelope_sender, envelope_recipients)
    return complete(message, classification, source, store, pipeline, now)


def complete(message: Message, classification: Classification, source: str, store: Store, pipeline: Pipeline,
             now: datetime) -> Outcome:
    """Decide, render and record a message already parsed and classified (the writer's half of `process`)."""
    earlier = store.recorded_action(message.key)
    if earlier is not None:
        decision = Decision("duplicate", notes=("already in the ledger",))
        return Outcome(message.key, source, True, message, classification, decision, recorded_action=earlier)
    token = check_token(message, store, pipeline, now)
    confirmation = check_confirm_token(message, classification, store, pipeline, now)
    history = store.history(token.address if token and token.status == "valid" else message.sender, now)
    new_token = new_confirmation_token() if classification.kind in (Kind.ACCESS, Kind.DELETION) else ""
    decision = decide(message, classification, history, now, pipeline.rules, token, confirmation, new_token)
    rendered = None
    if decision.reply is not None and pipeline.templates is not None:
        try:
            rendered = render_reply(decision.reply, message, pipeline.templates, pipeline.reply_from, now,
                                    pipeline.organisation)
        except Exception as error:  # a broken template costs the reply, never the suppression
            log.error("reply to %s not rendered: %s: %s", message.key[:60], type(error).__name__, str(error)[:200])
    recorded = store.record(message, classification, decision, source, now, rendered)
    if decision.verify and not recorded.duplicate and pipeline.fulfilment:
        act = fulfil if pipeline.fulfilment.automatic else hold
        for request_id in decision.verify:
            try:
                act(store, request_id, now, pipeline.fulfilment)
            except Exception as error:  # the confirmation is recorded (and acknowledged); a sweep fulfils it later
                log.error("request %s verified but not fulfilled: %s: %s", request_id, type(error).__name__,
                          str(error)[:200])
    return Outcome(message.key, source, recorded.duplicate, message, classification, decision, recorded.request_ids,
                   None if recorded.duplicate else rendered)


def look_up_token(token: str, store: Store, pipeline: Pipeline, today) -> TokenMatch:
    """Find whom a token was issued for and verify it: valid, forged, expired, unknown or malformed."""
    token = token.strip().lower()
    if len(token) != TOKEN_LENGTH:
        return TokenMatch(token, "malformed")
    mapping = store.token(token)
    if mapping is None or not pipeline.token_key:
        return TokenMatch(token, "unknown")
    address, list_name = mapping
    verdict = verify_token(pipeline.token_key, token, address, list_name, today, pipeline.token_max_age_days)
    return TokenMatch(token, verdict.status, address, list_name)


def check_token(message: Message, store: Store, pipeline: Pipeline, now: datetime) -> TokenMatch | None:
    """Find an unsubscribe token in a recipient (unsubscribe+TOKEN@…) and check it; audit one that fails."""
    candidates = [a.rpartition("@")[0].partition("+")[2] for a in message.all_recipients
                  if is_unsubscribe_address(a, pipeline.unsubscribe_addresses) and "+" in a.rpartition("@")[0]]
    candidates = [c for c in candidates if len(c) == TOKEN_LENGTH]
    if not candidates:
        return None
    match = look_up_token(candidates[0], store, pipeline, now.date())
    if match.status != "valid":
        store.audit_event("token.invalid", message.sender, message.key, {"status": match.status}, now)
    return match


def check_confirm_token(message: Message, classification: Classification, store: Store, pipeline: Pipeline,
                       now: datetime) -> Confirmation | None:
    """Find a confirmation token (privacy+confirm-TOKEN@ or the subject) and judge it; audit one that fails."""
    tokens = confirm_tokens(message, pipeline.privacy_addresses)
    if not tokens:
        return None
    confirmation = check_confirmation(message, classification, tokens[0], store.request_by_token(tokens[0]), now)
    if confirmation.status != "valid":
        store.audit_event("confirmation.refused", message.sender, message.key,
                          {"status": confirmation.status, "request": confirmation.reference}, now)
    return confirmation


def record_failure(raw: bytes, source: str, store: Store, now: datetime, error: BaseException) -> Outcome:
    """Record a message that could not be processed as `other`/`error`, so that a person reviews it.

    Its key is the hash of its bytes alone: once the cause is fixed, the same mail fed again is processed
    normally. The error's type and text go to the ledger, never the message.
    """
    message = Message(sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), malformed=True,
                      defects=(f"processing failed: {type(error).__name__}",))
    classification = Classification(Kind.OTHER, "error", f"error.{type(error).__name__}", 0.0,
                                    evidence=(str(error)[:200],))
    decision = Decision("nothing", notes=("processing failed; left for review",), no_reply_reason="processing failed")
    recorded = store.record(message, classification, decision, source, now)
    return Outcome(message.key, source, recorded.duplicate, message, classification, decision)


class Intake:
    """The single writer: every source hands raw mail to `submit`, which commits before it returns.

    In the daemon one thread owns an Intake (SQLite has one writer); sources reach it through that thread.
    With `dry_run`, mail is classified and decided but nothing is written.
    """

    def __init__(self, store: Store, pipeline: Pipeline, clock=None, dry_run: bool = False) -> None:
        from datetime import timezone

        self.store = store
        self.pipeline = pipeline
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.dry_run = dry_run

    def submit(self, raw: bytes, source: str, envelope_sender: str | None = None,
               envelope_recipients: tuple[str, ...] = (), keep_failures: bool = False) -> Outcome:
        """Process one message (or, dry, only judge it) and return what happened.

        With `keep_failures` (a mailbox, where the message itself stays), a message that makes processing
        fail is recorded for review instead of stopping the run; otherwise (SMTP) the error is raised, so
        that the sender is told to try again and nothing is lost.
        """
        now = self.clock()
        if not self.dry_run:
            return self._guarded(lambda: process(raw, source, self.store, self.pipeline, now, envelope_sender,
                                                 envelope_recipients), raw, source, now, keep_failures)
        message, classification = examine(raw, self.pipeline, envelope_sender, envelope_recipients)
        decision = decide(message, classification, self.store.history(message.sender, now), now, self.pipeline.rules)
        return Outcome(message.key, source, self.store.seen(message.key), message, classification, decision)

    def submit_examined(self, raw: bytes, examined, source: str, envelope_sender: str | None = None,
                        envelope_recipients: tuple[str, ...] = (), keep_failures: bool = True) -> Outcome:
        """Complete a message a worker has parsed and classified; `examined` may be the worker's exception."""
        if isinstance(examined, Exception) or self.dry_run:
            return self.submit(raw, source, envelope_sender, envelope_recipients, keep_failures)
        message, classification = examined
        now = self.clock()
        return self._guarded(lambda: complete(message, classification, source, self.store, self.pipeline, now),
                             raw, source, now, keep_failures)

    def _guarded(self, work, raw: bytes, source: str, now: datetime, keep_failures: bool) -> Outcome:
        try:
            return work()
        except StoreError:
            raise
        except Exception as error:
            if not keep_failures:
                raise
            log.error("message from %s could not be processed: %s: %s (left for review)", source,
                      type(error).__name__, str(error)[:200])
            return record_failure(raw, source, self.store, now, error)

    def check_token(self, token: str) -> TokenMatch:
        """Look a token up and verify it, writing nothing (what the one-click page shows)."""
        return look_up_token(token, self.store, self.pipeline, self.clock().date())

    def unsubscribe_token(self, token: str) -> TokenMatch:
        """Unsubscribe a valid token's address from its list (RFC 8058 one-click); audit a token that fails."""
        match = self.check_token(token)
        now = self.clock()
        if match.status == "valid":
            self.store.add_suppressions([(match.address, match.address, match.list_name, "one-click")], now, "web")
        else:
            self.store.audit_event("token.invalid", None, None, {"status": match.status, "source": "web"}, now)
        return match

    def checkpoint(self, source: str) -> tuple[int, int] | None:
        """Return how far a mailbox source has got."""
        return self.store.checkpoint(source)

    def set_checkpoint(self, source: str, uidvalidity: int, last_uid: int) -> None:
        """Remember how far a mailbox source has got (not in a dry run)."""
        if not self.dry_run:
            self.store.set_checkpoint(source, uidvalidity, last_uid, self.clock())
