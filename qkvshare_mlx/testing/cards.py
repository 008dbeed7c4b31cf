"""Valid cards to mutate, and how to take their bytes apart and put them back.

:func:`small_card` is a small card using every stored layout; :func:`parts`,
:func:`forge`, :func:`split` and :func:`join` take valid card bytes apart and
re-serialise edited ones through the public container API (so a forged card
has a valid checksum). numpy only.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from ..card import CacheCard, container, schema
from ..card.auth import CardKey
from ..dtypes import SAFETENSORS
from ..formats import Format, QuantConfig, QuantizedKV
from ..quant.numpy_backend import encode_bucket

# ----------------------------------------------------------------------------
# A small valid card (numpy only)

FINGERPRINT = {
    "model_type": "llama",
    "n_layers": 2,
    "n_kv_heads": 2,
    "head_dim": 64,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "vocab_size": 1000,
    "tokenizer_sha256": "ab" * 32,
    "weights_sha256": "cd" * 32,
}
KEY = CardKey(bytes(range(32)))  # the campaign's shared key
OTHER_KEY = CardKey(bytes(range(1, 33)))


def small_card(
    seed: int = 0,
    *,
    n_tokens: int = 48,
    n_layers: int = 2,
    batch: int = 1,
    window: int | None = None,
):
    """A valid :class:`CacheCard` using every stored layout.

    Per layer: 4 tokens as float16 copies, 40 tokens at 4 bits (32 with
    per-channel keys, 8 per-token), the rest at 2 bits per token.
    Shapes: (B, H=2, T, D=64); vocabulary of 1000 ids. With ``window``
    (at least 45), layer 0 is a sliding-window layer holding only its last
    ``window`` tokens (a version-3 card, ``cache.held_from``).
    """
    held = n_tokens if window is None else min(window, n_tokens)
    if held < 45:
        raise ValueError(f"every layer must hold at least 45 tokens, got {held}")
    rng = np.random.default_rng(seed)
    H, D = 2, 64
    config = QuantConfig(group_size=32, key_group=32)
    layers = []
    for li in range(n_layers):
        n = held if li == 0 else n_tokens
        plan = [
            (Format(16, "token", 0, 0), 4),
            (Format(4, "channel", 32, 32), 40),
            (Format(2, "token", 32, 32), n - 44),
        ]
        keys = rng.standard_normal((batch, H, n_tokens, D)).astype(np.float32)
        values = rng.standard_normal((batch, H, n_tokens, D)).astype(np.float32)
        order = (rng.permutation(n) + n_tokens - n).astype(np.int32)
        segs, start = [], 0
        for fmt, count in plan:
            segs += encode_bucket(keys, values, order[start : start + count], fmt)
            start += count
        layers.append(segs)
    qkv = QuantizedKV(
        layers,
        n_tokens,
        (batch, H, D, D),
        config,
        "saliency",
        budget_bits=4.5,
        held_from=(n_tokens - held,) + (0,) * (n_layers - 1),
    )
    tokens = rng.integers(0, FINGERPRINT["vocab_size"], n_tokens)
    return CacheCard.from_quantized(
        qkv,
        tokens,
        fingerprint_for(n_layers, window),
        runtime="numpy",
        user={"role": "planner"},
    )


def fingerprint_for(n_layers: int = 2, window: int | None = None) -> dict:
    """The fingerprint of :func:`small_card`'s model (layer 0 sliding with
    ``window``, when given)."""
    fp = dict(FINGERPRINT, n_layers=n_layers)
    if window is not None:
        fp["sliding_window"] = window
        fp["layer_types"] = ["sliding"] + ["full"] * (n_layers - 1)
    return fp


def small_card_bytes(seed: int = 0, *, key=None, **kwargs) -> bytes:
    """Bytes of :func:`small_card` (a few tens of KB), signed with ``key``."""
    return small_card(seed, **kwargs).to_bytes(key=key)


# ----------------------------------------------------------------------------
# Taking a card apart and putting it back


def split(data: bytes) -> tuple[dict, bytes]:
    """(safetensors header as a dict, tensor data bytes) of a *valid* card."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header_text: bytes, blob: bytes, *, length: int | None = None) -> bytes:
    """Bytes with a given header text and data (``length`` overrides the prefix)."""
    n = len(header_text) if length is None else length
    return struct.pack("<Q", n % 2**64) + header_text + blob


def header_bytes(header: dict) -> bytes:
    """Header dict as the writer lays it out (compact JSON, space padded to 8)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * ((-len(text)) % 8)


def parts(data: bytes) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(safetensors __metadata__, card metadata, writable tensor copies)."""
    header, blob = split(data)
    meta = header.pop("__metadata__")
    tensors = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        arr = np.frombuffer(blob[s:e], dtype=SAFETENSORS[info["dtype"]])
        tensors[name] = arr.reshape(info["shape"]).copy()
    return meta, json.loads(meta["card"]), tensors


def forge(
    card_meta,
    tensors: dict[str, np.ndarray],
    *,
    card_text: str | None = None,
    version: str | None = None,
) -> bytes:
    """Serialise metadata + tensors with a *valid* checksum, via the writer.

    ``version``: the header's (default: the version the writer would use
    for ``card_meta``, 1 without metadata); the checksum follows it.
    """
    if version is None:
        meta_ok = isinstance(card_meta, dict)
        version = str(
            schema.version_for(card_meta.get("quant"), card_meta.get("cache"))
            if meta_ok
            else 1
        )
    if card_text is None:
        card_text = container.canonical_json(card_meta).decode()
    raw = card_text.encode("utf-8", "surrogatepass")
    header = {
        "format": schema.FORMAT_NAME,
        "version": version,
        "card": card_text,
        "sha256": checksum_raw(raw, tensors, version),
    }
    return container.write(tensors, header)


def checksum_raw(raw: bytes, tensors: dict[str, np.ndarray], version="1") -> str:
    # the checksum's prefix names the version; a non-numeric one hashes as is
    return container.digest(schema.checksum_domain(version), raw, tensors)


def region(data: bytes) -> tuple[int, int]:
    """(start, end) of the JSON header inside valid card bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def flip(data: bytes, rng, lo: int, hi: int, n_flips: int = 1) -> bytes:
    out = bytearray(data)
    for _ in range(n_flips):
        i = int(rng.integers(lo, hi))
        out[i] ^= int(rng.integers(1, 256))
    return bytes(out)


def seg_names(tensors, suffix: str) -> list[str]:
    return sorted(n for n in tensors if n.endswith(suffix))


def editable(data: bytes):
    """(card metadata, tensors) of valid bytes, to edit before :func:`forge`."""
    _, m, t = parts(data)
    return m, t
