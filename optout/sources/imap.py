"""The privacy@ mailbox over IMAP (imapclient): batched BODY.PEEK fetches, UID checkpoints, move after commit, IDLE.

- Mail is read with BODY.PEEK[], so the \\Seen flag of a shared mailbox is never touched.
- A message is moved out of the watched folder only after its effects are committed; a crash between
  the two leaves it in place, and the next run finds it in the ledger and only moves it.
- Nothing is ever deleted but the one UID just copied elsewhere (COPY + \\Deleted + UID EXPUNGE, for
  servers without MOVE); without UIDPLUS the original stays, flagged \\Deleted, rather than risk an
  EXPUNGE of other messages a person flagged.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import unquote, urlsplit

import imapclient
from imapclient.exceptions import IMAPClientError, LoginError

from optout.errors import ConfigError, MailboxError, StoreError, one_line

log = logging.getLogger("optout.imap")
# What a lost or refused connection raises; not OSError as a whole, which a missing file raises too.
NETWORK_ERRORS = (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, ssl.SSLError, IMAPClientError,
                  imapclient.imaplib.IMAP4.abort, imapclient.imaplib.IMAP4.error, EOFError)


class Sink(Protocol):
    """Where the source hands mail: an Intake, directly or through the daemon's writer thread."""

    def submit(self, raw: bytes, source: str, envelope_sender: str | None = None,
               envelope_recipients: tuple[str, ...] = (), keep_failures: bool = False): ...

    def checkpoint(self, source: str) -> tuple[int, int] | None: ...

    def set_checkpoint(self, source: str, uidvalidity: int, last_uid: int) -> None: ...

    def submit_examined(self, raw: bytes, examined, source: str): ...


@dataclass(frozen=True)
class ImapSettings:
    """Where the mailbox is and how to file what was processed."""

    host: str
    username: str
    password: str = field(repr=False)
    port: int = 993
    security: str = "tls"  # tls | starttls | plain
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    review_folder: str = "Review"
    review_reasons: tuple[str, ...] = ("unclear", "question", "malformed", "subscribe", "empty", "error")
    batch_size: int = 500
    # Larger mail is never fetched: it goes to the review folder unread (SEARCH LARGER, RFC 3501 §6.4.4).
    max_message_bytes: int = 32 * 1024 * 1024
    poll_seconds: int = 60
    timeout: float = 60.0
    dry_run: bool = False

    @property
    def name(self) -> str:
        """Return the source name used for its checkpoint: user@host/folder."""
        return f"imap:{self.username}@{self.host}:{self.port}/{self.folder}"


def imap_settings(url: str, password: str | None, **options) -> ImapSettings:
    """Build settings from imap://user@host:port/FOLDER (imaps:// for TLS, imap+starttls:// for STARTTLS).

    Plain imap:// is refused except to a loopback host: a password never crosses a network in clear.
    """
    parsed = urlsplit(url)
    security = {"imaps": "tls", "imap+starttls": "starttls", "imap": "plain"}.get(parsed.scheme)
    if security is None or not parsed.hostname or not parsed.username:
        raise ConfigError("IMAP URL must look like imaps://user@host:993/INBOX")
    if security == "plain" and parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(f"imap:// (no TLS) is only allowed to a loopback host, not {parsed.hostname}; "
                          "use imaps:// or imap+starttls://")
    if password is None:
        raise ConfigError("no IMAP password: set OPTOUT_IMAP_PASSWORD or [imap] password_file")
    folder = unquote(parsed.path.lstrip("/")) or "INBOX"
    port = parsed.port or (993 if security == "tls" else 143)
    return ImapSettings(parsed.hostname, unquote(parsed.username), password, port, security, folder, **options)


