"""What every benchmark shares: reading a process's peak memory, and handing its figures to `bench/run.py`."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time


def peak_rss_kib(pid: int) -> int:
    """Return the process's peak resident set so far (VmHWM: the kernel's high-water mark, no sample missed)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def own_peak_mib() -> float:
    """Return this process's peak resident set in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_watched(args: list[str], **options) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; return its result, wall time and peak RSS in MiB (VmHWM, polled until it exits).

    VmHWM rather than getrusage(RUSAGE_CHILDREN): a child's ru_maxrss also counts the pages it shared with
    this process between fork and exec.
    """
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, peak_rss_kib(process.pid))
            done.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, errors = process.communicate()
    elapsed = time.perf_counter() - started
    done.set()
    watcher.join()
    return subprocess.CompletedProcess(args, process.returncode, output, errors), elapsed, peak / 1024


def record(measurement: str, optout: float, ceiling: float, unit: str, peak_mib: float | None = None,
           lower_is_better: bool = False, aim: str = "", note: str = "") -> None:
    """Hand one figure and its ceiling (measured in the same run) to `bench/run.py`, when it is listening."""
    target = os.environ.get("OPTOUT_BENCH_FIGURES")
    if not target:
        return
    ratio = ceiling / optout if lower_is_better else optout / ceiling
    with open(target, "a", encoding="utf-8") as figures:
        figures.write(json.dumps({"measurement": measurement, "optout": optout, "ceiling": ceiling, "unit": unit,
                                  "ratio": ratio, "peak_mib": peak_mib, "aim": aim, "note": note}) + "\n")
