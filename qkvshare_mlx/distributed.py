"""A CacheCard between processes and machines, over ``mx.distributed``.

The wire format is two messages per card on a point-to-point link of a group
started by ``mlx.launch --backend ring``:

1. a header, ``uint32[13]``: magic ``0x53564B51`` (b"QKVS"), version ``1``,
   payload length in bytes (low, high 32 bits), chunk size in bytes, SHA-256 of
   the payload (8 words, little-endian);
2. the payload, the card bytes as consecutive ``uint8`` arrays of the chunk
   size (the last one shorter), so the receiver follows the sender's chunking.

The receiver refuses a header whose length exceeds its cap before allocating
anything, and verifies the SHA-256 before parsing. MLX's ``recv`` blocks
without a timeout, so the receive runs in a daemon thread and the caller waits
with a deadline. On a timeout the link is in an unknown state (a late message
would land in the abandoned receive): the transport refuses further use and
the process should exit and be relaunched with its peers (the blocked thread
is a daemon; ``dist_demo`` leaves with ``os._exit`` to skip teardown). A peer
whose process ends closes its socket: that surfaces at once as a
``TransportError``, not as a timeout (MLX fails the receive or completes it
with zeros, which no valid header or checksum matches).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from .card import DEFAULT_MAX_BYTES, CacheCard
from .errors import (
    CardIntegrityError,
    CardTooLargeError,
    ConfigError,
    TransportError,
    TransportTimeoutError,
)
from .transport import DEFAULT_TIMEOUT, ReadOptions, check_timeout

HEADER_MAGIC = 0x53564B51  # b"QKVS" read as a little-endian uint32
HEADER_VERSION = 1
HEADER_WORDS = 13
CHUNK_BYTES = 64 << 20

# ----------------------------------------------------------------------------
# Between processes and machines: mx.distributed point-to-point


def encode_header(payload, *, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """The ``uint32[13]`` header announcing ``payload`` (bytes-like)."""
    n = memoryview(payload).nbytes
    if not 0 < chunk_bytes < 2**32:
        raise ConfigError(f"chunk_bytes must be in 1..2**32-1 but got {chunk_bytes}")
    digest = np.frombuffer(hashlib.sha256(payload).digest(), dtype="<u4")
    head = [HEADER_MAGIC, HEADER_VERSION, n & 0xFFFFFFFF, n >> 32, chunk_bytes]
    return np.concatenate([np.array(head, dtype=np.uint32), digest.astype(np.uint32)])


def decode_header(
    header, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[int, int, bytes]:
    """Check a received header; return (payload length, chunk size, SHA-256).

    Raises:
        TransportError: wrong size, magic or version, an empty payload or a
            zero chunk size.
        CardTooLargeError: the announced length exceeds ``max_bytes``.
    """
    h = np.asarray(header)
    if h.dtype != np.uint32 or h.shape != (HEADER_WORDS,):
        raise TransportError(
            f"header: expected uint32[{HEADER_WORDS}], got {h.dtype}{list(h.shape)}"
        )
    if not h.any():
        # MLX's ring backend completes a receive on a closed socket with zeros.
        raise TransportError(
            "header: received all zeros; the connection to the peer was lost "
            "before it sent a card"
        )
    if int(h[0]) != HEADER_MAGIC:
        raise TransportError(
            f"header magic: expected {HEADER_MAGIC:#010x}, got {int(h[0]):#010x} "
            "(the peer is not sending a CacheCard)"
        )
    if int(h[1]) != HEADER_VERSION:
        raise TransportError(
            f"header version: this receiver knows {HEADER_VERSION}, got {int(h[1])}"
        )
    n = int(h[2]) | (int(h[3]) << 32)
    if n == 0:
        raise TransportError("header length: expected a non-empty card, got 0 bytes")
    if n > max_bytes:
        raise CardTooLargeError(
            f"header length: peer announces {n} bytes, the cap is {max_bytes}"
        )
    chunk = int(h[4])
    if chunk == 0:
        raise TransportError("header chunk size: expected at least 1 byte, got 0")
    return n, chunk, h[5:].astype("<u4").tobytes()


def verify_payload(payload, digest: bytes) -> None:
    """Raise CardIntegrityError unless SHA-256(payload) equals ``digest``."""
    got = hashlib.sha256(payload).digest()
    if got != digest:
        raise CardIntegrityError(
            f"transfer checksum: header says {digest.hex()[:16]}..., "
            f"received bytes hash to {got.hex()[:16]}..."
        )


def _run_with_deadline(fn, timeout: float | None, what: str):
    """Run ``fn()`` in a daemon thread; its result, or a timeout after ``timeout`` s."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, name=f"qkvshare-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TransportTimeoutError(
            f"{what}: nothing complete within {timeout} s; the link is now unusable, "
            "exit and relaunch both processes"
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


class DistributedTransport:
    """Point-to-point card transfer between ranks of an ``mx.distributed`` group.

    Start the processes with ``mlx.launch --backend ring`` (or set ``MLX_RANK``
    and ``MLX_HOSTFILE`` yourself). Every card sent must be received by the
    peer, in order; a card is two messages (header, payload) on the link.

    Args:
        group: an ``mx.distributed.Group``; None initialises the ring backend
            and uses the global group.
        expect: default model fingerprint that received cards must match.
        max_bytes: refuse headers announcing more bytes than this.
        chunk_bytes: this side sends the payload as arrays of this many bytes
            (announced in the header; a receiver follows the sender's).
        key, max_tokens, allow_other_weights: see :class:`ReadOptions`.

    Raises:
        TransportError: the group has fewer than 2 processes.
    """

    def __init__(
        self,
        group=None,
        *,
        expect: dict | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        key=None,
        max_tokens: int | None = None,
        allow_other_weights: bool = False,
    ):
        import mlx.core as mx

        self._mx = mx
        if group is None:
            group = init_group()
        if group.size() < 2:
            raise TransportError(
                f"group size: expected at least 2 processes, got {group.size()} "
                "(start the agents with `mlx.launch -n 2 --backend ring -- ...`)"
            )
        self.group = group
        self.expect = expect
        self.max_bytes = max_bytes
        self.chunk_bytes = int(chunk_bytes)
        self.options = ReadOptions(key, max_tokens, allow_other_weights)
        self._broken: str | None = None

    @property
    def rank(self) -> int:
        return self.group.rank()

    def _peer(self, peer, role: str) -> int:
        if self._broken:
            raise TransportError(
                f"the link is unusable after an earlier failure ({self._broken}); "
                "exit and relaunch the processes"
            )
        size = self.group.size()
        if not isinstance(peer, int) or isinstance(peer, bool) or not 0 <= peer < size:
            raise ConfigError(f"{role}: expected a rank in 0..{size - 1}, got {peer!r}")
        if peer == self.rank:
            raise ConfigError(f"{role}: rank {peer} is this process; pick a peer")
        return peer

    def send(self, card: CacheCard, dst: int, *, timeout: float | None = None) -> int:
        """Send ``card`` to rank ``dst``; return the bytes put on the wire.

        Blocks until the peer has taken the data (or ``timeout`` s pass).
        """
        return self.send_bytes(
            card.to_bytes(key=self.options.key), dst, timeout=timeout
        )

    def send_bytes(
        self, data: bytes, dst: int, *, timeout: float | None = None, header=None
    ) -> int:
        """Send raw card bytes; ``header`` overrides the computed one (for tests)."""
        dst = self._peer(dst, "dst")
        timeout = check_timeout(timeout)
        mx, group = self._mx, self.group
        if header is None:
            header = encode_header(data, chunk_bytes=self.chunk_bytes)
        head = np.asarray(header, dtype=np.uint32)
        chunk = int(head[4])
        payload = np.frombuffer(data, dtype=np.uint8)

        def work():
            mx.eval(
                mx.distributed.send(mx.array(head), dst, group=group, stream=mx.cpu)
            )
            for s in range(0, payload.size, chunk):
                part = mx.array(payload[s : s + chunk])
                mx.eval(mx.distributed.send(part, dst, group=group, stream=mx.cpu))
            return head.nbytes + payload.size

        return self._guarded(work, timeout, f"send card to rank {dst}")

    def recv_bytes(self, src: int, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        """Receive one card's bytes from rank ``src``, checksum verified."""
        src = self._peer(src, "src")
        timeout = check_timeout(timeout)
        mx, group, cap = self._mx, self.group, self.max_bytes

        def work():
            head = mx.distributed.recv(
                (HEADER_WORDS,), mx.uint32, src, group=group, stream=mx.cpu
            )
            n, chunk, digest = decode_header(np.array(head), max_bytes=cap)
            out = np.empty(n, dtype=np.uint8)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                part = mx.distributed.recv(
                    (e - s,), mx.uint8, src, group=group, stream=mx.cpu
                )
                out[s:e] = np.array(part)
            verify_payload(out, digest)
            return out.tobytes()

        return self._guarded(work, timeout, f"receive card from rank {src}")

    def recv(
        self,
        src: int,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        expect: dict | None = None,
    ) -> CacheCard:
        """Receive, verify and parse one card from rank ``src``.

        Raises:
            TransportTimeoutError: no complete card within ``timeout`` s; the
                link is then unusable and the process should exit.
            TransportError: the peer vanished or sent a bad header.
            CardTooLargeError: the header announces more than ``max_bytes``.
            CardIntegrityError: the bytes do not match the header's SHA-256.
            CardError: the bytes are not a valid card (or not for ``expect``).
        """
        data = self.recv_bytes(src, timeout=timeout)
        return CacheCard.from_bytes(
            data,
            expect=expect or self.expect,
            max_bytes=self.max_bytes,
            **self.options.kwargs(),
        )

    def _guarded(self, work, timeout, what: str):
        try:
            return _run_with_deadline(work, timeout, what)
        except TransportTimeoutError as e:
            self._broken = str(e)
            raise
        except CardIntegrityError:
            raise  # the whole message was read: the link is still in step
        except (TransportError, CardTooLargeError) as e:
            # A bad header: the rest of the peer's message is on the link, unread.
            self._broken = str(e)
            raise
        except RuntimeError as e:
            # MLX reports a closed socket ("connection to a peer was lost").
            self._broken = str(e)
            raise TransportError(f"{what}: {e}") from e


def init_group(backend: str = "ring"):
    """The global ``mx.distributed`` group, started with ``backend``.

    Raises:
        TransportError: the backend is unavailable or cannot connect.
    """
    import mlx.core as mx

    if not mx.distributed.is_available(backend):
        raise TransportError(f"mx.distributed backend {backend!r} is not available")
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise TransportError(
            f"cannot start mx.distributed ({backend}): {e}; launch with "
            f"`mlx.launch --backend {backend}` or set MLX_RANK and MLX_HOSTFILE"
        ) from e


_TRANSPORTS: dict[int, DistributedTransport] = {}


def _transport_for(group) -> DistributedTransport:
    if group is None:
        group = init_group()
    transport = _TRANSPORTS.get(id(group))
    if transport is None or transport.group is not group:
        transport = _TRANSPORTS[id(group)] = DistributedTransport(group)
    return transport


def send_card(
    card: CacheCard,
    dst: int,
    *,
    group=None,
    timeout: float | None = None,
    key=None,
) -> int:
    """Send ``card`` to rank ``dst`` of ``group``; return the bytes sent.

    See :class:`DistributedTransport`; ``group=None`` uses the global ring
    group; ``key`` signs the card.
    """
    return _transport_for(group).send_bytes(
        card.to_bytes(key=key), dst, timeout=timeout
    )


def recv_card(
    src: int,
    *,
    group=None,
    timeout: float | None = DEFAULT_TIMEOUT,
    expect: dict | None = None,
    key=None,
    max_tokens: int | None = None,
    allow_other_weights: bool = False,
) -> CacheCard:
    """Receive one verified card from rank ``src`` of ``group`` within ``timeout`` s.

    ``key``, ``max_tokens``, ``allow_other_weights``: see :class:`ReadOptions`.

    Raises:
        TransportTimeoutError: no complete card in time; exit the process.
        TransportError, CardError: see :meth:`DistributedTransport.recv`.
    """
    transport = _transport_for(group)
    data = transport.recv_bytes(src, timeout=timeout)
    options = ReadOptions(key, max_tokens, allow_other_weights)
    return CacheCard.from_bytes(
        data,
        expect=expect or transport.expect,
        max_bytes=transport.max_bytes,
        **options.kwargs(),
    )


__all__ = [
    "CHUNK_BYTES",
    "DistributedTransport",
    "decode_header",
    "encode_header",
    "init_group",
    "recv_card",
    "send_card",
    "verify_payload",
]
