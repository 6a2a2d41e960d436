"""The SMTP (or LMTP) endpoint (aiosmtpd): recipient allow-list, limits, and "250" only after the commit."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from optout.errors import TransientError

log = logging.getLogger("optout.smtp")

Submit = Callable[[bytes, str, tuple[str, ...]], Awaitable[object]]


@dataclass(frozen=True)
class SmtpLimits:
    """How much one client may ask of the endpoint."""

    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 20
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: at least 5 minutes (a whole DATA must fit in it)
    session_timeout: float = 600.0
    max_connections: int = 100
    max_connections_per_ip: int = 10  # one host cannot hold every slot with idle connections


class PrivacyHandler:
    """aiosmtpd handler: accept mail for our addresses only, and answer only after the store has it."""

    def __init__(self, submit: Submit, accepts: Callable[[str], bool], limits: SmtpLimits = SmtpLimits(),
                 lmtp: bool = False) -> None:
        self.submit = submit
        self.accepts = accepts
        self.limits = limits
        self.lmtp = lmtp

    async def handle_EHLO(self, server, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        # RFC 2920: commands are read and answered strictly in order, so a client may send them in groups;
        # RFC 2033 §5: an LMTP server must offer it.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options) -> str:
        # An allow-list, not a relay: anything but our own addresses is refused at RCPT.
        if not self.accepts(address):
            return f"550 5.1.1 <{address}>: no such recipient here"
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        # A thin adapter: no decisions here; commit first, then say 250.
        recipients = tuple(envelope.rcpt_tos)
        try:
            await self.submit(envelope.original_content, envelope.mail_from or "", recipients)
            status = "250 2.0.0 OK: processed"
        except TransientError as error:
            log.warning("SMTP: store unavailable (%s): answered 451", error)
            status = "451 4.3.0 Temporary failure, please try again later"
        except Exception as error:  # never lose a message: a failure we did not foresee is temporary too
            log.error("SMTP: %s: %s: answered 451", type(error).__name__, str(error)[:200])
            status = "451 4.3.0 Temporary failure, please try again later"
        if self.lmtp:
            # RFC 2033 §4.2: one reply per accepted recipient, in order.
            return "\r\n".join([status] * max(1, len(recipients)))
        return status


class _Connections:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.per_ip: Counter[str] = Counter()


class _Refuse(asyncio.Protocol):
    """Answer 421 and hang up: the connection limit is reached."""

    def connection_made(self, transport) -> None:
        transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
        transport.close()


def _protocol(base: type, handler: PrivacyHandler, connections: _Connections, limits: SmtpLimits, hostname: str):
    class Session(base):
        def connection_made(self, transport) -> None:
            peer = transport.get_extra_info("peername")
            self._peer = peer[0] if peer else ""
            self._refused = connections.per_ip[self._peer] >= limits.max_connections_per_ip
            if self._refused:
                transport.write(b"421 4.7.0 Too many connections from your address, try again later\r\n")
                transport.close()
                return
            connections.per_ip[self._peer] += 1
            connections.active += 1
            super().connection_made(transport)
            # A whole session may last this long, however busy the client keeps it.
            self._expiry = self.loop.call_later(limits.session_timeout, self._expire)

        def _timeout_cb(self) -> None:
            # aiosmtpd hangs up on an idle client without a word; RFC 5321 §3.8 asks for a 421 first.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"421 4.4.2 Idle too long, closing\r\n")
            super()._timeout_cb()

        def _expire(self) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"421 4.4.2 Session too long, closing\r\n")
                self.transport.close()

        def connection_lost(self, error) -> None:
            if self._refused:
                return  # never started: nothing to stop
            connections.active -= 1
            connections.per_ip[self._peer] -= 1
            if connections.per_ip[self._peer] <= 0:
                del connections.per_ip[self._peer]
            self._expiry.cancel()
            super().connection_lost(error)

    def factory():
        if connections.active >= connections.limit:
            return _Refuse()
        return Session(handler, data_size_limit=limits.max_message_bytes, enable_SMTPUTF8=True,
                       timeout=limits.command_timeout, hostname=hostname)

    return factory


async def start_server(handler: PrivacyHandler, host: str, port: int, limits: SmtpLimits = SmtpLimits(),
                       lmtp: bool = False, hostname: str = "optout") -> asyncio.base_events.Server:
    """Listen on host:port (0 picks a free port: read it from server.sockets) on the running loop."""
    loop = asyncio.get_running_loop()
    factory = _protocol(LMTP if lmtp else SMTP, handler, _Connections(limits.max_connections), limits, hostname)
    return await loop.create_server(factory, host=host, port=port)
