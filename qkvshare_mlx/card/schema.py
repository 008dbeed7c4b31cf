"""The card's metadata schema: what the JSON must say, and the tensors it implies.

docs/cachecard-format.md in code. From the card JSON alone (before any
tensor byte is read) :func:`expected_tensors` derives the name, dtype and
shape of every tensor the file must hold, checking each field's type, range
and consistency on the way; :func:`encoded_shapes` gives the shapes of one
segment's keys or values. Every failure is a CardFormatError naming the
field, what was expected and what arrived.

The module knows the JSON (the card's, and the file's ``__metadata__``
that carries it: :func:`file_metadata`, :func:`check_file_metadata`) and the
tensor table; it knows nothing about file bytes (:mod:`.container`) or about
the CacheCard object (:mod:`.card`).
"""

from __future__ import annotations

import math

from ..errors import CardFormatError, ConfigError
from ..fingerprint import layer_windows
from ..formats import (
    ALL_BITS,
    CODE_BITS,
    FLOAT_BITS,
    GROUP_SIZES,
    Encoded,
    QuantConfig,
    Segment,
    padded,
    padded_dim,
    token_groups,
    window_start,
)
from ..rope import KeyRope
from ..rotation import check_rotation

FORMAT_NAME = "qkvshare.cachecard"
FORMAT_VERSION = 4  # the newest this library reads and writes
# Versions read. Writers emit the lowest version that can hold the card:
# 1 without a rotation (byte-identical to earlier releases), 2 with one, 3
# when a sliding-window layer holds only its window (``cache.held_from``) or
# a head size no group divides is stored in padded rows, 4 with pre-RoPE
# keys (``quant.config.key_rope``), so an older reader refuses what it
# would misread.
READ_VERSIONS = (1, 2, 3, 4)
CACHE_DTYPES = ("float16", "bfloat16", "float32")
# Per-layer token positions are stored as U16 while they fit, else as I32.
MAX_U16_TOKENS = 1 << 16
MAX_SIZE = 2**31  # cache.* values are int32: 0 <= v < MAX_SIZE
FLOAT_TENSOR_DTYPES = {"float16": "F16", "float32": "F32"}  # quant.config.float_dtype
# The packed per-layer tensors and their dtypes (None: quant.config.float_dtype).
PACKED = {"codes": "U32", "scales": "F16", "biases": "F16", "float": None}
CACHE_FIELDS = (
    "n_layers",
    "batch",
    "n_kv_heads",
    "head_dim_k",
    "head_dim_v",
    "n_tokens",
    "offset",
)
FINGERPRINT_KINDS = {
    "model_type": str,
    "n_layers": int,
    "n_kv_heads": int,
    "head_dim": int,
    "rope_theta": (int, float),
    "rope_scaling": dict,
    "vocab_size": int,
    "tokenizer_sha256": str,
    "weights_sha256": str,
    "rope_local_theta": (int, float),
    "partial_rotary_factor": (int, float),
    "sliding_window": int,
    "layer_types": list,
    "attn_softcap": (int, float),
}
HASH_FIELDS = ("tokenizer_sha256", "weights_sha256")  # 64 lowercase hex digits
# Keys of each object, exactly: a key the reader did not know would be
# dropped when the card is handed on (and another reader might act on it).
# ``model``, ``producer`` and ``user`` take any further keys (kept as read).
CARD_KEYS = (
    "format",
    "version",
    "producer",
    "model",
    "cache",
    "quant",
    "layers",
    "user",
)
QUANT_KEYS = ("controller", "budget_bits", "effective_bits", "nominal_bits", "config")
SEGMENT_KEYS = ("bits", "n", "k", "v")
ENCODED_KEYS = ("layout", "group")
_HEX = frozenset("0123456789abcdef")


def checksum_domain(version: int) -> str:
    """The domain tag hashed before a card's metadata (see container.digest)."""
    return f"{FORMAT_NAME}/{version}"


# The safetensors ``__metadata__`` of a card file (docs/cachecard-format.md).
METADATA_KEYS = ("format", "version", "card", "sha256")
SIGNATURE_KEYS = ("signature", "key_id")  # optional (docs/cachecard-format.md, 11)


