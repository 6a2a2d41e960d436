"""Fuzz parse and classify with mutations of the shared corpora: no exception escapes, nothing hangs.

CI runs a fixed, derandomized number of cases. A larger campaign is the same test with more cases and a
random seed, in its own process:

    OPTOUT_FUZZ_EXAMPLES=30000 OPTOUT_FUZZ_RANDOM=1 .venv/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py

A crasher it finds becomes a hand-written fixture in fixtures/mail/ and a fix in the code.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import time

from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from optout.classify import classify
from optout.lexicon import load_lexicon
from optout.model import Classification, Kind, Message
from optout.parse import parse_message

from conftest import CORPORA

EXAMPLES = int(os.environ.get("OPTOUT_FUZZ_EXAMPLES", "400"))
RANDOM = os.environ.get("OPTOUT_FUZZ_RANDOM") == "1"
# A campaign reports the first failing case as found (it is minimised by hand); CI shrinks it.
PHASES = (Phase.generate,) if RANDOM else tuple(Phase)
# A hang guard, not a speed test: the slowest corpus message takes well under a second.
CEILING_SECONDS = float(os.environ.get("OPTOUT_FUZZ_CEILING", "10"))
CHARSETS = (b"utf-8", b"us-ascii", b"iso-8859-1", b"windows-1252", b"koi8-r", b"shift_jis", b"iso-2022-jp",
            b"utf-16", b"utf-7", b"gb2312", b"big5", b"x-unknown", b"", b"\"", b"utf-8\x00", b"ibm037")
ENCODINGS = (b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary", b"x-uuencode", b"", b"bogus")
RUNS = (b".", b"!", b"?", b";", b"!?", b"-", b"_", b"=", b"*", b" ", b"\t", b"\n", b"\r\n", b"\n ", b">", b"<",
        b"<div>", b"<td>", b"@", b"a@", b"a.", b"http://", b"=?utf-8?q?", b"\xe4\xb8\x80", b"\xcc\x81", b"x")
HEADERS = (b"From", b"To", b"Cc", b"Reply-To", b"Sender", b"Subject", b"Content-Type", b"Message-ID", b"Date",
           b"References", b"Return-Path", b"Content-Transfer-Encoding", b"Content-Disposition")
HEADER_RUNS = (b"(", b"<", b"\"", b",", b":", b";", b"@", b"\\", b"=?utf-8?q?=3A=40=2C?= ", b"=?utf-8?b?w6Q=?=",
               b"a@b, ", b"\n ", b"\x00", b"\xff", b"[", b"boundary=x;")
NASTY = (b"\x00", b"\r", b"\n", b"\r\n\r\n", b"\xff\xfe", b"=?", b"?=", b"=?utf-8?b?", b"=?x?q?=ZZ?=", b"--",
         b"boundary=", b"\"", b"<", b">", b"@", b"\\", b"\t", b" ", b"=\r\n", b"\xe2\x80\xae", b"\xc3", b"\x1b$B")


def corpus_files() -> list[bytes]:
    if not (CORPORA / "labels.tsv").is_file():
        return []
    with open(CORPORA / "labels.tsv", encoding="utf-8") as handle:
        paths = [row["path"] for row in csv.DictReader(handle, delimiter="\t")]
    return [(CORPORA / path).read_bytes() for path in sorted(paths)]


SEEDS = corpus_files()
# A module global, not the fixture: hypothesis prints the arguments of a failing case, and the tables are big.
LEXICON = load_lexicon()


def _at(data: bytes, where: float) -> int:
    return min(len(data), int(where * (len(data) + 1)))


def flip(data: bytes, where: float, bits: int) -> bytes:
    if not data:
        return data
    i = min(len(data) - 1, int(where * len(data)))
    return data[:i] + bytes([data[i] ^ (bits or 1)]) + data[i + 1:]


def truncate(data: bytes, where: float) -> bytes:
    return data[:_at(data, where)]


def insert(data: bytes, where: float, piece: bytes) -> bytes:
    i = _at(data, where)
    return data[:i] + piece + data[i:]


def delete(data: bytes, where: float, size: int) -> bytes:
    i = _at(data, where)
    return data[:i] + data[i + size:]


def duplicate(data: bytes, where: float, size: int) -> bytes:
    i = _at(data, where)
    return data[:i] + data[i:i + size] * 3 + data[i:]


def split_head(data: bytes) -> tuple[bytes, bytes, bytes]:
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, body = data.partition(separator)
        if found:
            return head, separator, body
    return data, b"", b""


def splice_headers(data: bytes, other: int) -> bytes:
    # The header block of one message over the body of another: a boundary or charset that does not fit.
    _, separator, body = split_head(data)
    head, _, _ = split_head(SEEDS[other] if SEEDS else b"")
    return head + (separator or b"\n\n") + body


def swap_charset(data: bytes, charset: bytes) -> bytes:
    return data.replace(b"charset=", b"charset=" + charset + b";x=", 1) if b"charset=" in data.lower() else (
        data.replace(b"\n\n", b"\nContent-Type: text/plain; charset=" + charset + b"\n\n", 1))


def swap_encoding(data: bytes, encoding: bytes) -> bytes:
    marker = b"Content-Transfer-Encoding:"
    i = data.find(marker)
    if i < 0:
        return data.replace(b"\n\n", b"\n" + marker + b" " + encoding + b"\n\n", 1)
    end = data.find(b"\n", i)
    return data[:i] + marker + b" " + encoding + (data[end:] if end >= 0 else b"")


def mangle_boundary(data: bytes, how: int) -> bytes:
    i = data.lower().find(b"boundary=")
    if i < 0:
        return data
    j = i + len(b"boundary=")
    quoted = data[j:j + 1] == b'"'
    start = j + 1 if quoted else j
    end = start
    while end < len(data) and data[end:end + 1] not in (b'"', b";", b"\r", b"\n", b" "):
        end += 1
    boundary = data[start:end]
    if not boundary:
        return data
    if how == 0:  # the closing boundary goes
        return data.replace(b"--" + boundary + b"--", b"")
    if how == 1:  # the declared boundary differs from the one used
        return data[:start] + boundary[:-1] + data[end:]
    if how == 2:  # every delimiter line lost its dashes
        return data.replace(b"--" + boundary, boundary)
    if how == 3:  # an empty boundary
        return data[:start] + data[end:]
    return data.replace(b"--" + boundary, b"--" + boundary + b"\n--" + boundary, 3)  # empty parts


def repeat(data: bytes, where: float, piece: bytes, count: int) -> bytes:
    # Long runs are what regular expressions choke on: "a.....a", "--- x ------…x", "<div><div>…".
    return insert(data, where, piece * count)


def into_header(data: bytes, name: bytes, piece: bytes, count: int) -> bytes:
    # A run at the start of one header's value: nested comments in From, 10,000 encoded words in Subject.
    found = re.search(rb"(?im)^" + name + rb":[ \t]*", data)
    if not found:
        return name + b": " + piece * count + b"\n" + data
    return data[:found.end()] + piece * count + data[found.end():]


def nest(data: bytes, depth: int) -> bytes:
    # Wrap the message in `depth` multiparts: parsers that recurse once per level run out of stack.
    head, separator, _ = split_head(data)
    head = re.sub(rb"(?im)^content-type:.*(?:\r?\n[ \t].*)*(?:\r?\n|\Z)", b"", head)
    opening = b"".join(b'--n%d\nContent-Type: multipart/mixed; boundary="n%d"\n\n' % (i, i + 1) for i in range(depth))
    closing = b"".join(b"\n--n%d--\n" % i for i in reversed(range(depth + 1)))
    return (b'Content-Type: multipart/mixed; boundary="n0"\n' + head + (separator or b"\n\n") + opening
            + b"--n%d\n" % depth + data + closing)


def crlf(data: bytes, how: int) -> bytes:
    if how == 0:
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if how == 1:
        return data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r")


MUTATIONS = st.one_of(
    st.tuples(st.just(flip), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just(truncate), st.floats(0, 1)),
    st.tuples(st.just(insert), st.floats(0, 1), st.sampled_from(NASTY) | st.binary(max_size=40)),
    st.tuples(st.just(delete), st.floats(0, 1), st.integers(1, 400)),
    st.tuples(st.just(duplicate), st.floats(0, 1), st.integers(1, 400)),
    st.tuples(st.just(swap_charset), st.sampled_from(CHARSETS)),
    st.tuples(st.just(swap_encoding), st.sampled_from(ENCODINGS)),
    st.tuples(st.just(mangle_boundary), st.integers(0, 4)),
    st.tuples(st.just(crlf), st.integers(0, 2)),
    st.tuples(st.just(repeat), st.floats(0, 1), st.sampled_from(RUNS), st.integers(1, 40_000)),
    st.tuples(st.just(nest), st.integers(1, 1_200)),
    st.tuples(st.just(into_header), st.sampled_from(HEADERS), st.sampled_from(HEADER_RUNS), st.integers(1, 6_000)),
    st.tuples(st.just(splice_headers), st.integers(0, max(0, len(SEEDS) - 1))),
)


def mutate(seed: bytes, steps) -> bytes:
    data = seed
    for function, *arguments in steps:
        data = function(data, *arguments)
    return data


@settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(index=st.integers(0, max(0, len(SEEDS) - 1)), steps=st.lists(MUTATIONS, min_size=1, max_size=4))
def test_parse_and_classify_survive_mutated_corpus_mail(corpora, index, steps):
    raw = mutate(SEEDS[index], steps)
    started = time.monotonic()

    message = parse_message(raw)
    classification = classify(message, LEXICON)

    elapsed = time.monotonic() - started
    assert isinstance(message, Message)
    assert isinstance(classification, Classification)
    assert classification.kind in Kind
    assert message.sha256 == hashlib.sha256(raw).hexdigest()
    assert elapsed < CEILING_SECONDS, f"{elapsed:.1f}s for {len(raw)} bytes"


@settings(max_examples=EXAMPLES // 4, derandomize=not RANDOM, database=None, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=st.binary(max_size=3000))
def test_parse_and_classify_survive_arbitrary_bytes(raw):
    message = parse_message(raw)
    classification = classify(message, LEXICON)

    assert message.sha256 == hashlib.sha256(raw).hexdigest()
    assert classification.kind in Kind
