"""Hostile inputs for the CacheCard reader: one mutation function per category.

Every mutation is a pure function ``(data, rng) -> bytes`` taking the bytes
of a *valid* card and a ``numpy.random.Generator``; :func:`mutate` picks one
and returns ``(category, mutated bytes)``. The ``forged_*`` categories edit
the metadata or arrays and then re-serialise through the public container
API (:func:`~qkvshare_mlx.card.container.write`, ``digest``,
``canonical_json``), so the checksum is valid and only the reader's content
checks can catch them. A conformance kit for any card reader, as the spec
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

from ..card import CacheCard, container, schema
from ..dtypes import SAFETENSORS
from ..errors import CardError
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
    "weights_sha256": None,
}


def small_card(seed: int = 0, *, n_tokens: int = 48, n_layers: int = 2, batch: int = 1):
    """A valid :class:`CacheCard` using every stored layout.

    Per layer: 4 tokens as float16 copies, 40 tokens at 4 bits (32 with
    per-channel keys, 8 per-token), the rest at 2 bits per token.
    Shapes: (B, H=2, T, D=64); vocabulary of 1000 ids.
    """
    if n_tokens < 45:
        raise ValueError(f"n_tokens must be at least 45, got {n_tokens}")
    rng = np.random.default_rng(seed)
    H, D = 2, 64
    config = QuantConfig(group_size=32, key_group=32)
    plan = [
        (Format(16, "token", 0, 0), 4),
        (Format(4, "channel", 32, 32), 40),
        (Format(2, "token", 32, 32), n_tokens - 44),
    ]
    layers = []
    for _ in range(n_layers):
        keys = rng.standard_normal((batch, H, n_tokens, D)).astype(np.float32)
        values = rng.standard_normal((batch, H, n_tokens, D)).astype(np.float32)
        order = rng.permutation(n_tokens).astype(np.int32)
        segs, start = [], 0
        for fmt, n in plan:
            segs += encode_bucket(keys, values, order[start : start + n], fmt)
            start += n
        layers.append(segs)
    qkv = QuantizedKV(
        layers, n_tokens, (batch, H, D, D), config, "saliency", budget_bits=4.5
    )
    tokens = rng.integers(0, FINGERPRINT["vocab_size"], n_tokens)
    fp = dict(FINGERPRINT, n_layers=n_layers)
    return CacheCard.from_quantized(
        qkv, tokens, fp, runtime="numpy", user={"role": "planner"}
    )


def small_card_bytes(seed: int = 0, **kwargs) -> bytes:
    """Bytes of :func:`small_card` (a few tens of KB)."""
    return small_card(seed, **kwargs).to_bytes()


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
        version = str(schema.version_for(card_meta.get("quant")) if meta_ok else 1)
    if card_text is None:
        card_text = container.canonical_json(card_meta).decode()
    raw = card_text.encode("utf-8", "surrogatepass")
    header = {
        "format": schema.FORMAT_NAME,
        "version": version,
        "card": card_text,
        "sha256": _checksum_raw(raw, tensors, version),
    }
    return container.write(tensors, header)


def _checksum_raw(raw: bytes, tensors: dict[str, np.ndarray], version="1") -> str:
    # the checksum's prefix names the version; a non-numeric one hashes as is
    return container.digest(schema.checksum_domain(version), raw, tensors)


def _region(data: bytes) -> tuple[int, int]:
    """(start, end) of the JSON header inside valid card bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _flip(data: bytes, rng, lo: int, hi: int, n_flips: int = 1) -> bytes:
    out = bytearray(data)
    for _ in range(n_flips):
        i = int(rng.integers(lo, hi))
        out[i] ^= int(rng.integers(1, 256))
    return bytes(out)


def _seg_names(tensors, suffix: str) -> list[str]:
    return sorted(n for n in tensors if n.endswith(suffix))


# ----------------------------------------------------------------------------
# Mutations of the container (the checksum stays stale)


def flip_length(data: bytes, rng) -> bytes:
    """XOR 1-3 random bytes of the 8-byte header length."""
    return _flip(data, rng, 0, 8, int(rng.integers(1, 4)))


def flip_header(data: bytes, rng) -> bytes:
    """XOR 1-4 random bytes of the JSON header (names, shapes, offsets, card)."""
    lo, hi = _region(data)
    return _flip(data, rng, lo, hi, int(rng.integers(1, 5)))


def flip_payload(data: bytes, rng) -> bytes:
    """XOR exactly one byte of tensor data with a non-zero mask."""
    _, hi = _region(data)
    return _flip(data, rng, hi, len(data))


