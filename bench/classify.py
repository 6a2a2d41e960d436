"""Classify the whole shared corpus; print messages/second beside the bare flanker parse of the same files.

Figures, not a test: both are measured in this run, on this machine, over the same bytes in memory.
Usage: python bench/classify.py [CORPORA_DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

logging.getLogger("flanker.addresslib._parser.parser").setLevel(logging.ERROR)

from flanker import mime  # noqa: E402

from optout.classify import classify  # noqa: E402
from optout.lexicon import load_lexicon  # noqa: E402
from optout.parse import parse_message  # noqa: E402

from figures import own_peak_mib, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def bare_parse(raw: bytes) -> None:
    """The ceiling: flanker's parse and a walk over the text parts, nothing else."""
    try:
        message = mime.from_string(raw)
    except Exception:
        try:
            message = mime.recover(raw)
        except Exception:
            return
    try:
        for part in message.walk(with_self=True):
            if part.content_type.main == "text":
                part.body
    except Exception:
        pass


def ours(raw: bytes, lexicon) -> None:
    """What optout does per message: parse, clean the text, classify."""
    classify(parse_message(raw), lexicon)


def timed(function, corpus: list[bytes], *args) -> float:
    start = time.perf_counter()
    for raw in corpus:
        function(raw, *args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpora", nargs="?", default=str(ROOT.parent / "shared" / "corpora"))
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    files = sorted(Path(options.corpora).rglob("*.eml"))
    if not files:
        sys.exit(f"no .eml files under {options.corpora}")
    corpus = [f.read_bytes() for f in files]
    lexicon = load_lexicon()
    timed(ours, corpus[:50], lexicon)  # warm up imports and caches
    timed(bare_parse, corpus[:50])
    bare_times, our_times = [], []
    for _ in range(options.rounds):  # interleaved, so both see the same machine
        bare_times.append(timed(bare_parse, corpus))
        our_times.append(timed(ours, corpus, lexicon))
    bare, our = statistics.median(bare_times), statistics.median(our_times)
    size = sum(map(len, corpus)) / 1e6
    print(f"corpus: {len(corpus)} messages, {size:.1f} MB, {lexicon.phrase_count} phrases in "
          f"{len(lexicon.languages)} languages; median of {options.rounds} rounds")
    print(f"{'':32}{'msg/s':>10}{'ms/msg':>10}")
    print(f"{'bare flanker parse (ceiling)':32}{len(corpus) / bare:>10.0f}{bare / len(corpus) * 1e3:>10.2f}")
    print(f"{'optout parse + classify':32}{len(corpus) / our:>10.0f}{our / len(corpus) * 1e3:>10.2f}")
    print(f"ratio: {bare / our:.2f} of the ceiling (aim: at least 0.50)")
    record(f"parse + classify, {len(corpus):,} corpus messages (ceiling: bare flanker parse)", len(corpus) / our,
           len(corpus) / bare, "msg/s", own_peak_mib(), aim="0.50")


if __name__ == "__main__":
    main()
