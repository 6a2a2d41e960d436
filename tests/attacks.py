"""Hostile mail built on demand: huge, deep, wide, and a zip bomb. Each builder returns the raw bytes.

Kept apart from the tests so that a subprocess can build a message itself and measure only its own memory:

    python -c "import attacks; print(len(attacks.build('deep')))"
"""

from __future__ import annotations

import base64
import struct
import zlib

HEAD = (b"From: Ann Example <ann@example.net>\r\n"
        b"To: privacy@example.com\r\n"
        b"Subject: Please unsubscribe me\r\n"
        b"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
        b"Message-ID: <attack@example.net>\r\n"
        b"MIME-Version: 1.0\r\n")
WORDS = b"Please unsubscribe me from every mailing.\r\n"
MEGABYTE = 1 << 20


def huge(megabytes: int = 50) -> bytes:
    """Return a plain message whose body is `megabytes` MB of text lines after a one-line request."""
    line = b"x" * 68 + b"\r\n"
    return HEAD + b"Content-Type: text/plain\r\n\r\n" + WORDS + line * (megabytes * MEGABYTE // len(line))


def many_headers(count: int = 10_000) -> bytes:
    """Return a message with `count` extra header fields before its own."""
    extra = b"".join(b"X-Filler-%d: value %d\r\n" % (i, i) for i in range(count))
    return extra + HEAD + b"Content-Type: text/plain\r\n\r\n" + WORDS


def deep(depth: int = 1_000) -> bytes:
    """Return multiparts nested `depth` deep with the person's words in the innermost part."""
    opening = b"".join(b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
                       for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth + 1)))
    return (HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + opening
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\n" % depth + WORDS + closing)


def long_header(megabytes: int = 1) -> bytes:
    """Return a message with one unfolded Subject line of `megabytes` MB."""
    subject = b"Subject: " + b"unsubscribe " * (megabytes * MEGABYTE // 12)
    return HEAD.replace(b"Subject: Please unsubscribe me", subject) + b"Content-Type: text/plain\r\n\r\n" + WORDS


def zip_bomb_archive(gigabytes: int = 2) -> bytes:
    """Return a valid zip of one file of `gigabytes` GB of zeros, about 1 MB per GB compressed.

    After a full flush, deflate starts afresh, so one compressed megabyte of zeros repeats byte for byte.
    """
    chunk = b"\0" * MEGABYTE
    count = gigabytes * 1024 - 1  # stays below 4 GiB: no zip64 records needed
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    data = block * count + compressor.flush()
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    size, name = count * MEGABYTE, b"report.bin"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def zip_bomb(gigabytes: int = 2) -> bytes:
    """Return a request with the zip bomb attached (base64, as a mail client sends it)."""
    archive = base64.encodebytes(zip_bomb_archive(gigabytes)).replace(b"\n", b"\r\n")
    return (HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
            b"--B\r\nContent-Type: text/plain\r\n\r\n" + WORDS
            + b'--B\r\nContent-Type: application/zip; name="report.zip"\r\n'
              b'Content-Disposition: attachment; filename="report.zip"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\n" + archive + b"--B--\r\n")


def many_recipients(count: int = 10_000) -> bytes:
    """Return a message whose To: lists `count` addresses (folded), ours last."""
    listed = b",\r\n ".join(b"reader%d@example.org" % i for i in range(count)) + b",\r\n privacy@example.com"
    return HEAD.replace(b"To: privacy@example.com", b"To: " + listed) + b"Content-Type: text/plain\r\n\r\n" + WORDS


BUILDERS = {"huge": huge, "many_headers": many_headers, "deep": deep, "long_header": long_header,
            "zip_bomb": zip_bomb, "many_recipients": many_recipients}


def build(name: str) -> bytes:
    """Return the attack message of that name."""
    return BUILDERS[name]()
