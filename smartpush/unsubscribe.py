"""Signed unsubscribe tokens: channel + campaign + keyed hash of the recipient, HMAC-signed.

A token cannot be forged or enumerated without the secret key, names no address, and stays valid
after the run's data is purged (it carries everything the opt-out needs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

__all__ = ["make_token", "read_token", "recipient_hash"]

#: Hex digits of an address hash: 128 bits, no collision in any audience, and short links.
_HASH_HEX = 32
#: Bytes of HMAC-SHA256 kept in a token: 128 bits is beyond guessing and keeps links short.
_SIGNATURE_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def recipient_hash(key: bytes, channel: str, address: str) -> str:
    """The keyed hash of an address as the suppression list stores it."""
    return hmac.new(key, f"{channel}:{address}".encode(), hashlib.sha256).hexdigest()[:_HASH_HEX]


def make_token(key: bytes, *, campaign: str, channel: str, address_hash: str) -> str:
    payload = _b64(
        json.dumps({"c": campaign, "ch": channel, "h": address_hash}, separators=(",", ":")).encode()
    )
    signature = hmac.new(key, payload.encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]
    return f"{payload}.{_b64(signature)}"


def read_token(key: bytes, token: str) -> dict[str, str] | None:
    """The token's fields if its signature is right, else None."""
    payload, _, signature = token.partition(".")
    try:
        expected = hmac.new(key, payload.encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]
        if not hmac.compare_digest(expected, _unb64(signature)):
            return None
        data = json.loads(_unb64(payload))
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None
