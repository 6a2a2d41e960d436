"""The asyncio composition root: the SMTP endpoint, the IMAP watcher and one SQLite writer, with clean shutdown.

- One writer: a single thread owns the store; the SMTP handler awaits it, the IMAP thread waits on it.
- SIGTERM/SIGINT stop listening, let the message in flight finish and commit, then exit.
- One log line per message: key, source, kind, action. Never a body, never a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from optout.classify import is_unsubscribe_address
from optout.config import Settings, parse_listen
from optout.errors import LockedError, StoreError
from optout.model import normalise_address
from optout.outbox import FlushSummary, MaildirTransport, RelayTransport, flush, relay_settings
from optout.signing import dkim_signer
from optout.policy import Rules
from optout.examiner import Examiner
from optout.fulfil import Fulfilment, sweep
from optout.process import Intake, Outcome, Pipeline
from optout.sources.imap import ImapSettings, ImapSource, imap_settings
from optout.sources.smtp import PrivacyHandler, SmtpLimits, start_server
from optout.store import Store

log = logging.getLogger("optout")


def make_pipeline(settings: Settings) -> Pipeline:
    """Build what processing needs from the settings: phrase tables, rules, reply templates."""
    from optout.lexicon import load_lexicon
    from optout.replies import template_environment

    lexicon = load_lexicon(Path(settings.lexicon_dir)) if settings.lexicon_dir else load_lexicon()
    rules = Rules(own_addresses=settings.privacy_addresses + settings.own_addresses + (settings.sender,),
                  request_days=settings.request_days, child_request_days=settings.child_request_days,
                  reply_to_other=settings.reply_to_other, daily_reply_cap=settings.daily_reply_cap,
                  jurisdiction=settings.jurisdiction, verify_days=settings.verify_days)
    templates = template_environment(Path(settings.templates_dir) if settings.templates_dir else None)
    return Pipeline(lexicon, settings.unsubscribe_addresses, rules, templates=templates, reply_from=settings.sender,
                    organisation=settings.organisation, token_key=settings.token_key,
                    token_max_age_days=settings.token_max_age_days, privacy_addresses=settings.privacy_addresses,
                    fulfilment=make_fulfilment(settings, templates))


def make_fulfilment(settings: Settings, templates) -> Fulfilment:
    """Build what fulfilling requests needs: templates, sender, contact tables, automatic or held."""
    return Fulfilment(templates, settings.sender, settings.organisation, settings.contact_tables,
                      settings.contacts_database, automatic=settings.fulfil == "automatic")


def make_transport(settings: Settings):
    """Return where replies go: the relay when one is configured, else the maildir of sent mail."""
    if settings.relay_url:
        return RelayTransport(relay_settings(settings.relay_url, settings.relay_username, settings.relay_password,
                                             settings.relay_timeout, settings.relay_data_timeout))
    return MaildirTransport(settings.sent_maildir)


def make_signer(settings: Settings):
    """Return the DKIM signer when a key is configured, else None."""
    if settings.dkim_key_file and settings.dkim_selector:
        return dkim_signer(settings.dkim_selector, settings.dkim_domain or settings.sender.rpartition("@")[2],
                           settings.dkim_key_file)
    return None


def flush_outbox(settings: Settings, store, clock) -> FlushSummary:
    """Deliver the due replies once."""
    return flush(store, make_transport(settings), clock, settings.reply_hourly_cap, signer=make_signer(settings))


def log_outcome(outcome: Outcome) -> None:
    """Log one line for a processed message."""
    c = outcome.classification
    action = "duplicate" if outcome.duplicate else outcome.decision.action
    log.info("message key=%s source=%s kind=%s reason=%s action=%s", outcome.key[:80], outcome.source,
             c.kind.value, c.reason, action)


def recipient_filter(settings: Settings):
    """Return the predicate of addresses the endpoint accepts: our privacy and unsubscribe addresses, +tags too."""
    exact = {normalise_address(a) for a in settings.privacy_addresses}
    patterns = tuple(settings.privacy_addresses) + tuple(settings.unsubscribe_addresses)

    def accepts(address: str) -> bool:
        address = normalise_address(address)
        return address in exact or is_unsubscribe_address(address, patterns)

    return accepts


def settings_for_imap(settings: Settings, dry_run: bool = False) -> ImapSettings | None:
    """Return the IMAP settings, or None when no mailbox is configured."""
    if not settings.imap_url:
        return None
    return imap_settings(settings.imap_url, settings.imap_password, processed_folder=settings.imap_processed_folder,
                         review_folder=settings.imap_review_folder, review_reasons=settings.imap_review_reasons,
                         batch_size=settings.imap_batch_size, poll_seconds=settings.imap_poll_seconds,
                         max_message_bytes=settings.imap_max_message_bytes,
                         dry_run=dry_run)


@contextlib.contextmanager
def run_lock(path: str):
    """Hold an exclusive lock file for the length of a run; a second run is refused at once."""
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LockedError(f"another optout run is in progress (pid {holder}, lock {lock_path})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()


class ThreadedSink:
    """Hand work to the writer thread and wait for it: what the IMAP thread talks to."""

    def __init__(self, writer: ThreadPoolExecutor, intake: Intake) -> None:
        self.writer = writer
        self.intake = intake

    def submit(self, raw, source, envelope_sender=None, envelope_recipients=(), keep_failures=False):
        """Process on the writer thread."""
        return self.writer.submit(self.intake.submit, raw, source, envelope_sender, envelope_recipients,
                                  keep_failures).result()

    def checkpoint(self, source):
        """Read a checkpoint on the writer thread."""
        return self.writer.submit(self.intake.checkpoint, source).result()

    def set_checkpoint(self, source, uidvalidity, last_uid):
        """Write a checkpoint on the writer thread."""
        return self.writer.submit(self.intake.set_checkpoint, source, uidvalidity, last_uid).result()


class WriterProxy:
    """Run a store's methods on the writer thread: what the outbox worker talks to."""

    def __init__(self, writer: ThreadPoolExecutor, store: Store) -> None:
        self.writer = writer
        self.store = store

    def __getattr__(self, name: str):
        method = getattr(self.store, name)
        return lambda *args, **kwargs: self.writer.submit(method, *args, **kwargs).result()


