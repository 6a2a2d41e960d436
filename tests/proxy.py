"""A TCP proxy on 127.0.0.1 between optout and a real server (Dovecot, the relay) that cuts a connection on cue.

- `Cut(watch, marker, cut, after)`: once `marker` has passed in the `watch` direction ("up": client to server,
  "down": server to client), forward `after` more bytes in the `cut` direction, then close both sides.
  `after=0` in the other direction: the command reaches the server, its answer never reaches the client.
- Markers match without regard to case. `nth`: the marker's nth passage arms the cut (the third FETCH: two batches are through).
- `forward_marker=False` drops the chunk holding the marker instead: the server never sees that command.
- `stall=True`: instead of closing, keep both sockets open and forward nothing more in the cut direction:
  a server gone silent, which only a client's timeout ends.
- A cut happens `times` times (each on a new connection), then the proxy only forwards: the retry gets through.
- Imports no pytest; threads only, so it works beside subprocesses and asyncio loops alike.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


@dataclass
class Cut:
    """When to cut a connection."""

    watch: str
    marker: bytes
    cut: str
    after: int = 0
    forward_marker: bool = True
    nth: int = 1
    stall: bool = False
    times: int = 1


class _Connection:
    def __init__(self, proxy: Proxy, client: socket.socket, server: socket.socket, cut: Cut | None) -> None:
        self.proxy = proxy
        self.sides = {"up": (client, server), "down": (server, client)}
        self.cut = cut
        self.armed = threading.Event()  # the marker has passed: count down `after` in the cut direction
        self.left = cut.after if cut else 0
        self.passages = 0
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        for direction in ("up", "down"):
            threading.Thread(target=self._pump, args=(direction,), name=f"proxy-{direction}", daemon=True).start()

    def _pump(self, direction: str) -> None:
        source, target = self.sides[direction]
        tail = b""
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                cut = self.cut
                if cut and direction == cut.cut and self.armed.is_set():
                    with self.lock:
                        passing, self.left = chunk[:self.left], self.left - min(self.left, len(chunk))
                        done = self.left == 0
                    if passing:
                        target.sendall(passing)
                    if done:
                        self._cut()
                        return
                    continue
                if cut and direction == cut.watch and not self.armed.is_set():
                    seen = tail + chunk
                    at = seen.lower().find(cut.marker.lower())  # smtplib says `data`, others `DATA`
                    if at >= 0:
                        self.passages += 1
                    if at >= 0 and self.passages >= cut.nth:
                        end = at + len(cut.marker) - len(tail)  # where the marker ends within this chunk
                        if not cut.forward_marker:
                            self._cut()
                            return
                        if cut.cut == direction:
                            # The rest of this chunk counts towards `after`.
                            target.sendall(chunk[:end])
                            rest = chunk[end:]
                            passing = rest[:self.left]
                            self.left -= len(passing)
                            if passing:
                                target.sendall(passing)
                            if self.left == 0:
                                self._cut()
                                return
                            self.armed.set()
                            continue
                        target.sendall(chunk)
                        self.armed.set()  # the other pump cuts the answer after `after` bytes
                        continue
                    tail = seen[-(len(cut.marker) - 1):] if len(cut.marker) > 1 else b""
                target.sendall(chunk)
        except OSError:
            pass
        self._close()

    def _cut(self) -> None:
        self.proxy.cuts += 1
        if self.cut.stall:
            return  # the pump stops reading: nothing more passes this way, and nothing is closed
        self._close()

    def _close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in self.sides["up"]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Proxy:
    """Listen on a free port of 127.0.0.1 and forward each connection to host:port, cutting as told."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.plan: Cut | None = None
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def cut(self, plan: Cut | None) -> None:
        """Cut the next `plan.times` connections as planned (None: forward everything)."""
        self.plan = plan

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                plan = self.plan
                if plan is not None:
                    plan.times -= 1
                    if plan.times <= 0:
                        self.plan = None
            _Connection(self, client, server, plan).start()

    def close(self) -> None:
        """Stop accepting (open connections end when either side closes)."""
        self.listener.close()
