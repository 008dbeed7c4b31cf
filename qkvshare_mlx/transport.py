"""Moving a CacheCard from one agent to another: in memory or through a folder
(here), or between processes and machines over ``mx.distributed``
(:mod:`qkvshare_mlx.distributed`).

Every transport moves the card's bytes (``CacheCard.to_bytes``) and hands the
receiver a card that :meth:`CacheCard.from_bytes` has fully validated
(checksum, layout, signature where a key is held, optional model fingerprint);
nothing half-received is ever returned. Addresses are transport-specific: a
mailbox name shared by sender and receiver for :class:`MemoryTransport` and
:class:`DirectoryTransport`, the peer's rank for the distributed transport.

This module knows nothing about models or caches beyond the card's bytes.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from .card import DEFAULT_MAX_BYTES, CacheCard
from .card.auth import load_key
from .errors import (
    ConfigError,
    TransportError,
    TransportTimeoutError,
)

DEFAULT_TIMEOUT = 60.0
CARD_SUFFIX = ".qkv"
_MAILBOX_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


@runtime_checkable
class Transport(Protocol):
    """Moves a card to ``dst`` and receives one from ``src``."""

    def send(self, card: CacheCard, dst) -> None: ...

    def recv(self, src, *, timeout: float | None = DEFAULT_TIMEOUT) -> CacheCard: ...


def check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or timeout < 0
    ):
        raise ConfigError(
            f"timeout must be a number of seconds >= 0 but got {timeout!r}"
        )
    return float(timeout)


def _mailbox(name) -> str:
    name = str(name)
    if not _MAILBOX_NAME.match(name):
        raise ConfigError(
            "mailbox name must be 1-128 characters of letters, digits, '.', '_' "
            f"or '-', not starting with '.', but got {name!r}"
        )
    return name


@dataclass(frozen=True)
class ReadOptions:
    """What every transport applies to the cards it sends and receives.

    Attributes:
        key: a shared key (:class:`~qkvshare_mlx.card.auth.CardKey`, bytes or
            hex text): sent cards are signed with it, received cards must
            carry its valid signature (else CardAuthError).
        max_tokens: refuse received cards of more tokens (CardTooLargeError).
        allow_other_weights: accept cards made with other weights than
            ``expect``'s.
    """

    key: object = None
    max_tokens: int | None = None
    allow_other_weights: bool = False

    def __post_init__(self):
        object.__setattr__(self, "key", load_key(self.key, env={}))

    def kwargs(self) -> dict:
        return {
            "key": self.key,
            "max_tokens": self.max_tokens,
            "allow_other_weights": self.allow_other_weights,
        }


# ----------------------------------------------------------------------------
# In process


class MemoryTransport:
    """Mailboxes in this process: ``send(card, "bob")`` then ``recv("bob")``.

    The card travels as bytes, so the receiver gets an independent, verified
    copy exactly as it would from a file or a socket. Thread-safe.

    Args:
        expect: default model fingerprint that received cards must match.
        max_bytes: refuse cards larger than this.
        key, max_tokens, allow_other_weights: see :class:`ReadOptions`.
    """

    def __init__(
        self,
        *,
        expect: dict | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        key=None,
        max_tokens: int | None = None,
        allow_other_weights: bool = False,
    ):
        self.expect = expect
        self.max_bytes = max_bytes
        self.options = ReadOptions(key, max_tokens, allow_other_weights)
        self._boxes: dict[str, queue.Queue[bytes]] = {}
        self._lock = threading.Lock()

    def _box(self, name) -> queue.Queue[bytes]:
        name = _mailbox(name)
        with self._lock:
            return self._boxes.setdefault(name, queue.Queue())

    def send(self, card: CacheCard, dst) -> None:
        self._box(dst).put(card.to_bytes(key=self.options.key))

    def send_bytes(self, data: bytes, dst) -> None:
        """Deposit raw bytes (used to test what a receiver does with bad input)."""
        self._box(dst).put(bytes(data))

    def recv(
        self,
        src,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        expect: dict | None = None,
    ) -> CacheCard:
        """Take the oldest card from mailbox ``src``, waiting up to ``timeout`` s.

        Raises:
            TransportTimeoutError: nothing arrived in time.
            CardError: the bytes are not a valid card (or not for ``expect``).
        """
        timeout = check_timeout(timeout)
        try:
            data = self._box(src).get(timeout=timeout)
        except queue.Empty:
            raise TransportTimeoutError(
                f"no card arrived in mailbox {str(src)!r} within {timeout} s"
            ) from None
        return CacheCard.from_bytes(
            data,
            expect=expect or self.expect,
            max_bytes=self.max_bytes,
            **self.options.kwargs(),
        )


# ----------------------------------------------------------------------------
# Through a folder (shared disk, NFS, a synced folder)


class DirectoryTransport:
    """A folder of mailboxes: mailbox ``name`` is the file ``<path>/<name>.qkv``.

    ``send`` writes the card to a hidden temporary file in the folder, fsyncs it
    and renames it into place (``os.replace``), so a receiver never sees a
    partial file; an unconsumed card in the same mailbox is replaced (latest
    wins). ``recv`` polls for the file, claims it by renaming it to a private
    name (so two receivers never both take it), reads and validates it, and
    deletes it, whether or not it was valid.

    Args:
        path: the folder; created if missing.
        expect: default model fingerprint that received cards must match.
        max_bytes: refuse cards larger than this.
        poll_interval: seconds between looks at the folder.
        key, max_tokens, allow_other_weights: see :class:`ReadOptions`.
    """

    def __init__(
        self,
        path,
        *,
        expect: dict | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        poll_interval: float = 0.05,
        key=None,
        max_tokens: int | None = None,
        allow_other_weights: bool = False,
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.expect = expect
        self.max_bytes = max_bytes
        self.options = ReadOptions(key, max_tokens, allow_other_weights)
        self.poll_interval = poll_interval

    def card_path(self, name) -> Path:
        return self.path / f"{_mailbox(name)}{CARD_SUFFIX}"

    def send(self, card: CacheCard, dst) -> None:
        try:
            card.save(self.card_path(dst), key=self.options.key)
        except OSError as e:
            raise TransportError(
                f"cannot write card to {self.card_path(dst)}: {e}"
            ) from e

    def recv(
        self,
        src,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        expect: dict | None = None,
    ) -> CacheCard:
        """Wait up to ``timeout`` s for ``<path>/<src>.qkv``, consume and return it.

        Raises:
            TransportTimeoutError: no card appeared in time.
            CardError: the file is not a valid card (it is deleted anyway).
        """
        timeout = check_timeout(timeout)
        path = self.card_path(src)
        deadline = None if timeout is None else time.monotonic() + timeout
        claimed = path.with_name(
            f".{path.name}.{os.getpid()}.{threading.get_ident()}.recv"
        )
        while True:
            try:
                os.rename(path, claimed)
                break
            except FileNotFoundError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportTimeoutError(
                    f"no card appeared at {path} within {timeout} s"
                )
            time.sleep(self.poll_interval)
        try:
            return CacheCard.load(
                claimed,
                expect=expect or self.expect,
                max_bytes=self.max_bytes,
                **self.options.kwargs(),
            )
        finally:
            claimed.unlink(missing_ok=True)


__all__ = [
    "DEFAULT_TIMEOUT",
    "DirectoryTransport",
    "MemoryTransport",
    "ReadOptions",
    "Transport",
    "check_timeout",
]
