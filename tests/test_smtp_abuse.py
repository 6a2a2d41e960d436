"""SMTP abuse against our endpoint, over raw sockets: relaying, idle and slow clients, too many connections,
pipelining, bare LF and SMTP smuggling.

Bare LF, the choice made (RFC 5321 §2.3.8: a line ends with CRLF and nothing else; §4.1.1.4: the data ends
with CRLF.CRLF): in DATA only CRLF ends a line, so "\\n.\\n" never ends a message (no smuggling of a second
message into the first). A message whose lines end in bare LF is accepted as it is, and the parser reads
the LFs as line ends, as long as no CRLF-delimited "line" grows past 1,000 octets (RFC 5321 §4.5.3.1.6);
past that it is refused with "500 Line too long" and nothing is recorded.
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import make_mail, query

PORT_TIMEOUT = 10


class Client:
    """A raw SMTP client: sends bytes as they are and reads replies line by line."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=PORT_TIMEOUT)
        self.lines = self.socket.makefile("rb")

    def reply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply; code 0 when the server hung up."""
        text = b""
        while True:
            try:
                line = self.lines.readline()
            except ConnectionResetError:
                line = b""
            if not line:
                return 0, text
            text += line
            if line[3:4] != b"-":
                return int(line[:3]), text

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def command(self, line: bytes) -> int:
        self.send(line + b"\r\n")
        return self.reply()[0]

    def closed(self) -> bool:
        """Say whether the server has closed the connection (reads to the end)."""
        try:
            return self.lines.read() is not None
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self) -> None:
        self.lines.close()
        self.socket.close()


@pytest.fixture
def connect():
    opened: list[Client] = []

    def open_(port: int) -> Client:
        client = Client(port)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        client.close()


def crlf_mail(tag: str, body: str = "Please unsubscribe me from your newsletter.") -> bytes:
    return make_mail(body, subject="Unsubscribe", message_id=f"<{tag}-{time.monotonic_ns()}@example.net>",
                     ).replace(b"\n", b"\r\n")


def ledger(database) -> list[tuple]:
    return query(database, "SELECT message_id, kind FROM ledger ORDER BY rowid")


@pytest.mark.parametrize("recipient", [
    b"<@relay.example.org:victim@elsewhere.example>",  # a source route (RFC 5321 §4.1.1.3)
    b"<@example.com:victim@elsewhere.example>",  # a source route through our own domain
    b'<"privacy@example.com"@elsewhere.example>',  # our address as a quoted local part
    b"<privacy@example.com@elsewhere.example>",
    b"<elsewhere.example!victim@example.com>",  # a bang path
    b"<victim@[192.0.2.1]>",  # an address literal
    b"<privacy@example.com.elsewhere.example>",
    b"<privacy%elsewhere.example@example.com>",  # the percent hack
])
def test_no_address_form_turns_the_endpoint_into_a_relay(smtp_daemon, connect, recipient):
    endpoint = smtp_daemon()
    client = connect(endpoint.port)
    client.reply()
    assert client.command(b"EHLO attacker.example") == 250
    assert client.command(b"MAIL FROM:<privacy@example.com>") == 250  # even posing as ourselves

    code = client.command(b"RCPT TO:" + recipient)
    data = client.command(b"DATA")

    assert code >= 500, code
    assert data == 503  # no recipient was accepted
    assert ledger(endpoint.database) == []


def test_an_idle_client_is_told_421_and_disconnected_after_the_command_timeout(smtp_daemon, connect):
    endpoint = smtp_daemon(smtp_command_timeout=1)
    client = connect(endpoint.port)
    assert client.reply()[0] == 220
    assert client.command(b"EHLO idle.example") == 250

    started = time.monotonic()
    code, text = client.reply()
    waited = time.monotonic() - started

    assert code == 421, text
    assert 0.8 < waited < 5
    assert client.closed()


def test_a_client_that_keeps_talking_is_cut_off_by_the_session_timeout(smtp_daemon, connect):
    endpoint = smtp_daemon(smtp_command_timeout=1, smtp_session_timeout=2)
    client = connect(endpoint.port)
    started = time.monotonic()
    client.reply()

    codes = []
    while time.monotonic() - started < 6:
        code = client.command(b"NOOP")  # each command resets the idle timer, never the session's
        codes.append(code)
        if code != 250:
            break
        time.sleep(0.3)
    elapsed = time.monotonic() - started

    assert codes[-1] == 421 and set(codes[:-1]) == {250}, codes
    assert 1.8 < elapsed < 6
    assert client.closed()


def test_a_slow_drip_in_data_is_bounded_by_the_command_timeout(smtp_daemon, connect):
    endpoint = smtp_daemon(smtp_command_timeout=1)
    client = connect(endpoint.port)
    client.reply()
    for line in (b"EHLO slow.example", b"MAIL FROM:<ann@example.net>", b"RCPT TO:<privacy@example.com>"):
        assert client.command(line) == 250
    assert client.command(b"DATA") == 354

    started = time.monotonic()
    cut = False
    for byte in crlf_mail("drip")[:60]:
        try:
            client.send(bytes([byte]))
        except OSError:
            cut = True
            break
        time.sleep(0.1)
    code, _ = client.reply()
    elapsed = time.monotonic() - started

    assert code in (0, 421)  # told, or simply hung up on
    assert cut or elapsed < 7
    assert client.closed()
    assert ledger(endpoint.database) == []


@pytest.mark.parametrize("limits, said", [
    ({"smtp_max_connections": 3}, b"Too many connections"),
    # One host cannot hold every slot: the cap per address bites first.
    ({"smtp_max_connections": 10, "smtp_max_connections_per_ip": 3}, b"from your address"),
])
def test_connections_past_the_limit_get_421_and_a_freed_slot_is_reused(smtp_daemon, connect, limits, said):
    endpoint = smtp_daemon(**limits)
    held = [connect(endpoint.port) for _ in range(3)]
    assert [client.reply()[0] for client in held] == [220, 220, 220]

    extra = connect(endpoint.port)
    refused, text = extra.reply()
    assert refused == 421 and said in text
    assert extra.closed()

    held[0].command(b"QUIT")
    held[0].closed()
    deadline = time.monotonic() + 5
    while True:
        again = connect(endpoint.port)
        code = again.reply()[0]
        if code == 220 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert code == 220


def test_pipelined_commands_are_answered_in_order_and_both_messages_recorded(smtp_daemon, connect):
    endpoint = smtp_daemon()
    client = connect(endpoint.port)
    client.reply()
    client.send(b"EHLO pipe.example\r\n")
    code, ehlo = client.reply()
    assert code == 250 and b"250-PIPELINING" in ehlo
    first, second = crlf_mail("pipe1"), crlf_mail("pipe2")

    # RFC 2920: a group ends with DATA; the client then waits for 354.
    client.send(b"MAIL FROM:<ann@example.net>\r\nRCPT TO:<privacy@example.com>\r\nRCPT TO:<ceo@elsewhere.example>\r\n"
                b"RCPT TO:<unsubscribe@example.com>\r\nDATA\r\n")
    group = [client.reply()[0] for _ in range(5)]
    client.send(first + b".\r\nMAIL FROM:<bob@example.net>\r\nRCPT TO:<privacy@example.com>\r\nDATA\r\n")
    second_group = [client.reply()[0] for _ in range(4)]
    client.send(second + b".\r\nQUIT\r\n")
    last = [client.reply()[0] for _ in range(2)]

    assert group == [250, 250, 550, 250, 354]
    assert second_group == [250, 250, 250, 354]
    assert last == [250, 221]
    assert [kind for _, kind in ledger(endpoint.database)] == ["opt-out", "opt-out"]


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"])
def test_a_bare_lf_dot_never_ends_the_data_so_nothing_is_smuggled(smtp_daemon, connect, ending):
    endpoint = smtp_daemon()
    client = connect(endpoint.port)
    client.reply()
    for line in (b"EHLO smuggler.example", b"MAIL FROM:<eve@example.org>", b"RCPT TO:<privacy@example.com>"):
        assert client.command(line) == 250
    assert client.command(b"DATA") == 354
    carrier = crlf_mail("carrier", "Hello, a question about my order.")
    smuggled = (b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<privacy@example.com>\r\nDATA\r\n"
                b"From: ceo@example.com\r\nSubject: Unsubscribe\r\nMessage-ID: <smuggled@example.com>\r\n\r\n"
                b"Please unsubscribe me.\r\n")

    client.send(carrier.rstrip(b"\r\n") + ending + smuggled + b".\r\n")
    replies = [client.reply()[0]]
    replies.append(client.command(b"NOOP"))

    assert replies == [250, 250]  # one message, then NOOP's own answer: no second transaction happened
    rows = ledger(endpoint.database)
    assert len(rows) == 1 and rows[0][0].startswith("<carrier-")


def start_data(client):
    """Greet, name a sender and our recipient, and open DATA: the client may now send the message."""
    client.reply()
    for line in (b"EHLO lf.example", b"MAIL FROM:<ann@example.net>", b"RCPT TO:<privacy@example.com>"):
        assert client.command(line) == 250
    assert client.command(b"DATA") == 354
    return client


def test_a_short_message_with_bare_lf_line_ends_is_accepted_and_read(smtp_daemon, connect):
    endpoint = smtp_daemon()
    client = start_data(connect(endpoint.port))
    message = make_mail("Please unsubscribe me.", subject="Hi", message_id="<bare-lf@example.net>")
    assert b"\r" not in message and len(message) < 1000

    client.send(message + b"\r\n.\r\n")

    assert client.reply()[0] == 250
    assert ledger(endpoint.database) == [("<bare-lf@example.net>", "opt-out")]


def test_a_long_message_with_bare_lf_line_ends_is_refused_with_500(smtp_daemon, connect):
    endpoint = smtp_daemon()
    client = start_data(connect(endpoint.port))
    message = make_mail("Please unsubscribe me.\n" + "more words on a line\n" * 100, subject="Hi")

    client.send(message + b"\r\n.\r\n")
    code, text = client.reply()

    assert code == 500 and b"Line too long" in text
    assert client.command(b"NOOP") == 250  # the session carries on
    assert ledger(endpoint.database) == []


def test_junk_commands_are_refused_and_a_flood_of_them_ends_the_session(smtp_daemon, connect):
    endpoint = smtp_daemon()
    client = connect(endpoint.port)
    client.reply()

    assert client.command(b"EHLO " + b"x" * 600) == 500  # longer than a command line may be
    assert client.command(b"\x00\xff\xfe") == 500
    codes = []
    for _ in range(10):
        codes.append(client.command(b"XYZZY"))
        if codes[-1] != 500:
            break

    assert codes[:4] == [500] * 4
    assert codes[-1] == 502  # aiosmtpd gives up on a client that sends only unknown commands
    assert client.closed()
