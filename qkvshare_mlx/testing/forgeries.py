"""Forged cards: edited content under a valid checksum, and forged signatures.

Each function is a mutation ``(valid card bytes, rng) -> bytes`` (see
:mod:`.mutations`). The ``forged_*`` ones edit the card JSON or arrays and
re-serialise with a valid checksum, so only the reader's content checks can
catch them; :data:`AUTH_MUTATIONS` take a card signed with
:data:`~.cards.KEY` and are loaded with that key.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..card import container, schema
from .cards import (
    KEY,
    OTHER_KEY,
    editable,
    flip,
    forge,
    header_bytes,
    join,
    parts,
    pick,
    region,
    seg_names,
    split,
)

# ----------------------------------------------------------------------------
# Forged cards: edited content, valid checksum


def forged_nan_scales(data: bytes, rng) -> bytes:
    """Put NaN/Inf into a layer's scales, biases or float copies, checksum
    recomputed."""
    m, t = editable(data)
    names = [n for n in t if n.endswith((".scales", ".biases", ".float")) and t[n].size]
    name = pick(rng, names)
    arr = t[name].reshape(-1)
    arr[int(rng.integers(arr.size))] = pick(rng, [np.nan, np.inf, -np.inf])
    return forge(m, t)


def forged_future_version(data: bytes, rng) -> bytes:
    """A version from the future in the header, the card metadata, or both."""
    m, t = editable(data)
    v = int(rng.integers(schema.FORMAT_VERSION + 1, 1000))
    where = pick(rng, ["header", "card", "both", "header0"])
    if where in ("card", "both"):
        m["version"] = v
    version = str(v) if where in ("header", "both") else str(m["version"])
    if where == "card":
        version = str(schema.version_for(m["quant"]))
    if where == "header0":
        version = pick(rng, ["0", "1.0", " 1", "01", "v1", ""])
    return forge(m, t, version=version)


def forged_tokens_outside_vocab(data: bytes, rng) -> bytes:
    """Token ids at or past vocab_size, or negative, checksum recomputed."""
    m, t = editable(data)
    tok = t["tokens"]
    vocab = m["model"]["vocab_size"]
    tok[int(rng.integers(tok.size))] = pick(
        rng, [vocab, vocab + 1, 2**31 - 1, -1, -(2**31)]
    )
    return forge(m, t)


def forged_other_model(data: bytes, rng) -> bytes:
    """A card for another model: one fingerprint field changed (load with expect)."""
    m, t = editable(data)
    key, value = pick(
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
    m, t = editable(data)
    path, old = pick(rng, _fields(m))
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
    if path == ("model", "rope_scaling") and old is None:
        candidates.remove({})  # no scaling, spelled as an object: the same model
    candidates = [c for c in candidates if not (c == old and type(c) is type(old))]
    if isinstance(old, bool | dict):  # another bool or object is still well-typed
        candidates = [c for c in candidates if type(c) is not type(old)]
    new = pick(rng, candidates)
    obj = m
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = new
    return forge(m, t)


def with_key_rope(data: bytes, defect: str | None = None, rng=None) -> bytes:
    """The card re-declared as holding pre-RoPE keys (``quant.config.key_rope``,
    version 4, ``cache.held_from``; checksum recomputed): a valid card without
    ``defect``, else one with that defect (see :data:`KEY_ROPE_DEFECTS`)."""
    m, t = editable(data)
    L, D = m["cache"]["n_layers"], m["cache"]["head_dim_k"]
    freqs = [float(np.float32(10000.0 ** (-2 * i / D))) for i in range(D // 2)]
    rope = {"specs": [{"pairing": "half", "freqs": freqs}], "layers": [0] * L}
    if defect is not None:
        KEY_ROPE_DEFECTS[defect](rope, rng or np.random.default_rng(0), D)
    m["quant"]["config"]["key_rope"] = rope
    m["cache"].setdefault("held_from", [0] * L)
    m["version"] = 4
    return forge(m, t)


def _bad_freq(rope, rng, D):
    freqs = rope["specs"][0]["freqs"]
    bad = pick(rng, [4.0, -3.5, 1e300, 0.1, "0.5", None, True, [0.5]])
    freqs[int(rng.integers(0, len(freqs)))] = bad  # 0.1 is no float32 value


# Each makes a valid key_rope object invalid in one way.
KEY_ROPE_DEFECTS = {
    "unknown pairing": lambda r, rng, D: r["specs"][0].update(pairing="halves"),
    "bad frequency": _bad_freq,
    "too many channels": lambda r, rng, D: r["specs"][0]["freqs"].extend([0.5] * 2),
    "no channels": lambda r, rng, D: r["specs"][0].update(freqs=[]),
    "spec out of range": lambda r, rng, D: r["layers"].__setitem__(0, 1),
    "negative spec": lambda r, rng, D: r["layers"].__setitem__(0, -1),
    "too few layers": lambda r, rng, D: r["layers"].pop(),
    "too many layers": lambda r, rng, D: r["layers"].append(0),
    "extra key": lambda r, rng, D: r.update(offset=0),
    "spec extra key": lambda r, rng, D: r["specs"][0].update(scale=1.0),
    "no specs": lambda r, rng, D: r.update(specs=[]),
    "specs not a list": lambda r, rng, D: r.update(specs={"pairing": "half"}),
    "freqs not a list": lambda r, rng, D: r["specs"][0].update(freqs=0.5),
}


def forged_key_rope(data: bytes, rng) -> bytes:
    """Pre-RoPE keys declared with a malformed ``key_rope`` (an unknown
    pairing, a frequency that is no float32 in [-pi, pi], more channels than
    the head, a spec index or layer count that does not fit), checksum
    recomputed."""
    return with_key_rope(data, pick(rng, sorted(KEY_ROPE_DEFECTS)), rng)


def forged_bad_index(data: bytes, rng) -> bytes:
    """A layer's index that is not a permutation of 0..T-1 (a repeated, negative,
    past-the-end or huge position), checksum recomputed.

    The index is U16 for T <= 65536: a negative or huge position is stored as
    the two's-complement value a careless writer would produce (it wraps past
    the end); for an I32 index it is stored as is.
    """
    m, t = editable(data)
    name = pick(rng, seg_names(t, ".index"))
    idx = t[name]
    T = m["cache"]["n_tokens"]
    i = int(rng.integers(idx.size))
    kind = pick(rng, ["dup", "neg", "past", "huge"])
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
    m, t = editable(data)
    depth = int(rng.integers(container.MAX_JSON_DEPTH, 400))
    deep: object = 1
    for _ in range(depth):
        deep = [deep] if rng.random() < 0.5 else {"a": deep}
    m["user"]["deep"] = deep
    return forge(m, t)


def forged_weights_digest(data: bytes, rng) -> bytes:
    """Another weights digest, valid checksum: made with other weights."""
    _, m, t = parts(data)
    digest = bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex()
    m["model"]["weights_sha256"] = digest if digest != "cd" * 32 else "ef" * 32
    return forge(m, t)


# ----------------------------------------------------------------------------
# Signed cards (input signed with KEY, loaded with KEY)


def _edit_metadata(data: bytes, edit: Callable[[dict], object]) -> bytes:
    header, blob = split(data)
    edit(header["__metadata__"])
    return join(header_bytes(header), blob)


def _random_hex(rng, n: int) -> str:
    return bytes(rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)).hex()[:n]


def forged_signature(data: bytes, rng) -> bytes:
    """A random signature (or one bit of the real one flipped)."""

    def edit(meta):
        if rng.random() < 0.5:
            meta["signature"] = _random_hex(rng, 64)
        else:
            i = int(rng.integers(64))
            d = int(meta["signature"][i], 16) ^ (1 << int(rng.integers(4)))
            meta["signature"] = (
                meta["signature"][:i] + f"{d:x}" + meta["signature"][i + 1 :]
            )

    return _edit_metadata(data, edit)


def stripped_signature(data: bytes, rng) -> bytes:
    """The signature, the key id or both removed."""
    drop = pick(rng, [("signature", "key_id"), ("signature",), ("key_id",)])
    return _edit_metadata(data, lambda meta: [meta.pop(k) for k in drop])


def truncated_signature(data: bytes, rng) -> bytes:
    """The signature cut short (or padded)."""

    def edit(meta):
        sig = meta["signature"]
        n = int(rng.integers(0, 64))
        meta["signature"] = sig[:n] if rng.random() < 0.8 else sig + "0"

    return _edit_metadata(data, edit)


def wrong_key_id(data: bytes, rng) -> bytes:
    """Another key id beside the valid signature (random or OTHER_KEY's)."""
    kid = OTHER_KEY.key_id if rng.random() < 0.5 else _random_hex(rng, 16)
    return _edit_metadata(data, lambda meta: meta.update(key_id=kid))


def signed_other_key(data: bytes, rng) -> bytes:
    """Validly signed, with OTHER_KEY (optionally claiming KEY's id)."""

    def edit(meta):
        meta["signature"] = OTHER_KEY.sign(meta["sha256"])
        meta["key_id"] = KEY.key_id if rng.random() < 0.5 else OTHER_KEY.key_id

    return _edit_metadata(data, edit)


def forged_signed_content(data: bytes, rng) -> bytes:
    """Content changed, checksum recomputed, the old signature kept."""
    meta, m, t = parts(data)
    if rng.random() < 0.5:
        m["user"]["role"] = pick(rng, ["admin", "system", "planner "])
    else:
        name = pick(rng, seg_names(t, ".scales"))
        t[name].reshape(-1)[int(rng.integers(t[name].size))] += np.float16(1)
    forged = forge(m, t)
    return _edit_metadata(
        forged,
        lambda new: new.update(signature=meta["signature"], key_id=meta["key_id"]),
    )


def flip_signed_payload(data: bytes, rng) -> bytes:
    """One byte of a signed card's tensor data changed (see
    ``mutations.flip_payload``)."""
    _, hi = region(data)
    return flip(data, rng, hi, len(data))


AUTH_MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "auth_forged_signature": forged_signature,
    "auth_stripped_signature": stripped_signature,
    "auth_truncated_signature": truncated_signature,
    "auth_wrong_key_id": wrong_key_id,
    "auth_signed_other_key": signed_other_key,
    "auth_forged_content": forged_signed_content,
    "auth_flip_payload": flip_signed_payload,
}