def file_metadata(card_json: bytes, version: int, checksum: str) -> dict[str, str]:
    """The ``__metadata__`` of an unsigned card file (:data:`METADATA_KEYS`)."""
    return {
        "format": FORMAT_NAME,
        "version": str(version),
        "card": card_json.decode(),
        "sha256": checksum,
    }


def check_file_metadata(meta: dict) -> int:
    """Refuse a ``__metadata__`` of another format, an unread version, or
    missing or unknown keys; returns the version."""
    if meta.get("format") != FORMAT_NAME:
        raise CardFormatError(
            f"format: expected {FORMAT_NAME!r}, got {meta.get('format')!r:.60}"
        )
    version = meta.get("version")
    if version not in [str(v) for v in READ_VERSIONS]:
        raise CardFormatError(
            f"version: this reader knows versions {list(READ_VERSIONS)}, "
            f"card has {version!r:.60}"
        )
    for name in ("card", "sha256"):
        if name not in meta:
            raise CardFormatError(f"__metadata__: missing {name!r}")
    extra = sorted(set(meta) - {*METADATA_KEYS, *SIGNATURE_KEYS})
    if extra:
        raise CardFormatError(
            f"__metadata__: expected keys {list(METADATA_KEYS)} and optionally "
            f"{list(SIGNATURE_KEYS)}, got extra {[k[:40] for k in extra[:5]]}"
        )
    return int(version)


def index_dtype(n_tokens: int) -> str:
    """Dtype of the ``l{l}.index`` tensors: U16 while positions fit, else I32."""
    return "U16" if n_tokens <= MAX_U16_TOKENS else "I32"


def float_tensor_dtype(quant) -> str:
    """Safetensors dtype of the ``l{l}.float`` tensors, from quant.config."""
    cfg = quant.get("config") if isinstance(quant, dict) else None
    name = cfg.get("float_dtype") if isinstance(cfg, dict) else None
    if name not in FLOAT_TENSOR_DTYPES:
        raise CardFormatError(
            "quant.config.float_dtype: expected one of "
            f"{sorted(FLOAT_TENSOR_DTYPES)}, got {name!r:.60}"
        )
    return FLOAT_TENSOR_DTYPES[name]


def version_for(quant: dict, cache: dict | None = None) -> int:
    """The format version a card with this quant and cache summary is written as."""
    cfg = quant.get("config") if isinstance(quant, dict) else None
    if isinstance(cfg, dict) and "key_rope" in cfg:
        return 4
    split = isinstance(cfg, dict) and cfg.get("split_kv", False) is not False
    if (isinstance(cache, dict) and "held_from" in cache) or split:
        return 3
    rotated = isinstance(cfg, dict) and cfg.get("rotation", "none") != "none"
    return 2 if rotated else 1


def needs_v3(qkv) -> bool:
    """Whether a :class:`~qkvshare_mlx.formats.QuantizedKV` is written as
    version 3 or later: sliding layers held from their window, padded rows,
    split key/value widths or pre-RoPE keys (version 4) (``cache.held_from``
    is then written, possibly zeros)."""
    segs = [s for layer in qkv.layers for s in layer]
    return (
        bool(qkv.held_from)
        or qkv.config.split_kv
        or qkv.config.key_rope is not None
        or any(s.value_bits is not None for s in segs)
        or any(e.dim is not None for s in segs for e in (s.keys, s.values))
    )


def enc_meta(enc: Encoded) -> dict:
    """One of K/V of a segment, as its JSON descriptor."""
    # A float copy's dtype is card-wide: quant.config.float_dtype.
    if enc.layout == "float":
        return {"layout": "float", "group": 0}
    return {"layout": enc.layout, "group": enc.group}


def layer_table(layers: list[list[Segment]]) -> list[list[dict]]:
    """The card JSON's ``layers`` entry: per layer, per segment, its descriptor."""
    return [
        [
            {
                "bits": s.bits,
                **({} if s.value_bits is None else {"vbits": s.value_bits}),
                "n": s.n_tokens,
                "k": enc_meta(s.keys),
                "v": enc_meta(s.values),
            }
            for s in layer
        ]
        for layer in layers
    ]