def truncate(data: bytes, rng) -> bytes:
    """Cut the file inside the length, the JSON, the tensor data, or to nothing."""
    lo, hi = _region(data)
    where = _pick(rng, ["length", "json", "data", "empty", "last"])
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
    lo, hi = _region(data)
    n = hi - lo
    lie = _pick(
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


def _edit_header(data: bytes, edit: Callable[[dict], object]) -> bytes:
    header, blob = split(data)
    edit(header)
    return join(header_bytes(header), blob)


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def offsets_outside(data: bytes, rng) -> bytes:
    """Point a tensor's data_offsets (or shape) outside the data section."""
    header, blob = split(data)
    name = _pick(rng, _tensor_names(header))
    info = header[name]
    s, e = info["data_offsets"]
    size = len(blob)
    kind = _pick(
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
    a = _pick(rng, names)
    ia = header[a]
    size_a = ia["data_offsets"][1] - ia["data_offsets"][0]
    # another tensor of the same byte size, else shift a onto its neighbour
    same = [
        n for n in names if n != a and np.diff(header[n]["data_offsets"])[0] == size_a
    ]
    if same and rng.random() < 0.7:
        header[_pick(rng, same)]["data_offsets"] = list(ia["data_offsets"])
    else:
        s0, d = ia["data_offsets"][0], int(rng.integers(1, 64))
        s = s0 - d if s0 >= d else s0 + d
        ia["data_offsets"] = [s, s + size_a]
    return join(header_bytes(header), blob)


def huge_shape(data: bytes, rng) -> bytes:
    """Claim 2^40 or more elements for a tensor, offsets to match or not."""
    header, blob = split(data)
    name = _pick(rng, _tensor_names(header))
    info = header[name]
    shape = _pick(
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
    name = _pick(rng, _tensor_names(header))
    header[name]["dtype"] = _pick(
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
    name = _pick(rng, names)
    kind = _pick(rng, ["drop", "extra", "rename", "duplicate"])
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
    other = _pick(rng, [n for n in _tensor_names(header) if n != name])
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
    where = _pick(rng, ["tensor", "field", "metadata", "card"])
    if where == "tensor":
        return _duplicate_key(data, rng, _pick(rng, _tensor_names(header)))
    if where == "field":
        name = _pick(rng, _tensor_names(header))
        info = header[name]
        body = json.dumps(info, separators=(",", ":"))
        key = _pick(rng, ["dtype", "shape", "data_offsets"])
        body = body[:-1] + "," + json.dumps(key) + ":" + json.dumps(info[key]) + "}"
        entry = json.dumps(name) + ":" + json.dumps(info, separators=(",", ":"))
        text = json.dumps(header, separators=(",", ":"))
        text = text.replace(entry, json.dumps(name) + ":" + body)
        raw = text.encode()
        return join(raw + b" " * ((-len(raw)) % 8), blob)
    if where == "metadata":
        meta = header["__metadata__"]
        key = _pick(rng, ["format", "version", "card", "sha256"])
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
    key = _pick(rng, ["user", "model", "cache", "quant", "version"])
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
    lo, hi = _region(data)
    bad = _pick(
        rng, [b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
    )
    i = int(rng.integers(lo, hi - len(bad)))
    out = bytearray(data)
    out[i : i + len(bad)] = bad
    return bytes(out)


def empty_file(data: bytes, rng) -> bytes:
    """Nothing, zeros, or a length prefix with nothing behind it."""
    return _pick(
        rng,
        [b"", b"\0", b"\0" * 8, b"\0" * 16, struct.pack("<Q", 2) + b"{}", data[:8]],
    )


def garbage_json(data: bytes, rng) -> bytes:
    """Replace the header JSON (stale checksum) or the card JSON (valid checksum)
    with garbage: random bytes, non-objects, NaN/Infinity, 1e400, 5000-digit
    ints, lone surrogates, deep nesting, dense containers."""
    junk = _pick(
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


def _ok(data: bytes):
    """(card metadata, tensors) of valid bytes, to edit before :func:`forge`."""
    _, m, t = parts(data)
    return m, t


# ----------------------------------------------------------------------------
# Forged cards: edited content, valid checksum


def forged_nan_scales(data: bytes, rng) -> bytes:
    """Put NaN/Inf into a layer's scales, biases or float copies, checksum
    recomputed."""
    m, t = _ok(data)
    names = [n for n in t if n.endswith((".scales", ".biases", ".float")) and t[n].size]
    name = _pick(rng, names)
    arr = t[name].reshape(-1)
    arr[int(rng.integers(arr.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
    return forge(m, t)


def forged_future_version(data: bytes, rng) -> bytes:
    """A version from the future in the header, the card metadata, or both."""
    m, t = _ok(data)
    v = int(rng.integers(schema.FORMAT_VERSION + 1, 1000))
    where = _pick(rng, ["header", "card", "both", "header0"])
    if where in ("card", "both"):
        m["version"] = v
    version = str(v) if where in ("header", "both") else str(m["version"])
    if where == "card":
        version = str(schema.version_for(m["quant"]))
    if where == "header0":
        version = _pick(rng, ["0", "1.0", " 1", "01", "v1", ""])
    return forge(m, t, version=version)


def forged_tokens_outside_vocab(data: bytes, rng) -> bytes:
    """Token ids at or past vocab_size, or negative, checksum recomputed."""
    m, t = _ok(data)
    tok = t["tokens"]
    vocab = m["model"]["vocab_size"]
    tok[int(rng.integers(tok.size))] = _pick(
        rng, [vocab, vocab + 1, 2**31 - 1, -1, -(2**31)]
    )
    return forge(m, t)


def forged_other_model(data: bytes, rng) -> bytes:
    """A card for another model: one fingerprint field changed (load with expect)."""
    m, t = _ok(data)
    key, value = _pick(
        rng,
        [
            ("model_type", "mistral"),
            ("n_layers", 30),
            ("n_kv_heads", 3),
            ("head_dim", 128),
            ("rope_theta", 500000.0),
            ("rope_scaling", {"factor": 8.0}),
            ("vocab_size", 49152),
            ("tokenizer_sha256", "0" * 64),
        ],
    )
    m["model"][key] = value
    return forge(m, t)


def _fields(m: dict) -> list[tuple[tuple, object]]:
    """Paths to scalar fields of the card metadata."""
    out = [(("version",), m["version"])]
    for k, v in m["cache"].items():
        out.append((("cache", k), v))
    for k, v in m["model"].items():
        out.append((("model", k), v))
    for k, v in m["quant"].items():
        if k != "config":
            out.append((("quant", k), v))
    for k, v in m["quant"]["config"].items():
        out.append((("quant", "config", k), v))
    for li, layer in enumerate(m["layers"]):
        for si, seg in enumerate(layer):
            for k in ("bits", "n"):
                out.append((("layers", li, si, k), seg[k]))
            for kv in ("k", "v"):
                for k, v in seg[kv].items():
                    out.append((("layers", li, si, kv, k), v))
    for k in ("cache", "model", "quant", "producer", "user", "layers"):
        out.append(((k,), m[k]))
    return out


def forged_bad_types(data: bytes, rng) -> bytes:
    """A metadata field of the wrong type or range: str, bool, float, negative,
    null, list, object, huge; checksum recomputed."""
    m, t = _ok(data)
    path, old = _pick(rng, _fields(m))
    candidates = [True, False, [], {}, -1, 2**64]
    if path[0] != "model" and path != ("quant", "budget_bits"):
        candidates.append(None)  # null means "unknown" in a fingerprint
    if isinstance(old, int) and not isinstance(old, bool):
        candidates += [float(old) + 0.5, -old - 1, str(old)]
        if old in (0, 1):
            candidates.append(not old)
    elif isinstance(old, str):
        candidates += [7, 2**40, 1.5]
        if path[:2] == ("cache", "dtype") or path[-1] in ("key_layout", "float_dtype"):
            candidates.append(old + "x")  # enumerations: an unknown name is wrong
    elif isinstance(old, float):
        candidates += ["4", 2**40]
    elif isinstance(old, list | dict):
        candidates += ["4", 7]
    candidates = [c for c in candidates if not (c == old and type(c) is type(old))]
    if isinstance(old, bool | dict):  # another bool or object is still well-typed
        candidates = [c for c in candidates if type(c) is not type(old)]
    new = _pick(rng, candidates)
    obj = m
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = new
    return forge(m, t)


def forged_bad_index(data: bytes, rng) -> bytes:
    """A layer's index that is not a permutation of 0..T-1 (a repeated, negative,
    past-the-end or huge position), checksum recomputed.

    The index is U16 for T <= 65536: a negative or huge position is stored as
    the two's-complement value a careless writer would produce (it wraps past
    the end); for an I32 index it is stored as is.
    """
    m, t = _ok(data)
    name = _pick(rng, _seg_names(t, ".index"))
    idx = t[name]
    T = m["cache"]["n_tokens"]
    i = int(rng.integers(idx.size))
    kind = _pick(rng, ["dup", "neg", "past", "huge"])
    if kind == "dup":  # another position of the same layer, now held twice
        j = (i + 1 + int(rng.integers(idx.size - 1))) % idx.size
        new = int(idx[j])
    elif kind == "neg":
        new = -1 - int(rng.integers(T))
    elif kind == "past":
        new = T + int(rng.integers(T))
    else:
        new = 2**31 - 1
    info = np.iinfo(idx.dtype)
    idx[i] = new if info.min <= new <= info.max else new % (int(info.max) + 1)
    return forge(m, t)


def forged_nested_metadata(data: bytes, rng) -> bytes:
    """Deeply nested or oversized JSON inside user metadata, checksum recomputed."""
    m, t = _ok(data)
    depth = int(rng.integers(container.MAX_JSON_DEPTH, 400))
    deep: object = 1
    for _ in range(depth):
        deep = [deep] if rng.random() < 0.5 else {"a": deep}
    m["user"]["deep"] = deep
    return forge(m, t)


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
}


def mutate(data: bytes, rng, category: str | None = None) -> tuple[str, bytes]:
    """One mutation of valid card bytes: (category, mutated bytes)."""
    if category is None:
        category = _pick(rng, sorted(MUTATIONS))
    return category, MUTATIONS[category](data, rng)


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
        same = card.to_bytes() == original
    except Exception as e:  # noqa: BLE001 - an accepted card that cannot be re-written
        return Outcome("crash", type(e).__name__, f"re-serialise: {e}", peak, seconds)
    return Outcome("identical" if same else "different", None, "", peak, seconds)
