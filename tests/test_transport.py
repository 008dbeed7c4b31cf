"""Transports move a card's bytes and return only fully verified cards.

The in-process and folder transports are tested end to end here; the
mx.distributed framing (header, cap, checksum) is tested as pure functions,
and over a real two-process ring in test_distributed.py.
"""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.distributed import (
    HEADER_MAGIC,
    HEADER_WORDS,
    DistributedTransport,
    decode_header,
    encode_header,
    init_group,
    verify_payload,
)
from qkvshare_mlx.errors import (
    CardIntegrityError,
    CardTooLargeError,
    ConfigError,
    ModelMismatchError,
    TransportError,
    TransportTimeoutError,
)
from qkvshare_mlx.quant.mlx_backend import quantize_cache
from qkvshare_mlx.transport import DirectoryTransport, MemoryTransport, Transport

FINGERPRINT = {
    "model_type": "llama",
    "n_layers": 2,
    "n_kv_heads": 2,
    "head_dim": 32,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "vocab_size": 100,
    "tokenizer_sha256": None,
    "weights_sha256": None,
}


@pytest.fixture(scope="module")
def card() -> CacheCard:
    rng = np.random.default_rng(0)
    shape = (1, 2, 24, 32)  # (B, H, T, D)
    keys = [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2)]
    values = [mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2)]
    qkv = quantize_cache(keys, values, controller="uniform", budget_bits=4.5)
    tokens = rng.integers(0, 100, size=24)
    return CacheCard.from_quantized(qkv, tokens, FINGERPRINT, user={"from": "alice"})


def assert_same_card(a: CacheCard, b: CacheCard) -> None:
    assert a.checksum() == b.checksum()
    assert np.array_equal(a.tokens, b.tokens)
    assert b.user == {"from": "alice"}


