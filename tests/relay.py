"""A second aiosmtpd on loopback that plays the relay: it collects what optout sends, or refuses on request."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    """One message the relay accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        """Return the parsed message."""
        return email.message_from_bytes(self.raw, policy=email.policy.default)


@dataclass
class Collector:
    """The relay's handler: `mode` is "accept", "tempfail" (451 at DATA), "permfail" (550 at RCPT), "drop" or
    "hang" (takes the whole message, then never answers: a client waits for its timeout; nothing is accepted)
    or "slow" (accepts the message, as an MTA queues it, then takes `slow_seconds` to say 250)."""

    mode: str = "accept"
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    slow_seconds: float = 5.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.attempts += 1
        if self.mode == "permfail":
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.mode == "tempfail":
            return "451 4.3.0 try again later"
        if self.mode == "slow":
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            await asyncio.sleep(self.slow_seconds)
            return "250 2.0.0 queued"
        if self.mode == "hang":
            await asyncio.sleep(3600)  # cancelled when the client hangs up
        if self.mode == "drop":
            server.transport.close()  # hang up in the middle of DATA, before any answer
            return "421 closing"
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


def silent_listener() -> socket.socket:
    """Return a socket listening on a free loopback port that never accepts: the handshake completes in the
    kernel, then a client waits for a greeting that never comes. Close it when done."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    return listener


class Relay:
    """Run the collecting relay on its own loop thread; `stop()` and `start()` take it down and up on one port."""

    def __init__(self) -> None:
        self.handler = Collector()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-relay", daemon=True)
        self.thread.start()
        self.server = None
        self.port = 0
        self.start()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def start(self) -> None:
        """Listen (again) on the relay's port (a free one the first time)."""
        async def serve():
            return await self.loop.create_server(lambda: SMTP(self.handler, hostname="relay.test"), "127.0.0.1",
                                                 self.port)

        self.server = self._run(serve())
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop listening: connections are refused until `start()`."""
        async def close():
            self.server.close()
            await self.server.wait_closed()

        self._run(close())

    @property
    def url(self) -> str:
        """Return the relay's URL as optout's config takes it."""
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        """Return what the relay accepted so far."""
        return self.handler.received

    def close(self) -> None:
        """Stop the server and the loop."""
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
