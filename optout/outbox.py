"""Send queued replies to the relay (smtplib), with retries, backoff and an hourly circuit breaker.

- Delivery is at most once across a crash: a reply is marked sent only after the relay accepted it, and
  marked in doubt while its bytes travel (after the relay's 354, until its answer). A crash leaves it in
  doubt, held for a person, instead of sending it twice; a lost connection is retried (RFC 1047: the relay
  has not answered, so it did not take responsibility). A reply marked sent is never sent again.
- 4xx answers and connection errors are retried with exponential backoff; 5xx answers fail the reply.
- A relay that is down (refused, silent past the timeout, hung up, 421) costs one attempt of one reply per
  pass: the others wait for the next pass untouched, so a dead relay costs a pass one timeout, not one a reply.
- Every attempt is recorded. Past the hourly cap, replies wait in the outbox and a warning is logged:
  a flood of forged opt-outs must not turn us into a spam cannon.
- Replies go out with a null envelope sender (RFC 3834 §3.3), so nothing bounces back into a loop.
- With no relay configured, replies are written to a maildir (var/sent/ by default) for a person to read,
  one file per Message-ID: there a retry after a crash writes nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import unquote, urlsplit

from optout.errors import ConfigError, one_line

log = logging.getLogger("optout.outbox")


class DeliveryError(Exception):
    """A relay's answer: permanent (5xx) or not; `relay_down` when the relay failed, not this one reply."""

    def __init__(self, detail: str, permanent: bool, relay_down: bool = False) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.relay_down = relay_down