@dataclass
class RunSummary:
    """What one pass over the mailbox did."""

    seen: int = 0
    processed: int = 0
    duplicates: int = 0
    moved: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class ImapSource:
    """Drain the watched folder into the sink, then file each message by its kind."""

    def __init__(self, settings: ImapSettings, sink: Sink, stop: threading.Event | None = None,
                 on_outcome: Callable[[object], None] | None = None, examiner_factory=None,
                 parallel_from: int = 200) -> None:
        self.settings = settings
        self.sink = sink
        # For a large backlog, parse and classify batches in worker processes (see process.Examiner).
        self.examiner_factory = examiner_factory
        self.parallel_from = parallel_from
        self.examiner = None
        self.stop = stop or threading.Event()
        self.on_outcome = on_outcome
        self.client: imapclient.IMAPClient | None = None
        self._folders: set[str] = set()
        self._delimiter = "/"

    # ------------------------------------------------------------ connection

    def connect(self) -> imapclient.IMAPClient:
        """Connect, log in and select the watched folder."""
        s = self.settings
        try:
            client = imapclient.IMAPClient(s.host, port=s.port, ssl=s.security == "tls", timeout=s.timeout)
            if s.security == "starttls":
                client.starttls(ssl.create_default_context())
            client.login(s.username, s.password)
        except LoginError as error:
            raise MailboxError(f"IMAP login as {s.username} at {s.host}:{s.port} refused: {one_line(error)}") from None
        except NETWORK_ERRORS as error:
            raise MailboxError(f"cannot reach IMAP server {s.host}:{s.port}: {one_line(error)}") from None
        try:
            listed = client.list_folders(pattern=s.folder)
            if listed:
                delimiter = listed[0][1]
                self._delimiter = delimiter.decode() if isinstance(delimiter, bytes) else (delimiter or "/")
            else:
                raise MailboxError(f"IMAP folder {s.folder!r} does not exist")
            self._folders = {name for _, _, name in client.list_folders()}
            client.select_folder(s.folder, readonly=s.dry_run)
        except NETWORK_ERRORS as error:
            raise MailboxError(f"IMAP folder {s.folder!r}: {one_line(error)}") from None
        self.client = client
        return client

    def close(self) -> None:
        """Log out, quietly, and stop the worker processes."""
        if self.examiner is not None:
            self.examiner.close()
            self.examiner = None
        if self.client is not None:
            try:
                self.client.logout()
            except Exception:  # the connection may already be gone; closing must not fail
                try:
                    self.client.shutdown()  # logout closes the socket only when the server answers
                except Exception:
                    pass
            self.client = None

    # ------------------------------------------------------------ one pass

    def folder_for(self, outcome) -> str:
        """Return the folder a processed message goes to: Processed<sep>KIND, or Review."""
        kind = outcome.filed_as(self.settings.review_reasons)
        if kind is None:
            return self.settings.review_folder
        return f"{self.settings.processed_folder}{self._delimiter}{kind}"

    def run_once(self) -> RunSummary:
        """Process every message in the watched folder, batch by batch; move each batch after its commits."""
        client = self.client or self.connect()
        s = self.settings
        summary = RunSummary()
        status = client.folder_status(s.folder, ["UIDVALIDITY"])
        uidvalidity = int(status[b"UIDVALIDITY"])
        checkpoint = self.sink.checkpoint(s.name)
        if checkpoint and checkpoint[0] != uidvalidity:
            log.warning("UIDVALIDITY of %s changed (%s -> %s): rescanning; the ledger skips what was done",
                        s.folder, checkpoint[0], uidvalidity)
        uids = sorted(client.search(["ALL"]))
        oversize = self._oversize() if uids else set()
        if self.examiner is None and self.examiner_factory is not None and len(uids) >= self.parallel_from:
            self.examiner = self.examiner_factory()
        for start in range(0, len(uids), s.batch_size):
            if self.stop.is_set():
                break
            batch = uids[start:start + s.batch_size]
            destinations: dict[str, list[int]] = {}
            done: list[int] = []
            unread = [uid for uid in batch if uid in oversize]
            if unread:
                destinations[s.review_folder] = unread
                done += unread
                batch = [uid for uid in batch if uid not in oversize]
            fetched = client.fetch(batch, ["BODY.PEEK[]"]) if batch else {}
            present = [uid for uid in batch if b"BODY[]" in fetched.get(uid, {})]  # others were expunged meanwhile
            results = None
            if self.examiner is not None and len(present) > 1:
                results = self.examiner.examine_many([fetched[uid][b"BODY[]"] for uid in present])
            for uid in present:
                if self.stop.is_set():
                    break
                raw = fetched[uid][b"BODY[]"]
                if results is not None:
                    try:
                        examined = next(results)
                    except Exception as error:  # a worker died: this message (and the rest) in-process
                        examined = error
                    outcome = self.sink.submit_examined(raw, examined, "imap")
                else:
                    outcome = self.sink.submit(raw, "imap", keep_failures=True)
                summary.seen += 1
                if outcome.duplicate:
                    summary.duplicates += 1
                else:
                    summary.processed += 1
                    kind = outcome.classification.kind.value
                    summary.kinds[kind] = summary.kinds.get(kind, 0) + 1
                if self.on_outcome:
                    self.on_outcome(outcome)
                destinations.setdefault(self.folder_for(outcome), []).append(uid)
                done.append(uid)
            if not s.dry_run:
                for folder, moving in destinations.items():
                    self._move(moving, folder)
                    summary.moved += len(moving)
                if done:
                    self.sink.set_checkpoint(s.name, uidvalidity, max(done))
        return summary

    def _oversize(self) -> set[int]:
        """Return the UIDs of the messages larger than the limit, warning about each (never reading one)."""
        limit = self.settings.max_message_bytes
        found = set(self.client.search(["LARGER", limit]))
        for uid in sorted(found):
            log.warning("IMAP message UID %s is larger than %s bytes: left unread for review", uid, limit)
        return found

    def _ensure_folder(self, folder: str) -> None:
        if folder in self._folders:
            return
        client = self.client
        try:
            client.create_folder(folder)
        except IMAPClientError as error:
            if not client.folder_exists(folder):
                raise MailboxError(f"cannot create IMAP folder {folder!r}: {one_line(error)}") from None
        try:
            client.subscribe_folder(folder)
        except IMAPClientError:
            pass  # subscribing only makes the folder visible in clients
        self._folders.add(folder)

    def _move(self, uids: list[int], folder: str) -> None:
        self._ensure_folder(folder)
        client = self.client
        if client.has_capability("MOVE"):
            client.move(uids, folder)
            return
        client.copy(uids, folder)
        client.add_flags(uids, [imapclient.DELETED])
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(uids)  # only these UIDs: never an EXPUNGE of what a person flagged

    # ------------------------------------------------------------ daemon

    def watch(self, backoff_start: float = 1.0, backoff_max: float = 300.0) -> None:
        """Process, then wait for new mail with IDLE (or poll), until stopped; reconnect with backoff."""
        delay = backoff_start
        while not self.stop.is_set():
            try:
                if self.client is None:
                    self.connect()
                    log.info("IMAP connected to %s:%s, watching %s", self.settings.host, self.settings.port,
                             self.settings.folder)
                self.run_once()
                delay = backoff_start
                self._wait_for_mail()
            except StoreError as error:
                # Busy, full or not writable: the mail stays where it is until the store takes it; a watcher
                # that died here would leave the daemon answering SMTP with nobody reading the mailbox.
                log.warning("store: %s; retrying in %.0fs", one_line(error), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, backoff_max)
            except (MailboxError, *NETWORK_ERRORS) as error:
                log.warning("IMAP: %s; reconnecting in %.0fs", one_line(error), delay)
                self.close()
                self.stop.wait(delay)
                delay = min(delay * 2, backoff_max)
        self.close()

    def _wait_for_mail(self) -> None:
        client = self.client
        if not client.has_capability("IDLE"):
            self.stop.wait(self.settings.poll_seconds)
            client.noop()
            return
        client.idle()
        # Wake at least every few seconds to notice a stop; re-IDLE every 5 minutes (RFC 2177 allows 29): the
        # round trips of DONE and the next search find a server gone silent (a NAT that dropped the connection)
        # within minutes, not half an hour. A lost connection raises (IMAP4.abort): `watch` then reconnects.
        deadline = time.monotonic() + 5 * 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            responses = client.idle_check(timeout=2)
            if any(r[0] == b"BYE" or (len(r) > 1 and r[1] == b"BYE") for r in responses):
                raise imapclient.imaplib.IMAP4.abort("the server said BYE")
            if any(r[1] in (b"EXISTS", b"RECENT") for r in responses if len(r) > 1):
                break
            if not responses and time.monotonic() - started < 0.5:
                # imapclient answers at once with nothing once the socket is closed: the connection is gone.
                raise imapclient.imaplib.IMAP4.abort("the connection was closed")
        client.idle_done()


def drain(settings: ImapSettings, sink: Sink, on_outcome=None, examiner_factory=None) -> RunSummary:
    """Connect, process the backlog once and log out (for `optout run --once`)."""
    source = ImapSource(settings, sink, on_outcome=on_outcome, examiner_factory=examiner_factory)
    try:
        source.connect()
        return source.run_once()
    except NETWORK_ERRORS as error:
        raise MailboxError(f"IMAP: {one_line(error)}") from None
    finally:
        source.close()
