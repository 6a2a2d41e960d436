"""DKIM signing of replies (dkimpy), when a key is configured."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import dkim

from optout.errors import ConfigError

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"in-reply-to", b"references", b"auto-submitted"]


def dkim_signer(selector: str, domain: str, key_path: str | Path) -> Callable[[bytes], bytes]:
    """Return a function that DKIM-signs a reply with the private key in key_path (read once, never logged)."""
    try:
        key = Path(key_path).read_bytes()
    except OSError as error:
        raise ConfigError(f"DKIM key {key_path}: {error.strerror or error}") from None
    if b"PRIVATE KEY" not in key:
        raise ConfigError(f"DKIM key {key_path}: not a PEM private key")

    def sign(raw: bytes) -> bytes:
        return dkim.sign(raw, selector.encode(), domain.encode(), key, include_headers=SIGNED_HEADERS) + raw

    return sign
