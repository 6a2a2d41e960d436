"""HMAC-signed tokens for unsubscribe addresses and URLs. Pure: the key is passed in.

A token is the day it was issued (two bytes) and the first twelve bytes of an HMAC-SHA256 over that day,
the normalised address and the list name, in lower-case base32: 23 characters, so that
`unsubscribe+TOKEN@` stays far inside RFC 5321's 64 octets for a local part. The token does not carry the
address: whoever issues it keeps the mapping; what the token proves is that we issued it for that address
and list, and when.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import date

from optout.model import normalise_address

EPOCH = date(2024, 1, 1)
TOKEN_LENGTH = 23
MAC_BYTES = 12


@dataclass(frozen=True)
class Verdict:
    """What checking a token against an address and list found: valid, forged, expired or malformed."""

    status: str
    issued: date | None = None

    @property
    def valid(self) -> bool:
        """Say whether the token may act."""
        return self.status == "valid"


def _mac(key: bytes, day: int, address: str, list_name: str) -> bytes:
    message = b"\x1f".join((b"optout-unsubscribe", day.to_bytes(2, "big"),
                            normalise_address(address).encode("utf-8"), list_name.encode("utf-8")))
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]


def make_token(key: bytes, address: str, list_name: str, issued: date) -> str:
    """Return the token for an address on a list, issued on a day."""
    if not key:
        raise ValueError("an empty token key signs nothing")
    day = (issued - EPOCH).days
    if not 0 <= day < 1 << 16:
        raise ValueError(f"cannot issue a token dated {issued}")
    raw = day.to_bytes(2, "big") + _mac(key, day, address, list_name)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def token_day(token: str) -> date | None:
    """Return the day a token says it was issued, or None when it is no token at all."""
    raw = _decode(token)
    if raw is None:
        return None
    return date.fromordinal(EPOCH.toordinal() + int.from_bytes(raw[:2], "big"))


def _decode(token: str) -> bytes | None:
    token = token.strip().upper()
    if len(token) != TOKEN_LENGTH:
        return None
    try:
        raw = base64.b32decode(token + "=" * (-len(token) % 8))
    except (ValueError, base64.binascii.Error):
        return None
    return raw if len(raw) == 2 + MAC_BYTES else None


def verify_token(key: bytes, token: str, address: str, list_name: str, today: date, max_age_days: int) -> Verdict:
    """Check a token for an address and list: forged (wrong MAC), expired (older than max_age_days) or valid.

    The MAC is compared in constant time.
    """
    raw = _decode(token)
    if raw is None or not key:
        return Verdict("malformed")
    day = int.from_bytes(raw[:2], "big")
    issued = date.fromordinal(EPOCH.toordinal() + day)
    if not hmac.compare_digest(raw[2:], _mac(key, day, address, list_name)):
        return Verdict("forged", issued)
    if (today - issued).days > max_age_days or issued > today:
        return Verdict("expired", issued)
    return Verdict("valid", issued)


def new_confirmation_token() -> str:
    """Return a fresh random confirmation token: 16 characters of lower-case base32 (80 bits from `secrets`).

    Unlike unsubscribe tokens these are not signed: they are single-use, the store keeps their hash with the
    request they confirm, and they expire.
    """
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
