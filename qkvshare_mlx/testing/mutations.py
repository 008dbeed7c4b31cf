"""Hostile inputs for the CacheCard reader: one mutation function per category.

Every mutation is a pure function ``(data, rng) -> bytes`` taking the bytes
of a *valid* card and a ``numpy.random.Generator``; :func:`mutate` picks one
and returns ``(category, mutated bytes)``. The ``forged_*`` categories edit
the metadata or arrays and then re-serialise through the public container
API (:func:`~qkvshare_mlx.card.container.write`, ``digest``,
``canonical_json``), so the checksum is valid and only the reader's content
checks can catch them. The :data:`AUTH_MUTATIONS` take a card signed with
:data:`KEY` and are loaded with that key: forged, stripped and truncated
signatures, wrong key ids, content changed under a valid checksum. A
conformance kit for any card reader, as the spec
invites: feed it the mutated bytes and expect a refusal or an identical card.

:func:`load_outcome` runs one load under ``tracemalloc`` and classifies it:
``"error"`` (a :class:`~qkvshare_mlx.errors.CardError`), ``"identical"``
(accepted and byte-identical to the original when re-serialised),
``"different"`` (accepted but changed: a reader bug for these categories) or
``"crash"`` (any other exception: a reader bug).

Used by ``tests/test_testing_mutations.py`` and ``bench/robustness.py``.
This module knows card bytes and numpy only; it never touches files or MLX.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..card import CacheCard, container
from ..dtypes import SAFETENSORS
from ..errors import CardError
from .cards import *  # noqa: F403  (the kit's one namespace: F.small_card, F.forge)
from .cards import (
    flip,
    forge,
    header_bytes,
    join,
    parts,
    pick,
    region,
    split,
)
from .forgeries import *  # noqa: F403
from .forgeries import (
    AUTH_MUTATIONS,
    forged_bad_index,
    forged_bad_types,
    forged_future_version,
    forged_key_rope,
    forged_nan_scales,
    forged_nested_metadata,
    forged_other_model,
    forged_tokens_outside_vocab,
    forged_weights_digest,
)

# ----------------------------------------------------------------------------
# Mutations of the container (the checksum stays stale)


def flip_length(data: bytes, rng) -> bytes:
    """XOR 1-3 random bytes of the 8-byte header length."""
    return flip(data, rng, 0, 8, int(rng.integers(1, 4)))


def flip_header(data: bytes, rng) -> bytes:
    """XOR 1-4 random bytes of the JSON header (names, shapes, offsets, card)."""
    lo, hi = region(data)
    return flip(data, rng, lo, hi, int(rng.integers(1, 5)))


def flip_payload(data: bytes, rng) -> bytes:
    """XOR exactly one byte of tensor data with a non-zero mask."""
    _, hi = region(data)
    return flip(data, rng, hi, len(data))


def truncate(data: bytes, rng) -> bytes:
    """Cut the file inside the length, the JSON, the tensor data, or to nothing."""
    lo, hi = region(data)
    where = pick(rng, ["length", "json", "data", "empty", "last"])
    if where == "length":
        return data[: int(rng.integers(0, 8))]
    if where == "json":
        return data[: int(rng.integers(lo, hi))]
    if where == "data":
        return data[: int(rng.integers(hi, len(data)))]
    if where == "last":
        return data[:-1]
    return b""


def header_length_lie(data: bytes, rng) -> bytes:
    """Rewrite the 8-byte length: a bit larger/smaller, past the file, 2^63, 2^64-1."""
    lo, hi = region(data)
    n = hi - lo
    lie = pick(
        rng,
        [
            n + int(rng.integers(1, 64)),
            max(n - int(rng.integers(1, 64)), 0),
            len(data),
            len(data) - 7,
            2**63,
            2**64 - 1,
            2**32 + n,
            0,
        ],
    )
    return struct.pack("<Q", lie) + data[8:]


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def offsets_outside(data: bytes, rng) -> bytes:
    """Point a tensor's data_offsets (or shape) outside the data section."""
    header, blob = split(data)
    name = pick(rng, _tensor_names(header))
    info = header[name]
    s, e = info["data_offsets"]
    size = len(blob)
    kind = pick(
        rng, ["past_end", "negative", "reversed", "shift", "grow_shape", "huge"]
    )
    if kind == "past_end":
        info["data_offsets"] = [size - (e - s) + int(rng.integers(1, 64)), size + 64]
        info["data_offsets"][0] = info["data_offsets"][1] - (e - s)
    elif kind == "negative":
        info["data_offsets"] = [-(e - s) - 8, -8]
    elif kind == "reversed":
        info["data_offsets"] = [e, s]
    elif kind == "shift":
        d = int(rng.integers(1, 9))
        info["data_offsets"] = [s + d, e + d]
    elif kind == "grow_shape":
        info["shape"] = [d * 2 for d in info["shape"]] or [2]
    else:
        info["data_offsets"] = [s, s + 2**62]
    return join(header_bytes(header), blob)