def req(obj, key, kind, where):
    """``obj[key]`` if present and of JSON type ``kind`` (a bool is no int)."""
    if not isinstance(obj, dict) or key not in obj:
        raise CardFormatError(f"{where}: missing field {key!r}")
    v = obj[key]
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
    if not ok:
        raise CardFormatError(
            f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {v!r:.60}"
        )
    return v


def exact_keys(obj: dict, keys, where: str) -> None:
    """Refuse an object whose keys are not exactly ``keys``."""
    if set(obj) != set(keys):
        missing = sorted(set(keys) - set(obj))
        extra = sorted(set(obj) - set(keys))
        raise CardFormatError(
            f"{where}: expected keys {sorted(keys)}, missing {missing}, "
            f"extra {[k[:40] for k in extra[:5]]}"
        )


def check_fingerprint(model: dict) -> None:
    """Fingerprint fields, where present and not null, have their JSON types."""
    for key, kind in FINGERPRINT_KINDS.items():
        if model.get(key) is None:
            continue
        v = req(model, key, kind, "model")
        if kind is int and not 0 <= v < MAX_SIZE:
            raise CardFormatError(f"model.{key}: expected 0..{MAX_SIZE - 1}, got {v}")
        if key in HASH_FIELDS and (len(v) != 64 or not set(v) <= _HEX):
            raise CardFormatError(
                f"model.{key}: expected 64 lowercase hex digits, got {v!r:.70}"
            )


def check_quant(quant: dict) -> QuantConfig:
    """The quantization summary can rebuild a QuantConfig (see
    :func:`quant_config`); returns it."""
    exact_keys(quant, QUANT_KEYS, "quant")
    req(quant, "controller", str, "quant")
    for key in ("budget_bits", "effective_bits", "nominal_bits"):
        if key == "budget_bits" and key in quant and quant[key] is None:
            continue
        v = req(quant, key, (int, float), "quant")
        if not 0 <= v <= 64:
            raise CardFormatError(f"quant.{key}: expected 0..64 bits, got {v}")
    cfg = req(quant, "config", dict, "quant")
    defaults = QuantConfig().to_dict()
    # written only when not the default; split_kv from version 3 on, key_rope 4
    optional = {"rotation": "none", "split_kv": False, "key_rope": {}}
    if not set(defaults) <= set(cfg) <= set(defaults) | set(optional):
        raise CardFormatError(
            f"quant.config: expected keys {sorted(defaults)} (optional "
            f"{sorted(optional)}), got {sorted(cfg)[:10]}"
        )
    for key, default in {**defaults, **optional}.items():
        if key in cfg:
            req(cfg, key, type(default), "quant.config")
    if cfg.get("rotation") == "none":  # one spelling: no rotation, no key
        raise CardFormatError("quant.config.rotation: 'none' is written as no key")
    if cfg.get("split_kv") is False:
        raise CardFormatError("quant.config.split_kv: false is written as no key")
    widths = cfg["widths"]
    if not all(type(b) is int for b in widths):
        raise CardFormatError(f"quant.config.widths: expected ints, got {widths!r:.60}")
    return quant_config(quant)


def quant_config(quant: dict) -> QuantConfig:
    """The :class:`QuantConfig` a card's ``quant.config`` describes."""
    cfg = dict(quant["config"])
    try:
        if "key_rope" in cfg:
            cfg["key_rope"] = KeyRope.from_dict(cfg["key_rope"])
        return QuantConfig(**dict(cfg, widths=tuple(cfg["widths"])))
    except (ConfigError, TypeError) as e:
        raise CardFormatError(f"quant.config: {e}") from None


def _check_cache(c: dict, version: int) -> None:
    # The cache shape is what decoding uses. The fingerprint describes the
    # model; a card whose two disagree fits no model, so every receiver
    # refuses it (ModelMismatchError) when it checks the card against itself.
    held = ("held_from",) if version >= 3 else ()
    exact_keys(c, (*CACHE_FIELDS, "dtype", *held), "cache")
    for k in CACHE_FIELDS:
        v = req(c, k, int, "cache")
        if not 0 <= v < MAX_SIZE:
            raise CardFormatError(f"cache.{k}: {v} out of range 0..{MAX_SIZE - 1}")
    dtype = req(c, "dtype", str, "cache")
    if dtype not in CACHE_DTYPES:
        raise CardFormatError(
            f"cache.dtype: expected one of {list(CACHE_DTYPES)}, got {dtype!r:.60}"
        )


