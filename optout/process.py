"""process(raw, source, store, pipeline, now) -> Outcome: the single entry every source calls."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime

from optout.classify import classify
from optout.lexicon import Lexicon
from optout.errors import StoreError
from optout.model import Classification, Decision, Kind, Message
from optout.parse import parse_message
from optout.policy import Rules, decide
from optout.replies import Rendered, render_reply
from optout.store import Store


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
    if store.seen(message.key):
        decision = Decision("duplicate", notes=("already in the ledger",))
        return Outcome(message.key, source, True, message, classification, decision)
    history = store.history(message.sender, now)
    decision = decide(message, classification, history, now, pipeline.rules)
    rendered = None
    if decision.reply is not None and pipeline.templates is not None:
        try:
            rendered = render_reply(decision.reply, message, pipeline.templates, pipeline.reply_from, now,
                                    pipeline.organisation)
        except Exception as error:  # a broken template costs the reply, never the suppression
            log.error("reply to %s not rendered: %s: %s", message.key[:60], type(error).__name__, str(error)[:200])
    recorded = store.record(message, classification, decision, source, now, rendered)
    return Outcome(message.key, source, recorded.duplicate, message, classification, decision, recorded.request_ids,
                   None if recorded.duplicate else rendered)


# ---------------------------------------------------------------- parallel examination

_WORKER: Pipeline | None = None


def _start_worker(lexicon_dir: str | None, unsubscribe_addresses: tuple[str, ...], parent: int) -> None:
    global _WORKER
    import threading
    from pathlib import Path

    from optout.lexicon import load_lexicon

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    lexicon = load_lexicon(Path(lexicon_dir)) if lexicon_dir else load_lexicon()
    _WORKER = Pipeline(lexicon, unsubscribe_addresses)


def _exit_with(parent: int) -> None:
    # A worker outlives nothing: when its parent dies (kill -9 included), it exits within a second.
    import os
    import time

    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(0)


def _examine_in_worker(raw: bytes, envelope_sender: str | None = None, envelope_recipients: tuple[str, ...] = ()):
    try:
        return examine(raw, _WORKER, envelope_sender, envelope_recipients)
    except Exception as error:  # the writer records it for review; a worker must not die on one message
        return error


class Examiner:
    """Parse and classify in worker processes (both are pure), while one writer decides and records.

    Parsing and classifying are most of the work; on a machine with several cores a backlog goes through
    faster this way. Workers are spawned (never forked from a threaded parent) and exit with their parent.
    """

    def __init__(self, lexicon_dir: str | None, unsubscribe_addresses: tuple[str, ...], workers: int | None = None):
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2, mp_context=context,
                                        initializer=_start_worker,
                                        initargs=(lexicon_dir, unsubscribe_addresses, os.getpid()))

    async def examine_one(self, raw: bytes, envelope_sender: str | None, envelope_recipients: tuple[str, ...]):
        """Examine one message in a worker, from the event loop."""
        import asyncio
        from functools import partial

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(_examine_in_worker, raw, envelope_sender,
                                                             envelope_recipients))

    def examine_many(self, raws: list[bytes]):
        """Yield (Message, Classification) per raw message, in order, as workers finish them (an exception
        where one failed): the writer starts on the first while the workers go on with the rest."""
        return self.pool.map(_examine_in_worker, raws, chunksize=8)

    def close(self) -> None:
        """Stop the workers."""
        self.pool.shutdown(wait=True, cancel_futures=True)


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

    def checkpoint(self, source: str) -> tuple[int, int] | None:
        """Return how far a mailbox source has got."""
        return self.store.checkpoint(source)

    def set_checkpoint(self, source: str, uidvalidity: int, last_uid: int) -> None:
        """Remember how far a mailbox source has got (not in a dry run)."""
        if not self.dry_run:
            self.store.set_checkpoint(source, uidvalidity, last_uid, self.clock())