def overlapping_offsets(data: bytes, rng) -> bytes:
    """Make two tensors share bytes (aliasing), keeping each span self-consistent."""
    header, blob = split(data)
    names = _tensor_names(header)
    a = pick(rng, names)
    ia = header[a]
    size_a = ia["data_offsets"][1] - ia["data_offsets"][0]
    # another tensor of the same byte size, else shift a onto its neighbour
    same = [
        n for n in names if n != a and np.diff(header[n]["data_offsets"])[0] == size_a
    ]
    if same and rng.random() < 0.7:
        header[pick(rng, same)]["data_offsets"] = list(ia["data_offsets"])
    else:
        s0, d = ia["data_offsets"][0], int(rng.integers(1, 64))
        s = s0 - d if s0 >= d else s0 + d
        ia["data_offsets"] = [s, s + size_a]
    return join(header_bytes(header), blob)


def huge_shape(data: bytes, rng) -> bytes:
    """Claim 2^40 or more elements for a tensor, offsets to match or not."""
    header, blob = split(data)
    name = pick(rng, _tensor_names(header))
    info = header[name]
    shape = pick(
        rng, [[2**20, 2**20], [2**40], [2**39, 2**39], [1, 2**40, 1], [2**40] * 8]
    )
    info["shape"] = shape
    item = np.dtype(SAFETENSORS[info["dtype"]]).itemsize
    n = int(np.prod(shape, dtype=object)) * item
    if rng.random() < 0.5:
        info["data_offsets"] = [0, n]
    return join(header_bytes(header), blob)


def wrong_dtype(data: bytes, rng) -> bytes:
    """Replace a tensor's dtype: F64, BF16, I8, U8, unknown strings, non-strings."""
    header, blob = split(data)
    name = pick(rng, _tensor_names(header))
    header[name]["dtype"] = pick(
        rng,
        [
            "F64",
            "BF16",
            "I8",
            "U8",
            "I64",
            "F8_E4M3",
            "f32",
            "",
            "QQ",
            None,
            4,
            ["F32"],
        ],
    )
    return join(header_bytes(header), blob)


def tensor_set(data: bytes, rng) -> bytes:
    """Drop a tensor, add an extra one, rename one, or duplicate a name in the JSON."""
    header, blob = split(data)
    names = _tensor_names(header)
    name = pick(rng, names)
    kind = pick(rng, ["drop", "extra", "rename", "duplicate"])
    if kind == "drop":
        del header[name]
    elif kind == "extra":
        header["l99.index"] = dict(header[name])
    elif kind == "rename":
        header[name + "x"] = header.pop(name)
    else:
        return _duplicate_key(data, rng, name)
    return join(header_bytes(header), blob)


def _duplicate_key(data: bytes, rng, name: str) -> bytes:
    """Repeat ``name`` in the header; the repeat points at another tensor's bytes."""
    header, blob = split(data)
    other = pick(rng, [n for n in _tensor_names(header) if n != name])
    text = json.dumps(header, separators=(",", ":"))
    dup = json.dumps(name) + ":" + json.dumps(header[other], separators=(",", ":"))
    first = rng.random() < 0.5
    text = "{" + dup + "," + text[1:] if first else text[:-1] + "," + dup + "}"
    raw = text.encode()
    return join(raw + b" " * ((-len(raw)) % 8), blob)


def duplicate_keys(data: bytes, rng) -> bytes:
    """Duplicate JSON keys where a parser may keep the first or the last value.

    In the safetensors header (a tensor name, a field of a tensor entry, a
    ``__metadata__`` key) or inside the card JSON with a valid checksum (so
    only a duplicate-key check can tell the two readings apart).
    """
    header, blob = split(data)
    where = pick(rng, ["tensor", "field", "metadata", "card"])
    if where == "tensor":
        return _duplicate_key(data, rng, pick(rng, _tensor_names(header)))
    if where == "field":
        name = pick(rng, _tensor_names(header))
        info = header[name]
        body = json.dumps(info, separators=(",", ":"))
        key = pick(rng, ["dtype", "shape", "data_offsets"])
        body = body[:-1] + "," + json.dumps(key) + ":" + json.dumps(info[key]) + "}"
        entry = json.dumps(name) + ":" + json.dumps(info, separators=(",", ":"))
        text = json.dumps(header, separators=(",", ":"))
        text = text.replace(entry, json.dumps(name) + ":" + body)
        raw = text.encode()
        return join(raw + b" " * ((-len(raw)) % 8), blob)
    if where == "metadata":
        meta = header["__metadata__"]
        key = pick(rng, ["format", "version", "card", "sha256"])
        body = json.dumps(meta, separators=(",", ":"))
        body = body[:-1] + "," + json.dumps(key) + ":" + json.dumps(meta[key]) + "}"
        rest = {k: v for k, v in header.items() if k != "__metadata__"}
        text = (
            '{"__metadata__":'
            + body
            + ","
            + json.dumps(rest, separators=(",", ":"))[1:]
        )
        raw = text.encode()
        return join(raw + b" " * ((-len(raw)) % 8), blob)
    _, m, tensors = parts(data)
    key = pick(rng, ["user", "model", "cache", "quant", "version"])
    text = container.canonical_json(m).decode()
    evil = {
        "user": {"role": "admin"},
        "model": {},
        "cache": {},
        "quant": {},
        "version": 1,
    }
    text = text[:-1] + "," + json.dumps(key) + ":" + json.dumps(evil[key]) + "}"
    return forge(None, tensors, card_text=text)


