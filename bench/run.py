"""Run every benchmark and print one table: each figure beside its ceiling measured in the same run.

    python bench/run.py            # the full sizes (what `make bench` runs; a few minutes on 2 cores)
    python bench/run.py --quick    # smaller sizes, to check that everything runs
    python bench/run.py --markdown # the table as Markdown, for the README

Ratios are "how much of the ceiling optout reaches" (1.00 = as fast as the bare library alone); for the scrub,
whose ceiling is a time, the bare join's time divided by optout's. Benchmarks assert nothing: they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = (
    ("classify.py", [], ["--rounds", "2"]),
    ("smtp_ingest.py", [], ["--messages", "300"]),
    ("imap_backlog.py", [], ["--messages", "1000"]),
    ("scrub.py", [], ["--rows", "100000", "--suppressions", "100000", "--rounds", "1"]),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller sizes: checks that every benchmark runs.")
    parser.add_argument("--markdown", action="store_true", help="Print the table as Markdown.")
    parser.add_argument("--only", action="append", help="Run only this benchmark (e.g. scrub.py); repeatable.")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        figures_path = Path(folder) / "figures.jsonl"
        env = {**os.environ, "OPTOUT_BENCH_FIGURES": str(figures_path)}
        failed = []
        for script, full, quick in BENCHMARKS:
            if options.only and script not in options.only:
                continue
            print(f"== {script} {' '.join(quick if options.quick else full)}", flush=True)
            started = time.perf_counter()
            result = subprocess.run([sys.executable, str(HERE / script), *(quick if options.quick else full)], env=env)
            print(f"   ({time.perf_counter() - started:.0f} s)\n", flush=True)
            if result.returncode:
                failed.append(script)
        figures = [json.loads(line) for line in figures_path.read_text().splitlines()] if figures_path.exists() else []
    print(table(figures, options.markdown))
    print(f"\n{os.cpu_count()} CPUs; {'quick sizes' if options.quick else 'full sizes'}; "
          f"peak memory is the optout process's high-water mark (VmHWM).")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def table(figures: list[dict], markdown: bool) -> str:
    """Format the figures as a plain or Markdown table."""
    header = ["measurement", "optout", "ceiling", "ratio", "aim", "peak MiB"]
    rows = [[f["measurement"] + (f" ({f['note']})" if f["note"] else ""), f"{number(f['optout'])} {f['unit']}",
             f"{number(f['ceiling'])} {f['unit']}", f"{f['ratio']:.2f}", f["aim"] or "-",
             "-" if f["peak_mib"] is None else f"{f['peak_mib']:.0f}"] for f in figures]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def number(value: float) -> str:
    """Format a figure: thousands separators for big ones, two decimals for small ones."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


if __name__ == "__main__":
    main()
