"""Send mail to `optout daemon` over SMTP; print msg/s beside an aiosmtpd server that answers 250 at once.

Figures, not a test: both servers are measured in this run, with the same messages, by the same clients.
The clients are separate processes (a client in the server's process would share its GIL): first one
connection sending every message, then 8 client processes with one connection each, sharing the messages.
Usage: python bench/smtp_ingest.py [--messages N] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from dovecot import free_port, wait_for_port  # noqa: E402
from figures import peak_rss_kib, record  # noqa: E402
from imap_backlog import realistic_messages  # noqa: E402


class NullHandler:
    """Accept every message at once: the ceiling of aiosmtpd itself on this machine."""

    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 OK"


def null_server(port: int) -> None:
    """Serve SMTP on port with the null handler until SIGTERM."""
    from aiosmtpd.smtp import SMTP

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(lambda: SMTP(NullHandler()), "127.0.0.1", port)
        await stop.wait()
        server.close()

    asyncio.run(serve())


def client(port: int, messages: list[bytes], ready, go, results) -> None:
    """Connect once, wait for the start signal, send every message, report the seconds and the failures."""
    crlf = [raw.replace(b"\n", b"\r\n") for raw in messages]
    failures = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as connection:
        connection.ehlo()
        ready.release()
        go.wait()
        started = time.perf_counter()
        for raw in crlf:
            try:
                connection.sendmail("ann@example.net", ["privacy@example.com"], raw)
            except smtplib.SMTPException:
                failures += 1
        results.put((time.perf_counter() - started, failures))


def load(port: int, messages: list[bytes], clients: int) -> tuple[float, int]:
    """Send the messages over `clients` connections from as many processes; return (msg/s, failures)."""
    context = multiprocessing.get_context("fork")
    ready, go, results = context.Semaphore(0), context.Event(), context.Queue()
    shares = [messages[n::clients] for n in range(clients)]
    workers = [context.Process(target=client, args=(port, share, ready, go, results)) for share in shares]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    outcomes = [results.get(timeout=600) for _ in workers]
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return len(messages) / seconds, sum(failures for _, failures in outcomes)


def ledger_count(database: Path) -> int:
    connection = sqlite3.connect(f"file:{database}?mode=rw", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM ledger").fetchone()[0]
    finally:
        connection.close()


def start_optout(workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    database = workdir / "optout.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTOUT_")}
    env.update(OPTOUT_DATABASE=str(database), OPTOUT_SMTP_LISTEN=f"127.0.0.1:{port}")
    script = Path(sys.executable).with_name("optout")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from optout.cli import main; main()"]
    with open(workdir / "daemon.log", "wb") as log:
        process = subprocess.Popen(command + ["daemon"], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log)
    wait_for_port(port, 30)
    return process, port, database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per measurement (default 2000)")
    parser.add_argument("--clients", type=int, default=8)
    options = parser.parse_args()
    total, clients = options.messages, options.clients
    # Distinct messages for each optout measurement: a repeat would only be a cheap duplicate.
    one, many = realistic_messages(total, seed=1, tag="one"), realistic_messages(total, seed=2, tag="many")
    size = sum(map(len, one)) / total
    print(f"{total} messages per measurement, {size / 1e3:.1f} KB on average; {os.cpu_count()} CPUs")
    rates: dict[tuple[str, int], tuple[float, int]] = {}

    port = free_port()
    server = multiprocessing.get_context("fork").Process(target=null_server, args=(port,))
    server.start()
    try:
        wait_for_port(port, 30)
        rates["null", 1] = load(port, one, 1)
        rates["null", clients] = load(port, many, clients)
    finally:
        server.terminate()
        server.join(10)

    workdir = Path(tempfile.mkdtemp(prefix="optout-bench-"))
    try:
        process, port, database = start_optout(workdir)
        try:
            rates["optout", 1] = load(port, one, 1)
            rates["optout", clients] = load(port, many, clients)
            peak_mib = peak_rss_kib(process.pid) / 1024
        finally:
            process.send_signal(signal.SIGTERM)
            status = process.wait(60)
        recorded = ledger_count(database)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'':54}{'msg/s':>10}{'refused':>9}")
    for (server_name, connections), (rate, failures) in rates.items():
        label = ("aiosmtpd null handler (250 at once)" if server_name == "null" else "optout daemon (250 after commit)")
        label += f", {connections} connection" + ("s" if connections > 1 else "")
        print(f"{label:54}{rate:>10,.0f}{failures:>9}")
    for connections in (1, clients):
        ratio = rates["optout", connections][0] / rates["null", connections][0]
        aim = " (aim: at least 0.50)" if connections == 1 else ""
        print(f"ratio with {connections} connection{'s' if connections > 1 else ''}: {ratio:.2f}{aim}")
    print(f"optout daemon exit {status}; ledger rows {recorded} of {2 * total} sent; peak RSS {peak_mib:.0f} MiB")
    for connections in (1, clients):
        record(f"SMTP ingest, {connections} connection{'s' if connections > 1 else ''} (ceiling: null aiosmtpd)",
               rates["optout", connections][0], rates["null", connections][0], "msg/s", peak_mib,
               aim="0.50" if connections == 1 else "")


if __name__ == "__main__":
    main()