def non_utf8_header(data: bytes, rng) -> bytes:
    """Put invalid UTF-8 (0xff, continuation, overlong, surrogate) in the header."""
    lo, hi = region(data)
    bad = pick(
        rng, [b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
    )
    i = int(rng.integers(lo, hi - len(bad)))
    out = bytearray(data)
    out[i : i + len(bad)] = bad
    return bytes(out)


def empty_file(data: bytes, rng) -> bytes:
    """Nothing, zeros, or a length prefix with nothing behind it."""
    return pick(
        rng,
        [b"", b"\0", b"\0" * 8, b"\0" * 16, struct.pack("<Q", 2) + b"{}", data[:8]],
    )


def garbage_json(data: bytes, rng) -> bytes:
    """Replace the header JSON (stale checksum) or the card JSON (valid checksum)
    with garbage: random bytes, non-objects, NaN/Infinity, 1e400, 5000-digit
    ints, lone surrogates, deep nesting, dense containers."""
    junk = pick(
        rng,
        [
            "",
            "null",
            "[]",
            "42",
            '"card"',
            "{",
            '{"a":NaN}',
            '{"a":Infinity}',
            '{"a":-Infinity}',
            '{"a":1e400}',
            '{"a":' + "9" * 5000 + "}",
            '{"a":"\\ud800"}',
            "[" * 100_000 + "]" * 100_000,
            '{"a":' * 40 + "1" + "}" * 40,
            "[" + ",".join(["{}"] * 20_000) + "]",
            bytes(rng.integers(32, 127, 200, dtype=np.uint8)).decode(),
        ],
    )
    if rng.random() < 0.5:
        raw = junk.encode()
        return join(raw + b" " * ((-len(raw)) % 8), b"")
    _, _, tensors = parts(data)
    return forge(None, tensors, card_text=junk)


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "flip_length": flip_length,
    "flip_header": flip_header,
    "flip_payload": flip_payload,
    "truncate": truncate,
    "header_length_lie": header_length_lie,
    "offsets_outside": offsets_outside,
    "overlapping_offsets": overlapping_offsets,
    "huge_shape": huge_shape,
    "wrong_dtype": wrong_dtype,
    "tensor_set": tensor_set,
    "duplicate_keys": duplicate_keys,
    "non_utf8_header": non_utf8_header,
    "empty_file": empty_file,
    "garbage_json": garbage_json,
    "forged_nan_scales": forged_nan_scales,
    "forged_future_version": forged_future_version,
    "forged_tokens_outside_vocab": forged_tokens_outside_vocab,
    "forged_other_model": forged_other_model,
    "forged_bad_types": forged_bad_types,
    "forged_bad_index": forged_bad_index,
    "forged_nested_metadata": forged_nested_metadata,
    "forged_weights_digest": forged_weights_digest,
    "forged_key_rope": forged_key_rope,
}


def mutate(data: bytes, rng, category: str | None = None) -> tuple[str, bytes]:
    """One mutation of valid card bytes: (category, mutated bytes)."""
    if category is None:
        category = pick(rng, sorted(MUTATIONS))
    return category, {**MUTATIONS, **AUTH_MUTATIONS}[category](data, rng)


# ----------------------------------------------------------------------------
# Running one load


def memory_cap(n_input: int) -> int:
    """Largest allocation a load of ``n_input`` bytes may make: 4x + 1 MiB."""
    return 4 * n_input + (1 << 20)


@dataclass
class Outcome:
    """How one load of (possibly mutated) bytes ended.

    Attributes:
        kind: ``"error"``, ``"identical"``, ``"different"`` or ``"crash"``.
        error: exception class name (None when accepted).
        message: the exception message.
        peak_bytes: tracemalloc peak during the load.
        seconds: wall time of the load.
    """

    kind: str
    error: str | None
    message: str
    peak_bytes: int
    seconds: float


def load_outcome(
    original: bytes, mutated: bytes, *, expect: dict | None = None, **kwargs
) -> Outcome:
    """Load ``mutated`` (with ``expect``) and classify against ``original``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    card = exc = None
    try:
        card = CacheCard.from_bytes(mutated, expect=expect, **kwargs)
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point
        exc = e
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if exc is not None:
        kind = "error" if isinstance(exc, CardError) else "crash"
        return Outcome(kind, type(exc).__name__, str(exc), peak, seconds)
    try:
        same = card.to_bytes(key=kwargs.get("key")) == original
    except Exception as e:  # noqa: BLE001 - an accepted card that cannot be re-written
        return Outcome("crash", type(e).__name__, f"re-serialise: {e}", peak, seconds)
    return Outcome("identical" if same else "different", None, "", peak, seconds)