class Daemon:
    """SMTP endpoint + IMAP watcher + writer, started and stopped together."""

    def __init__(self, settings: Settings, pipeline: Pipeline, clock=None, parallel: bool = True) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.clock = clock
        self.parallel = parallel
        self.examiner: Examiner | None = None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optout-writer")
        self.stopping = threading.Event()
        self.server: asyncio.base_events.Server | None = None
        self.imap_thread: threading.Thread | None = None
        self.in_flight = 0
        self.address: tuple[str, int] | None = None
        self.outbox_wake = threading.Event()
        self.outbox_thread: threading.Thread | None = None
        self.outbox_interval = 15.0
        self.sweep_interval = 300.0

    def _open(self) -> Intake:
        return Intake(Store(self.settings.database), self.pipeline, self.clock)

    async def start(self) -> None:
        """Open the store on the writer thread, listen for SMTP, start watching IMAP."""
        loop = asyncio.get_running_loop()
        self.intake = await loop.run_in_executor(self.writer, self._open)
        if self.parallel and self.settings.workers > 0 and (os.cpu_count() or 1) > 1:
            self.examiner = Examiner(self.settings.lexicon_dir, self.settings.unsubscribe_addresses,
                                     workers=self.settings.workers)

        async def submit(raw: bytes, mail_from: str, recipients: tuple[str, ...]):
            self.in_flight += 1
            try:
                if self.examiner is not None and self.in_flight > 1:
                    # Several messages at once: parse and classify on another core, only deciding and
                    # recording wait for the writer. One at a time, the round trip to a worker costs more
                    # than it saves.
                    examined = await self.examiner.examine_one(raw, mail_from, recipients)
                    outcome = await loop.run_in_executor(self.writer, partial(
                        self.intake.submit_examined, raw, examined, "smtp", mail_from, recipients, False))
                else:
                    outcome = await loop.run_in_executor(self.writer, self.intake.submit, raw, "smtp", mail_from,
                                                         recipients)
            finally:
                self.in_flight -= 1
            log_outcome(outcome)
            if outcome.reply is not None:
                self.outbox_wake.set()
            return outcome

        s = self.settings
        limits = SmtpLimits(s.smtp_max_message_bytes, s.smtp_max_recipients, s.smtp_command_timeout,
                            s.smtp_session_timeout, s.smtp_max_connections, s.smtp_max_connections_per_ip)
        handler = PrivacyHandler(submit, recipient_filter(s), limits, lmtp=s.smtp_lmtp)
        host, port = parse_listen(s.smtp_listen)
        try:
            self.server = await start_server(handler, host, port, limits, lmtp=s.smtp_lmtp)
        except OSError as error:
            raise StoreError(f"cannot listen on {s.smtp_listen}: {error.strerror or error}") from None
        self.address = self.server.sockets[0].getsockname()[:2]
        log.info("%s endpoint listening on %s:%s", "LMTP" if s.smtp_lmtp else "SMTP", *self.address)
        self.web_runner = None
        if s.web_listen:
            from optout.sources.web import make_app, start_web

            async def on_writer(method, token: str):
                match = await loop.run_in_executor(self.writer, method, token)
                return match.status, match.address, match.list_name

            app = make_app(partial(on_writer, self.intake.check_token), partial(on_writer, self.intake.unsubscribe_token))
            web_host, web_port = parse_listen(s.web_listen)
            try:
                self.web_runner, self.web_address = await start_web(app, web_host, web_port)
            except OSError as error:
                raise StoreError(f"cannot listen on {s.web_listen}: {error.strerror or error}") from None
            log.info("one-click endpoint listening on http://%s:%s/u/", *self.web_address)
        self.outbox_thread = threading.Thread(target=self._outbox_loop, name="optout-outbox", daemon=True)
        self.outbox_thread.start()
        imap = settings_for_imap(s)
        if imap is not None:
            def on_imap_outcome(outcome: Outcome) -> None:
                log_outcome(outcome)
                if outcome.reply is not None:
                    self.outbox_wake.set()

            source = ImapSource(imap, ThreadedSink(self.writer, self.intake), self.stopping, on_outcome=on_imap_outcome)
            self.imap_thread = threading.Thread(target=source.watch, name="optout-imap", daemon=True)
            self.imap_thread.start()
        else:
            log.info("no IMAP mailbox configured: SMTP only")

    def _outbox_loop(self) -> None:
        """Deliver due replies now and then, and whenever one was queued; until stopped."""
        from datetime import datetime, timezone

        clock = self.clock or (lambda: datetime.now(timezone.utc))
        proxy = WriterProxy(self.writer, self.intake.store)
        swept_at = 0.0
        while not self.stopping.is_set():
            self.outbox_wake.clear()
            if self.pipeline.fulfilment is not None and time.monotonic() - swept_at >= self.sweep_interval:
                swept_at = time.monotonic()
                try:  # expire unconfirmed requests, fulfil confirmed ones left behind: on the writer thread
                    self.writer.submit(sweep, self.intake.store, clock(), self.pipeline.fulfilment).result()
                except Exception as error:
                    log.warning("requests: %s: %s", type(error).__name__, str(error)[:200])
            try:
                flush_outbox(self.settings, proxy, clock)
            except Exception as error:  # the outbox must never take the daemon down; it retries next round
                log.warning("outbox: %s: %s", type(error).__name__, str(error)[:200])
            self.outbox_wake.wait(self.outbox_interval)
            # A burst of requests wakes the outbox once a second, not once a message.
            self.stopping.wait(1.0)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let messages in flight commit, stop the IMAP watcher, close the store."""
        self.stopping.set()
        if self.server is not None:
            self.server.close()
        if getattr(self, "web_runner", None) is not None:
            await self.web_runner.cleanup()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.outbox_wake.set()
        for thread in (self.imap_thread, self.outbox_thread):
            if thread is not None:
                await loop.run_in_executor(None, thread.join, grace)
        await loop.run_in_executor(self.writer, self.intake.store.close)
        self.writer.shutdown(wait=True)
        if self.examiner is not None:
            await loop.run_in_executor(None, self.examiner.close)
        log.info("stopped")

    async def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, done.set)
        await self.start()
        await done.wait()
        log.info("signal received: finishing the message in flight")
        await self.stop()