def held_from(c: dict, model: dict) -> list[int]:
    """Per layer, the first position the card holds (``cache.held_from``,
    version 3; zeros before), checked against the windows ``model`` says
    its layers slide with: a layer may start after 0 only if it slides, and
    no later than its window's start."""
    L, T = c["n_layers"], c["n_tokens"]
    if "held_from" not in c:
        return [0] * L
    held = req(c, "held_from", list, "cache")
    if len(held) != L or not all(type(h) is int for h in held):
        raise CardFormatError(
            f"cache.held_from: expected {L} integers (cache.n_layers), got {held!r:.60}"
        )
    windows = layer_windows(model, L)
    for li, h in enumerate(held):
        window = windows[li] if li < len(windows) else None
        most = window_start(T, window)
        if not 0 <= h <= most:
            kind = f"sliding window {window}" if window else "full attention"
            raise CardFormatError(
                f"cache.held_from[{li}]: {h} not in 0..{most} (layer {li}: "
                f"{kind} per model.sliding_window/layer_types, {T} tokens)"
            )
    return held


def expected_tensors(m, version: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check the card JSON ``m`` and derive its tensor table.

    Returns:
        ``{name: (safetensors dtype, shape)}`` of every tensor the file must
        hold: ``tokens`` and five per layer.
    """
    if not isinstance(m, dict):
        raise CardFormatError("card metadata is not a JSON object")
    if (
        m.get("format") != FORMAT_NAME
        or type(m.get("version")) is not int
        or m.get("version") != version
    ):
        raise CardFormatError(
            f"card metadata: format/version {m.get('format')!r}/{m.get('version')!r} "
            f"is not {FORMAT_NAME!r}/{version} (the header's)"
        )
    exact_keys(m, CARD_KEYS, "card")
    c = req(m, "cache", dict, "card")
    for k in ("model", "quant", "producer", "user"):
        req(m, k, dict, "card")
    check_fingerprint(m["model"])
    _check_cache(c, version)
    config = check_quant(m["quant"])
    if version_for(m["quant"], c) != version:
        raise CardFormatError(
            f"version {version}: a card with quant.config.rotation "
            f"{m['quant']['config'].get('rotation', 'none')!r}"
            f"{', key_rope' if 'key_rope' in m['quant']['config'] else ''} and this "
            f"cache is written as version {version_for(m['quant'], c)} (rotated "
            "cards are version 2, cards with cache.held_from or split_kv version "
            "3, with key_rope 4)"
        )
    starts = held_from(c, m["model"])
    padded_rows, splits = [], []
    L, B, H = c["n_layers"], c["batch"], c["n_kv_heads"]
    dk, dv, T = c["head_dim_k"], c["head_dim_v"], c["n_tokens"]
    try:
        check_rotation(m["quant"]["config"].get("rotation", "none"), dk, dv)
    except ConfigError as e:
        raise CardFormatError(f"quant.config.rotation: {e}") from None
    if config.key_rope is not None:
        try:
            config.key_rope.check(L, dk)
        except ConfigError as e:
            raise CardFormatError(f"quant.config.{e}") from None
    table = req(m, "layers", list, "card")
    if len(table) != L:
        raise CardFormatError(
            f"layers: expected {L} entries (cache.n_layers), got {len(table)}"
        )
    float_dtype = float_tensor_dtype(m["quant"])  # validated by check_quant
    out = {"tokens": ("I32", (T,))}
    for li, layer in enumerate(table):
        if not isinstance(layer, list):
            raise CardFormatError(f"layers[{li}]: expected a list of segments")
        n_held = T - starts[li]
        covered = 0
        sizes = dict.fromkeys(PACKED, 0)
        for si, seg in enumerate(layer):
            where = f"layers[{li}][{si}]"
            if not isinstance(seg, dict):
                raise CardFormatError(f"{where}: expected an object, got {seg!r:.40}")
            split = "vbits" in seg and version >= 3  # keys' and values' widths
            exact_keys(seg, SEGMENT_KEYS + (("vbits",) if split else ()), where)
            bits = req(seg, "bits", int, where)
            n = req(seg, "n", int, where)
            if bits not in ALL_BITS:
                raise CardFormatError(
                    f"{where}.bits: {bits} not one of {list(ALL_BITS)}"
                )
            vbits = bits
            if split:
                vbits = req(seg, "vbits", int, where)
                if {bits, vbits} - set(CODE_BITS) or vbits == bits:
                    raise CardFormatError(
                        f"{where}: a split segment needs two different code "
                        f"widths of {list(CODE_BITS)}, got bits {bits}, vbits {vbits}"
                    )
                splits.append(where)
            if not 0 < n <= n_held:
                raise CardFormatError(f"{where}.n: {n} not in 1..{n_held}")
            covered += n
            for kv, D, b in (("k", dk, bits), ("v", dv, vbits)):
                e = req(seg, kv, dict, where)
                exact_keys(e, ENCODED_KEYS, f"{where}.{kv}")
                layout = req(e, "layout", str, f"{where}.{kv}")
                group = req(e, "group", int, f"{where}.{kv}")
                shape = (B, H, n, D)
                shapes = encoded_shapes(layout, group, b, shape, where, float_dtype)
                if padded(layout, D, group):
                    padded_rows.append(f"{where}.{kv}")
                for part, (_, shape) in shapes.items():
                    sizes[part] += math.prod(shape)
        if covered != n_held:
            raise CardFormatError(
                f"layers[{li}]: segments cover {covered} tokens, expected {n_held}"
            )
        out[f"l{li}.index"] = (index_dtype(T), (n_held,))
        for part, dtype in PACKED.items():
            out[f"l{li}.{part}"] = (dtype or float_dtype, (sizes[part],))
    if padded_rows and version < 3:
        raise CardFormatError(
            f"{padded_rows[0]}: padded rows (head dims {dk}, {dv}) need version 3, "
            f"card is version {version}"
        )
    split_kv = m["quant"]["config"].get("split_kv", False)
    if version == 3 and not (any(starts) or padded_rows or splits or split_kv):
        raise CardFormatError(
            "cache.held_from: all zero and no padded rows or split widths (such "
            "a card is written as version 1 or 2)"
        )
    return out


def encoded_shapes(layout, group, bits, shape, where, float_dtype):
    """Shapes of one of K/V of a segment, by packed tensor.

    Args:
        layout, group, bits: the segment descriptor's fields.
        shape: (B, H, n, D) of the decoded keys or values.
        where: the descriptor's path, for error messages.
        float_dtype: the card's float dtype name (``"F16"`` or ``"F32"``).

    Returns:
        ``{"float": (dtype, (B, H, n, D))}`` for a float copy, else
        ``{"codes": ("U32", ...), "scales": ("F16", ...), "biases": ...}``;
        each array is the next slice of the layer's tensor of that name.
        Per-token rows of a head size no group size divides are stored
        padded (``formats.padded_dim``; version 3).
    """
    B, H, n, D = shape
    if bits == FLOAT_BITS:
        if layout != "float":
            raise CardFormatError(
                f"{where}: 16-bit tokens must use layout 'float', got {layout!r}"
            )
        if group != 0:
            raise CardFormatError(f"{where}: float layout needs group 0, got {group}")
        return {"float": (float_dtype, (B, H, n, D))}
    if layout == "token":
        axis, other = D, n
    elif layout == "channel":
        axis, other = n, D
    elif layout == "float":
        raise CardFormatError(f"{where}: layout 'float' needs bits 16, got {bits}")
    else:
        raise CardFormatError(
            f"{where}: layout {layout!r:.40} not one of token/channel/float"
        )
    if padded(layout, D, group) and group == token_groups(D)[0]:
        axis = padded_dim(D, group)  # no group divides D: padded rows
    if group not in GROUP_SIZES or axis % group or (axis * bits) % 32:
        raise CardFormatError(
            f"{where}: group {group} does not divide {axis} (layout {layout})"
        )
    lead = (B, H, other)
    return {
        "codes": ("U32", (*lead, axis * bits // 32)),
        "scales": ("F16", (*lead, axis // group)),
        "biases": ("F16", (*lead, axis // group)),
    }