class Transport(Protocol):
    """Something that delivers one reply or raises DeliveryError."""

    def send(self, raw: bytes, recipient: str, message_id: str | None = None,
             on_data: Callable[[], None] | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RelaySettings:
    """Where replies are handed over: smtp://host:port, smtps://host:port or smtp+starttls://host:port."""

    host: str
    port: int
    security: str = "plain"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0  # connecting and every command
    data_timeout: float = 600.0  # the answer to the final dot (RFC 5321 §4.5.3.2.6: 10 minutes)


def relay_settings(url: str, username: str | None = None, password: str | None = None, timeout: float = 30.0,
                   data_timeout: float = 600.0) -> RelaySettings:
    """Parse a relay URL; credentials may be in it or given apart (from the environment or a file)."""
    parsed = urlsplit(url)
    security = {"smtp": "plain", "smtps": "tls", "smtp+starttls": "starttls"}.get(parsed.scheme)
    if security is None or not parsed.hostname:
        raise ConfigError("relay URL must look like smtp://host:25, smtps://host:465 or smtp+starttls://host:587")
    try:
        port = parsed.port or {"plain": 25, "tls": 465, "starttls": 587}[security]
    except ValueError:
        raise ConfigError("relay URL has a bad port") from None
    return RelaySettings(parsed.hostname, port, security, username or (unquote(parsed.username) if parsed.username else None),
                         password or (unquote(parsed.password) if parsed.password else None), timeout, data_timeout)


class RelayTransport:
    """Deliver through an SMTP relay, one connection for a whole flush."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.client: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        try:
            if s.security == "tls":
                client = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=ssl.create_default_context())
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
                if s.security == "starttls":
                    client.starttls(context=ssl.create_default_context())
            if s.username:
                client.login(s.username, s.password or "")
        except smtplib.SMTPAuthenticationError as error:
            raise DeliveryError(f"relay refused the login: {error.smtp_code}", permanent=False,
                                relay_down=True) from None
        except (OSError, smtplib.SMTPException) as error:
            # Refused, no greeting within the timeout, 421 at the greeting: no reply can go now.
            raise DeliveryError(f"relay {s.host}:{s.port} unreachable: {one_line(error)}", permanent=False,
                                relay_down=True) from None
        return client

    def send(self, raw: bytes, recipient: str, message_id: str | None = None,
             on_data: Callable[[], None] | None = None) -> None:
        """Hand one reply to the relay with a null envelope sender.

        `on_data` runs once the relay has said 354, just before the message and its final dot go out: from
        then on, until the relay answers, the reply is in doubt (RFC 1047) — a crash there must not send it again.
        """
        if self.client is None:
            self.client = self._connect()
        client = self.client
        try:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail("<>")
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, "<>")
            code, text = client.rcpt(recipient)
            if code not in (250, 251):
                client.rset()
                raise DeliveryError(f"{code} {one_line(text)}", permanent=code >= 500)
            code, text = client.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, text)
            if on_data is not None:
                on_data()
            # Dot-stuffing (RFC 5321 §4.5.2) and the final dot, as smtplib.SMTP.data() does it.
            payload = re.sub(rb"(?m)^\.", b"..", raw if raw.endswith(b"\r\n") else raw + b"\r\n")
            client.send(payload + b".\r\n")
            # A relay may take long to take responsibility; a short wait here would only send it twice.
            client.sock.settimeout(self.settings.data_timeout)
            try:
                code, text = client.getreply()
            finally:
                if client.sock is not None:
                    client.sock.settimeout(self.settings.timeout)
            if code != 250:
                raise smtplib.SMTPDataError(code, text)
        except smtplib.SMTPResponseException as error:
            self.close()
            raise DeliveryError(f"{error.smtp_code} {one_line(error.smtp_error)}", permanent=error.smtp_code >= 500,
                                relay_down=error.smtp_code == 421) from None
        except (OSError, smtplib.SMTPException) as error:
            # Dropped or silent mid-transaction (a timeout is an OSError): no QUIT, which would wait as long
            # again; the next attempt starts a new connection.
            self._drop()
            raise DeliveryError(f"connection lost: {one_line(error)}", permanent=False, relay_down=True) from None

    def close(self) -> None:
        """Say QUIT, quietly."""
        if self.client is not None:
            try:
                self.client.quit()
            except (OSError, smtplib.SMTPException):
                self._drop()
            self.client = None

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class MaildirTransport:
    """Write replies to a maildir instead of sending them (the embedded default: read what would be sent).

    A reply's file is named after its Message-ID and written to tmp/ then renamed into new/, so a reply
    written just before a crash, and so never marked sent, is not written a second time by the retry.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._read: set[str] | None = None

    def send(self, raw: bytes, recipient: str, message_id: str | None = None,
             on_data: Callable[[], None] | None = None) -> None:
        """Add the reply to the maildir, unless a reply with its Message-ID is there already (never in doubt)."""
        name = hashlib.sha256(message_id.encode() if message_id else raw).hexdigest()[:40] + ".optout"
        try:
            for folder in ("tmp", "new", "cur"):
                (self.path / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._read is None:  # a mail reader renames new/NAME to cur/NAME:2,FLAGS
                self._read = {entry.partition(":")[0] for entry in os.listdir(self.path / "cur")}
            if name in self._read or (self.path / "new" / name).exists():
                return
            temporary = self.path / "tmp" / name  # what a crash left half-written here is overwritten
            with open(temporary, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path / "new" / name)
        except OSError as error:
            raise DeliveryError(f"cannot write to {self.path}: {error.strerror or error}", permanent=False) from None

    def close(self) -> None:
        """Nothing to close."""


@dataclass
class FlushSummary:
    """What one pass over the outbox did."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    held: int = 0
    in_doubt: int = 0




def backoff(attempts: int, base: float = 60.0, ceiling: float = 6 * 3600.0) -> timedelta:
    """Return the wait before attempt number attempts+1: base, 2×base, 4×base … up to the ceiling."""
    return timedelta(seconds=min(ceiling, base * (2 ** max(0, attempts))))


_last_warning = [0.0]


def _warn_breaker(sent: int, cap: int, waiting: int) -> None:
    # At most one warning every ten minutes: a flood must not flood the log as well.
    import time

    if time.monotonic() - _last_warning[0] > 600:
        _last_warning[0] = time.monotonic()
        log.warning("reply circuit breaker: %d replies sent in the last hour (cap %d); %d replies wait",
                    sent, cap, waiting)


def flush(store, transport: Transport, clock: Callable[[], datetime], hourly_cap: int = 100,
          max_attempts: int = 12, base_delay: float = 60.0, signer: Callable[[bytes], bytes] | None = None) -> FlushSummary:
    """Deliver every due reply once; reschedule or fail the ones the relay does not take.

    `store` is the Store (or a proxy that runs its methods on the writer thread).
    """
    summary = FlushSummary()
    doubtful = store.outbox_count("in-doubt")
    if doubtful:
        # Killed between handing a reply over and hearing the relay's answer: it may have gone, or not.
        # Sending again could send it twice; a person decides (the relay's log knows its Message-ID).
        summary.in_doubt = doubtful
        log.warning("%d replies are in doubt (interrupted while the relay was answering): see `optout outbox "
                    "list --status in-doubt`, then `optout outbox retry ID` those the relay did not take", doubtful)
    try:
        while True:
            now = clock()
            sent = store.sent_since(now - timedelta(hours=1))
            room = hourly_cap - sent
            if room <= 0:
                waiting = store.outbox_waiting(now)
                if waiting:
                    summary.held += waiting
                    _warn_breaker(sent, hourly_cap, waiting)
                break
            due = store.outbox_due(now, limit=min(room, 100))
            if not due:
                break
            for row in due:
                raw = bytes(row["raw"])
                if signer is not None:
                    raw = signer(raw)
                try:
                    transport.send(raw, row["to_address"], row["message_id"],
                                   on_data=lambda outbox_id=row["id"]: store.outbox_in_doubt(outbox_id))
                except DeliveryError as error:
                    attempts = row["attempts"] + 1
                    if error.permanent or attempts >= max_attempts:
                        store.outbox_result(row["id"], clock(), "failed", str(error))
                        summary.failed += 1
                        log.warning("reply %s to %s failed: %s", row["id"], _mask(row["to_address"]), error)
                    else:
                        store.outbox_result(row["id"], clock(), "retry", str(error),
                                            clock() + backoff(row["attempts"], base_delay))
                        summary.retried += 1
                        log.info("reply %s deferred (attempt %d): %s", row["id"], attempts, error)
                    if error.relay_down:
                        log.warning("relay unavailable (%s): the replies due wait for the next pass", error)
                        return summary
                    continue
                store.outbox_result(row["id"], clock(), "sent", "accepted")
                summary.sent += 1
                log.info("reply %s sent (%s)", row["id"], row["kind"])
    finally:
        transport.close()
    return summary


def _mask(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"

