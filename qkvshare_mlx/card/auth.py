"""Card signatures: an HMAC-SHA256 over the checksum, with a shared key.

A signed card carries two more ``__metadata__`` strings: ``signature``,
HMAC-SHA256(key, ``qkvshare.cachecard/signature`` + newline + the card's
``sha256`` hex), and ``key_id``, the first 8 bytes of
SHA-256(``qkvshare.cachecard/key-id`` + newline + key), both lowercase hex
(docs/cachecard-format.md, section 11). The checksum covers the card JSON and
every tensor, so the signature covers them too, and signing changes neither.

Keys come from the API (bytes, or a :class:`CardKey`), the environment
(``QKVSHARE_CARD_KEY``) or a key file, both as hex text of at least 16 bytes.
This module knows nothing about the card's content.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CardAuthError, ConfigError

ENV_KEY = "QKVSHARE_CARD_KEY"
MIN_KEY_BYTES = 16
SIGNATURE_DOMAIN = b"qkvshare.cachecard/signature\n"
KEY_ID_DOMAIN = b"qkvshare.cachecard/key-id\n"
SIGNATURE_HEX = 64
KEY_ID_HEX = 16
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, repr=False)
class CardKey:
    """A shared signing key (its bytes never appear in ``repr``)."""

    secret: bytes

    def __post_init__(self):
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_KEY_BYTES:
            n = len(self.secret) if isinstance(self.secret, bytes) else None
            raise ConfigError(
                f"card key must be at least {MIN_KEY_BYTES} bytes but got {n}"
            )

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key without revealing it."""
        return hashlib.sha256(KEY_ID_DOMAIN + self.secret).hexdigest()[:KEY_ID_HEX]

    def sign(self, checksum: str) -> str:
        """The signature (64 hex digits) of a card checksum."""
        mac = hmac.new(self.secret, SIGNATURE_DOMAIN + checksum.encode(), "sha256")
        return mac.hexdigest()

    def __repr__(self) -> str:
        return f"CardKey(key_id={self.key_id!r})"


def parse_key(text: str, where: str) -> CardKey:
    """A key from hex text (whitespace around it ignored)."""
    text = text.strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(
            f"{where}: expected the key as hex digits, got {len(text)} characters "
            "that are not hex"
        ) from None
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{where}: expected at least {MIN_KEY_BYTES} bytes "
            f"({2 * MIN_KEY_BYTES} hex digits), got {len(secret)}"
        )
    return CardKey(secret)


def load_key(key=None, *, key_file=None, env=None) -> CardKey | None:
    """The key a sender signs with or a receiver requires, or None.

    Args:
        key: a :class:`CardKey`, raw key bytes, or hex text; wins if given.
        key_file: a file holding the key as hex text; used if ``key`` is None.
        env: the environment to read ``QKVSHARE_CARD_KEY`` (hex) from, last
            (default ``os.environ``; pass ``{}`` to ignore it).

    Raises:
        ConfigError: a key that is not hex or shorter than 16 bytes, or an
            unreadable key file.
    """
    if isinstance(key, CardKey):
        return key
    if isinstance(key, (bytes, bytearray)):
        return CardKey(bytes(key))
    if isinstance(key, str):
        return parse_key(key, "key")
    if key is not None:
        raise ConfigError(
            f"key: expected bytes, hex text or a CardKey, got {key!r:.40}"
        )
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"key file {key_file}: cannot read it ({e})") from None
        return parse_key(text, f"key file {key_file}")
    value = (os.environ if env is None else env).get(ENV_KEY)
    return parse_key(value, ENV_KEY) if value else None


def _hex(value, n: int) -> bool:
    return isinstance(value, str) and len(value) == n and set(value) <= _HEX


def signed(meta: dict[str, str], key: CardKey | None) -> dict[str, str]:
    """``meta`` (a card file's ``__metadata__``) with ``key``'s ``signature``
    of its ``sha256`` and the ``key_id``; unchanged for None."""
    if key is None:
        return meta
    return {**meta, "signature": key.sign(meta["sha256"]), "key_id": key.key_id}


def check_fields(meta: dict) -> None:
    """``signature`` and ``key_id`` come together and are well-formed hex."""
    sig, kid = meta.get("signature"), meta.get("key_id")
    if (sig is None) != (kid is None):
        raise CardAuthError(
            "__metadata__: expected both 'signature' and 'key_id' or neither, got "
            + ("only 'signature'" if kid is None else "only 'key_id'")
        )
    if sig is not None and not _hex(sig, SIGNATURE_HEX):
        raise CardAuthError(
            f"signature: expected {SIGNATURE_HEX} lowercase hex digits, got "
            f"{len(sig)} characters"
        )
    if kid is not None and not _hex(kid, KEY_ID_HEX):
        raise CardAuthError(
            f"key_id: expected {KEY_ID_HEX} lowercase hex digits, got {kid!r:.40}"
        )


def verify(meta: dict, key: CardKey) -> None:
    """Refuse unless ``meta`` carries ``key``'s valid signature of its ``sha256``.

    The claimed checksum is then checked against the content by the reader.
    """
    check_fields(meta)
    kid = meta.get("key_id")
    if kid is None:
        raise CardAuthError(
            f"card is unsigned; this receiver requires a signature with key id "
            f"{key.key_id}"
        )
    if not hmac.compare_digest(kid, key.key_id):
        raise CardAuthError(
            f"card signed with key id {kid}, this receiver holds {key.key_id}"
        )
    want = key.sign(str(meta.get("sha256", "")))
    if not hmac.compare_digest(meta["signature"], want):
        raise CardAuthError(f"signature does not match (key id {kid})")
