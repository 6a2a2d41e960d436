"""Scrub a 1,000,000-row send list against 1,000,000 suppressions; print the time beside the bare SQLite anti-join.

Figures, not a test: both are measured in this run, on this machine, over the same data in a temp folder.
- scrub: the real `optout scrub SENDLIST --column email -o CLEAN` as a subprocess, start-up, loading the
  suppressions, reading and writing the CSV included;
- bare join: the send list's addresses (already in memory) into a temp table, then
  `SELECT … LEFT JOIN suppressions … WHERE s.address IS NULL`, every surviving row fetched.
Half the send list is suppressed; a tenth of its addresses are in mixed case with spaces around them, and
--tombstones hash-only deletion tombstones (no address) make scrub hash the addresses it keeps.
Usage: python bench/scrub.py [--rows N] [--suppressions N] [--tombstones N] [--rounds N]
"""

from __future__ import annotations

import argparse
import csv
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from optout.model import drop_hash

from figures import record, run_watched

PEAKS: list[float] = []
from optout.store import Store

OPTOUT = Path(sys.executable).parent / "optout"


def make_database(path: Path, suppressions: int, tombstones: int) -> None:
    """Create the database through Store (migrations), then fill it with one executemany in one transaction."""
    Store(path).close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("BEGIN")
    reasons = ("opt-out", "complaint", "deletion", "import")
    scopes = ("all", "all", "newsletters", "partners")
    connection.executemany(
        "INSERT INTO suppressions (address, address_hash, scope, reason, created_at) VALUES (?, ?, ?, ?, ?)",
        ((f"person{i}@example{i % 997}.com", f"hash{i}", scopes[i % 4], reasons[i % 4], "2026-11-01T00:00:00+00:00")
         for i in range(suppressions)))
    connection.executemany(
        "INSERT INTO suppressions (address, address_hash, scope, reason, created_at) VALUES (NULL, ?, 'all', "
        "'deletion', '2026-11-01T00:00:00+00:00')",
        ((drop_hash(f"gone{i}@example.org"),) for i in range(tombstones)))
    connection.execute("COMMIT")
    connection.close()


def make_sendlist(path: Path, rows: int, suppressions: int) -> list[str]:
    """Write the send list (half of it suppressed); return its addresses as written."""
    addresses = []
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "email", "first_name", "country"])
        for i in range(rows):
            n = (i // 2) % suppressions
            address = f"person{n}@example{n % 997}.com" if i % 2 == 0 else f"customer{i}@shop{i % 101}.net"
            if i % 10 == 1 or i % 10 == 4:
                address = f"  {address.upper()} "
            addresses.append(address)
            writer.writerow([i, address, f"Name {i}", "FR"])
    return addresses


def time_scrub(database: Path, sendlist: Path, clean: Path, scope: str | None) -> float:
    """Run `optout scrub` once; return its wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTOUT_")}
    args = [str(OPTOUT), "--database", str(database), "scrub", str(sendlist), "--column", "email", "-o", str(clean)]
    if scope:
        args += ["--scope", scope]
    result, elapsed, peak = run_watched(args, env=env)
    if result.returncode:
        sys.exit(f"optout scrub failed: {result.stderr.strip()}")
    print(f"    {result.stderr.strip()}")
    PEAKS.append(peak)
    return elapsed


def time_bare_join(database: Path, addresses: list[str]) -> tuple[float, int]:
    """Run the bare SQLite anti-join over the same (normalised) addresses; return its time and surviving rows."""
    candidates = [(i, a.strip().lower()) for i, a in enumerate(addresses)]
    connection = sqlite3.connect(database)
    start = time.perf_counter()
    connection.execute("CREATE TEMP TABLE candidates (id INTEGER PRIMARY KEY, address TEXT)")
    connection.executemany("INSERT INTO candidates VALUES (?, ?)", candidates)
    kept = connection.execute(
        "SELECT c.id, c.address FROM candidates c LEFT JOIN suppressions s ON s.address = c.address "
        "WHERE s.address IS NULL").fetchall()
    elapsed = time.perf_counter() - start
    connection.close()
    return elapsed, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--suppressions", type=int, default=1_000_000)
    parser.add_argument("--tombstones", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scope", help="Pass --scope to optout scrub.")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        database, sendlist, clean = folder / "optout.db", folder / "sendlist.csv", folder / "clean.csv"
        start = time.perf_counter()
        make_database(database, options.suppressions, options.tombstones)
        addresses = make_sendlist(sendlist, options.rows, options.suppressions)
        print(f"data: {options.suppressions:,} suppressions + {options.tombstones:,} hash-only tombstones, "
              f"send list of {options.rows:,} rows ({sendlist.stat().st_size / 1e6:.0f} MB), "
              f"made in {time.perf_counter() - start:.1f} s")
        scrubs, joins = [], []
        for round_ in range(options.rounds):
            print(f"  round {round_ + 1}:")
            scrubs.append(time_scrub(database, sendlist, clean, options.scope))
            elapsed, kept = time_bare_join(database, addresses)
            joins.append(elapsed)
            print(f"    scrub {scrubs[-1]:.2f} s, bare join {elapsed:.2f} s ({kept:,} rows survive the join)")
        scrub_time, join_time = statistics.median(scrubs), statistics.median(joins)
        print(f"optout scrub (subprocess, end to end): {scrub_time:.2f} s, "
              f"{options.rows / scrub_time / 1e6:.2f}M rows/s")
        print(f"bare SQLite anti-join (temp table):    {join_time:.2f} s, {options.rows / join_time / 1e6:.2f}M rows/s")
        print(f"ratio scrub / bare join: {scrub_time / join_time:.2f}x (medians of {options.rounds} rounds); "
              f"peak RSS of optout scrub {max(PEAKS):.0f} MiB")
        record(f"scrub {options.rows:,} rows against {options.suppressions:,} (ceiling: bare SQLite anti-join)",
               scrub_time, join_time, "s", max(PEAKS), lower_is_better=True)


if __name__ == "__main__":
    main()