def flip_byte(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x40
    return bytes(out)


# ---------------------------------------------------------------------------
# MemoryTransport


def test_memory_round_trip_is_bit_exact_and_fifo(card):
    transport = MemoryTransport(expect=FINGERPRINT)
    assert isinstance(transport, Transport)
    other = CacheCard.from_bytes(card.to_bytes())
    other.user = {"from": "alice", "n": 2}
    transport.send(card, "bob")
    transport.send(other, "bob")
    assert_same_card(card, transport.recv("bob", timeout=1))
    assert transport.recv("bob", timeout=1).user["n"] == 2


def test_memory_recv_waits_for_a_late_sender(card):
    transport = MemoryTransport()
    timer = threading.Timer(0.2, transport.send, args=(card, "bob"))
    timer.start()
    try:
        assert_same_card(card, transport.recv("bob", timeout=5))
    finally:
        timer.cancel()


def test_memory_timeout_is_typed_and_on_time():
    transport = MemoryTransport()
    start = time.monotonic()
    with pytest.raises(TransportTimeoutError, match="'bob' within 0.2 s"):
        transport.recv("bob", timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 2


def test_memory_rejects_corrupted_bytes(card):
    transport = MemoryTransport()
    data = card.to_bytes()
    transport.send_bytes(flip_byte(data, len(data) - 5), "bob")
    with pytest.raises(CardIntegrityError):
        transport.recv("bob", timeout=1)


def test_memory_checks_the_receivers_model(card):
    transport = MemoryTransport(expect={**FINGERPRINT, "n_layers": 30})
    transport.send(card, "bob")
    with pytest.raises(ModelMismatchError, match="n_layers"):
        transport.recv("bob", timeout=1)


# ---------------------------------------------------------------------------
# DirectoryTransport


def test_directory_round_trip_consumes_the_file(card, tmp_path):
    sender = DirectoryTransport(tmp_path / "box")
    receiver = DirectoryTransport(tmp_path / "box", expect=FINGERPRINT)
    sender.send(card, "bob")
    assert [p.name for p in (tmp_path / "box").iterdir()] == ["bob.qkv"]
    assert_same_card(card, receiver.recv("bob", timeout=1))
    assert list((tmp_path / "box").iterdir()) == []


def test_directory_recv_waits_for_a_late_sender(card, tmp_path):
    transport = DirectoryTransport(tmp_path, poll_interval=0.01)
    timer = threading.Timer(0.2, transport.send, args=(card, "bob"))
    timer.start()
    try:
        assert_same_card(card, transport.recv("bob", timeout=5))
    finally:
        timer.cancel()


def test_directory_timeout_is_typed_and_on_time(tmp_path):
    transport = DirectoryTransport(tmp_path, poll_interval=0.01)
    start = time.monotonic()
    with pytest.raises(TransportTimeoutError, match="bob.qkv within 0.3 s"):
        transport.recv("bob", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2


def test_directory_ignores_partial_files(card, tmp_path):
    # A writer's temporary file is never mistaken for the card.
    (tmp_path / ".bob.qkv.123.tmp").write_bytes(card.to_bytes()[:100])
    with pytest.raises(TransportTimeoutError):
        DirectoryTransport(tmp_path).recv("bob", timeout=0.1)


def test_directory_rejects_and_removes_a_corrupted_card(card, tmp_path):
    data = card.to_bytes()
    (tmp_path / "bob.qkv").write_bytes(flip_byte(data, len(data) - 5))
    with pytest.raises(CardIntegrityError):
        DirectoryTransport(tmp_path).recv("bob", timeout=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", ""])
def test_directory_refuses_mailbox_names_that_escape_the_folder(tmp_path, name, card):
    with pytest.raises(ConfigError, match="mailbox name"):
        DirectoryTransport(tmp_path).send(card, name)


# ---------------------------------------------------------------------------
# Distributed framing


def test_header_round_trip(card):
    data = card.to_bytes()
    header = encode_header(data, chunk_bytes=4096)
    assert header.dtype == np.uint32 and header.shape == (HEADER_WORDS,)
    n, chunk, digest = decode_header(header)
    assert (n, chunk) == (len(data), 4096)
    verify_payload(np.frombuffer(data, np.uint8), digest)


def test_header_length_uses_both_words():
    header = encode_header(b"x")
    header[2], header[3] = 0, 1  # 4 GiB
    assert decode_header(header, max_bytes=8 << 30)[0] == 1 << 32


def test_header_claiming_a_huge_length_is_refused():
    header = encode_header(b"x")
    header[2], header[3] = 0xFFFFFFFF, 0xFFFFFFFF
    with pytest.raises(CardTooLargeError, match="18446744073709551615 bytes"):
        decode_header(header)
    header = encode_header(b"x" * 2048)
    with pytest.raises(CardTooLargeError, match="2048 bytes, the cap is 1024"):
        decode_header(header, max_bytes=1024)


@pytest.mark.parametrize(
    "word, value, message",
    [(0, 0x12345678, "magic"), (1, 99, "version"), (2, 0, "length"), (4, 0, "chunk")],
)
def test_bad_headers_are_refused(word, value, message):
    header = encode_header(b"x")
    header[word] = value
    with pytest.raises(TransportError, match=message):
        decode_header(header)


def test_header_of_wrong_size_is_refused():
    with pytest.raises(TransportError, match=r"uint32\[13\]"):
        decode_header(np.array([HEADER_MAGIC, 1, 1], dtype=np.uint32))


def test_corrupted_payload_fails_the_transfer_checksum(card):
    data = card.to_bytes()
    *_, digest = decode_header(encode_header(data))
    with pytest.raises(CardIntegrityError, match="transfer checksum"):
        verify_payload(flip_byte(data, 7), digest)


def test_empty_header_means_the_peer_is_gone():
    # MLX completes a receive on a closed socket with zeros.
    with pytest.raises(TransportError, match="connection to the peer was lost"):
        decode_header(np.zeros(HEADER_WORDS, dtype=np.uint32))


def test_distributed_transport_needs_a_peer(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    with pytest.raises(TransportError, match="MLX_RANK and MLX_HOSTFILE"):
        init_group("ring")
    single = mx.distributed.init(strict=False, backend="ring")
    with pytest.raises(TransportError, match="at least 2 processes, got 1"):
        DistributedTransport(single)
