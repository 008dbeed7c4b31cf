"""CacheCard: one self-contained, versioned, integrity-checked file.

A card is a safetensors container: the quantized K/V segments of every layer,
the token ids they cover, and one JSON metadata entry (format, version,
producer, model fingerprint, quantization summary, segment table, user
metadata) plus a SHA-256 over the metadata and every tensor. The layout is
specified in docs/cachecard-format.md; this module is its one definition.

Reading treats the bytes as hostile: the safetensors header is parsed and
every claimed size, offset, dtype and shape is checked against the file size,
the metadata and a memory cap *before* any array is created; then the
checksum, the token permutation and the finiteness of scales are verified.
Every failure is a :class:`~qkvshare_mlx.errors.CardError` subclass.

Only numpy is needed (no MLX, no torch): the HF side reads and writes cards
through this module too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    CardError,
    CardFormatError,
    CardIntegrityError,
    CardTooLargeError,
    ConfigError,
    ModelMismatchError,
)
from .formats import (
    ALL_BITS,
    FLOAT_BITS,
    GROUP_SIZES,
    Encoded,
    QuantConfig,
    QuantizedKV,
    Segment,
    width_histogram,
)
from .rotation import check_rotation

FORMAT_NAME = "qkvshare.cachecard"
FORMAT_VERSION = 2  # the newest this library reads and writes
# Versions read. Writers emit the lowest version that can hold the card:
# 1 without a rotation (byte-identical to earlier releases), 2 with one, so
# a version-1 reader refuses a rotated card instead of misreading it.
READ_VERSIONS = (1, 2)
DEFAULT_MAX_BYTES = 8 << 30  # refuse cards claiming more than 8 GiB
MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 32
JSON_CHARS_PER_CONTAINER = 8
CACHE_DTYPES = ("float16", "bfloat16", "float32")

_DTYPES = {
    "U32": np.uint32,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "U16": np.uint16,
}
# Per-layer token positions are stored as U16 while they fit, else as I32.
MAX_U16_TOKENS = 1 << 16
_FLOAT_TENSOR_DTYPES = {"float16": "F16", "float32": "F32"}  # quant.config.float_dtype
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _DTYPES.items()}
FINGERPRINT_FIELDS = (
    "model_type",
    "n_layers",
    "n_kv_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "vocab_size",
    "tokenizer_sha256",
    "weights_sha256",
)


# ----------------------------------------------------------------------------
# Model fingerprint


_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_hash(tokenizer) -> str | None:
    """SHA-256 of the tokenizer's vocabulary (token -> id), or None.

    Memoized per tokenizer object and vocabulary size (hashing a 50K-entry
    vocabulary takes ~0.1 s; an agent chain fingerprints every hop).
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        hit = _TOKENIZER_HASHES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and size is not None and hit[0] == size:
        return hit[1]
    vocab = get_vocab()
    blob = json.dumps(sorted(vocab.items()), separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    try:
        _TOKENIZER_HASHES[tokenizer] = (size, digest)
    except TypeError:
        pass
    return digest


def fingerprint_from_config(
    config: dict, tokenizer=None, *, weights_sha256: str | None = None
) -> dict:
    """The fields that decide whether a cache fits a model.

    Args:
        config: a model's config.json as a dict (HF or mlx-lm spelling).
        tokenizer: optional tokenizer with ``get_vocab()``.
        weights_sha256: optional hash of the weights.
    """
    rope_params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", rope_params.get("rope_theta"))
    scaling = config.get("rope_scaling")
    if scaling is None:
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    n_heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is None and n_heads:
        head_dim = config["hidden_size"] // n_heads
    return {
        "model_type": config.get("model_type"),
        "n_layers": config.get("num_hidden_layers"),
        "n_kv_heads": config.get("num_key_value_heads", n_heads),
        "head_dim": head_dim,
        "rope_theta": float(theta) if theta is not None else None,
        "rope_scaling": scaling or None,
        "vocab_size": config.get("vocab_size"),
        "tokenizer_sha256": tokenizer_hash(tokenizer)
        if tokenizer is not None
        else None,
        "weights_sha256": weights_sha256,
    }


def fingerprint_mismatches(card_fp: dict, expected: dict) -> list[str]:
    """Fields where a card's fingerprint differs from the expected model's."""
    out = []
    for key in FINGERPRINT_FIELDS:
        a, b = card_fp.get(key), expected.get(key)
        if key in ("tokenizer_sha256", "weights_sha256") and (a is None or b is None):
            continue
        if a != b:
            out.append(f"{key}: card has {a!r}, model has {b!r}")
    return out


# ----------------------------------------------------------------------------
# The card


@dataclass
class CacheCard:
    """A quantized KV cache plus everything needed to use it safely.

    Attributes:
        layers: per layer, segments with numpy arrays (see formats.Segment).
        tokens: (T,) int32 token ids the cache covers.
        model: model fingerprint (see :func:`fingerprint_from_config`).
        cache: shape summary: n_layers, batch, n_kv_heads, head_dim_k,
            head_dim_v, n_tokens, offset (RoPE position of token 0), dtype.
        quant: controller, budget_bits, effective_bits, nominal_bits, config.
        producer: runtime and library that wrote the card.
        user: free-form JSON metadata (e.g. the sender's role).
    """

    layers: list[list[Segment]]
    tokens: np.ndarray
    model: dict
    cache: dict
    quant: dict
    producer: dict = field(default_factory=dict)
    user: dict = field(default_factory=dict)

    # ---- construction ------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        qkv: QuantizedKV,
        tokens,
        model: dict,
        *,
        offset: int = 0,
        dtype: str = "float32",
        runtime: str = "mlx",
        user: dict | None = None,
    ) -> CacheCard:
        """Wrap a :class:`QuantizedKV` (MLX or numpy arrays) as a card."""
        from . import __version__

        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.shape[0] != qkv.n_tokens:
            raise CardFormatError(
                f"tokens: expected {qkv.n_tokens} ids (cache length), "
                f"got {tokens.shape[0]}"
            )
        B, H, dk, dv = qkv.shape
        layers = [[_segment_to_numpy(s) for s in layer] for layer in qkv.layers]
        card = cls(
            layers=layers,
            tokens=tokens,
            model=dict(model),
            cache={
                "n_layers": len(layers),
                "batch": B,
                "n_kv_heads": H,
                "head_dim_k": dk,
                "head_dim_v": dv,
                "n_tokens": qkv.n_tokens,
                "offset": int(offset),
                "dtype": dtype,
            },
            quant={
                "controller": qkv.controller,
                "budget_bits": qkv.budget_bits,
                "effective_bits": round(qkv.effective_bits, 6),
                "nominal_bits": round(qkv.nominal_bits, 6),
                "config": qkv.config.to_dict(),
            },
            producer={
                "runtime": runtime,
                "library": "qkvshare-mlx",
                "version": __version__,
            },
            user=dict(user or {}),
        )
        return card

    def to_quantized(self) -> QuantizedKV:
        """The card's segments as a :class:`QuantizedKV` (numpy arrays)."""
        c = self.cache
        cfg = self.quant.get("config") or {}
        config = QuantConfig(
            **{k: tuple(v) if k == "widths" else v for k, v in cfg.items()}
        )
        return QuantizedKV(
            layers=[list(layer) for layer in self.layers],
            n_tokens=c["n_tokens"],
            shape=(c["batch"], c["n_kv_heads"], c["head_dim_k"], c["head_dim_v"]),
            config=config,
            controller=self.quant.get("controller", "uniform"),
            budget_bits=self.quant.get("budget_bits"),
        )

    # ---- summary -------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return int(self.cache["n_tokens"])

    @property
    def offset(self) -> int:
        return int(self.cache.get("offset", 0))

    @property
    def payload_bytes(self) -> int:
        return sum(s.payload_bits() for layer in self.layers for s in layer) // 8

    @property
    def n_elements(self) -> int:
        c = self.cache
        return (
            c["n_layers"]
            * c["batch"]
            * c["n_kv_heads"]
            * c["n_tokens"]
            * (c["head_dim_k"] + c["head_dim_v"])
        )

    @property
    def effective_bits(self) -> float:
        return 8 * self.payload_bytes / max(self.n_elements, 1)

    @property
    def fp16_bytes(self) -> int:
        """Bytes the same cache takes in float16 (mlx-lm's KVCache at fp16)."""
        return 2 * self.n_elements

    def width_histogram(self) -> dict[int, int]:
        """Token count per width, summed over layers."""
        return width_histogram(self.layers)

    def check_model(self, expect) -> None:
        """Raise ModelMismatchError listing every field that differs from ``expect``.

        Args:
            expect: a fingerprint dict, or an object with a ``fingerprint``
                attribute or method.
        """
        fp = expect
        if not isinstance(fp, dict):
            fp = getattr(expect, "fingerprint", None)
            fp = fp() if callable(fp) else fp
        if not isinstance(fp, dict):
            raise TypeError(f"expect must be a fingerprint dict, got {type(expect)!r}")
        bad = fingerprint_mismatches(self.model, fp)
        if bad:
            raise ModelMismatchError(
                "card was made for another model: " + "; ".join(bad)
            )
        vocab = fp.get("vocab_size")
        if vocab is not None and self.tokens.size and int(self.tokens.max()) >= vocab:
            raise ModelMismatchError(
                f"tokens: id {int(self.tokens.max())} outside the model's vocabulary "
                f"of {vocab}"
            )

    # ---- serialisation -----------------------------------------------------

    def _tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the file by name (docs/cachecard-format.md, section 3).

        Besides ``tokens``, five tensors per layer ``l``, always all written
        (possibly empty): ``l{l}.index`` (T,) the segments' token positions
        concatenated (U16 while T <= 65536, else I32), and 1-D ``l{l}.codes``
        (U32), ``l{l}.scales``, ``l{l}.biases`` (F16) and ``l{l}.float``
        (``quant.config.float_dtype``): per segment in order, its keys then
        its values, each flattened in C order. Every segment array is checked
        against the shape a reader derives from the metadata, so the writer
        never emits a card the reader would refuse or misread.
        """
        c = self.cache
        B, H, dk, dv = c["batch"], c["n_kv_heads"], c["head_dim_k"], c["head_dim_v"]
        T = self.n_tokens
        float_dtype = _float_tensor_dtype(self.quant)
        index_dtype = _DTYPES[_index_dtype(T)]
        tensors = {"tokens": self.tokens}
        for li, layer in enumerate(self.layers):
            packed: dict[str, list[np.ndarray]] = {part: [] for part in _PACKED}
            index = [np.asarray(seg.index).reshape(-1) for seg in layer]
            index = np.concatenate(index) if index else np.zeros(0, np.int64)
            if index.shape != (T,) or not _is_permutation(index, T):
                raise CardFormatError(
                    f"layers[{li}]: segment indices must be a permutation of "
                    f"0..{T - 1}, got {index.shape[0]} positions"
                )
            tensors[f"l{li}.index"] = index.astype(index_dtype)
            for si, seg in enumerate(layer):
                where = f"layers[{li}][{si}]"
                n = seg.n_tokens
                for kv, enc, D in (("k", seg.keys, dk), ("v", seg.values, dv)):
                    shape = (B, H, n, D)
                    shapes = _encoded_shapes(
                        enc.layout, enc.group, seg.bits, shape, where, float_dtype
                    )
                    arrays = enc.arrays()
                    for part, (dtype, shape) in shapes.items():
                        arr = np.asarray(arrays["data" if part == "float" else part])
                        if _DTYPE_NAMES.get(arr.dtype) != dtype or arr.shape != shape:
                            raise CardFormatError(
                                f"{where}.{kv}: {part} expected {dtype}{list(shape)}, "
                                f"got {arr.dtype}{list(arr.shape)}"
                            )
                        packed[part].append(arr.reshape(-1))
            for part, dtype in _PACKED.items():
                dt = _DTYPES[float_dtype if dtype is None else dtype]
                arrs = packed[part]
                tensors[f"l{li}.{part}"] = (
                    np.concatenate(arrs) if arrs else np.zeros(0, dt)
                )
        return tensors

    def _metadata(self) -> dict:
        table = [
            [
                {
                    "bits": s.bits,
                    "n": s.n_tokens,
                    "k": _enc_meta(s.keys),
                    "v": _enc_meta(s.values),
                }
                for s in layer
            ]
            for layer in self.layers
        ]
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "producer": self.producer,
            "model": self.model,
            "cache": self.cache,
            "quant": self.quant,
            "layers": table,
            "user": self.user,
        }

    @property
    def version(self) -> int:
        """The format version this card is written as (see READ_VERSIONS)."""
        return _version_for(self.quant)

    def checksum(self) -> str:
        return _checksum(_canonical(self._metadata()), self._tensors(), self.version)

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes (see docs/cachecard-format.md)."""
        meta = _canonical(self._metadata())
        tensors = self._tensors()
        header = {
            "format": FORMAT_NAME,
            "version": str(self.version),
            "card": meta.decode(),
            "sha256": _checksum(meta, tensors, self.version),
        }
        return _write_safetensors(tensors, header)

    def save(self, path) -> Path:
        """Write atomically: temp file in the same folder, fsync, rename."""
        path = Path(path)
        data = self.to_bytes()
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    @classmethod
    def from_bytes(
        cls, data, *, expect=None, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> CacheCard:
        """Parse and fully validate card bytes; see :func:`load`."""
        card = _read(memoryview(data), max_bytes)
        if expect is not None:
            card.check_model(expect)
        return card

    @classmethod
    def load(
        cls, path, *, expect=None, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> CacheCard:
        """Read a card file, validating it before use.

        Args:
            path: the card file.
            expect: a model fingerprint (dict) to check the card against.
            max_bytes: refuse cards claiming more than this many bytes.

        Raises:
            CardFormatError, CardIntegrityError, CardTooLargeError,
            ModelMismatchError.
        """
        path = Path(path)
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise CardFormatError(f"{path}: not a regular file")
            if st.st_size > max_bytes:
                raise CardTooLargeError(
                    f"{path}: file is {st.st_size} bytes, cap is {max_bytes}"
                )
            with open(path, "rb") as f:
                # read at most one byte past the cap: the file may grow meanwhile
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise CardFormatError(f"{path}: cannot read card: {e.strerror}") from None
        return cls.from_bytes(data, expect=expect, max_bytes=max_bytes)


def _enc_meta(enc: Encoded) -> dict:
    # A float copy's dtype is card-wide: quant.config.float_dtype.
    if enc.layout == "float":
        return {"layout": "float", "group": 0}
    return {"layout": enc.layout, "group": enc.group}


# The packed per-layer tensors and their dtypes (None: quant.config.float_dtype).
_PACKED = {"codes": "U32", "scales": "F16", "biases": "F16", "float": None}


def _index_dtype(n_tokens: int) -> str:
    """Dtype of the ``l{l}.index`` tensors: U16 while positions fit, else I32."""
    return "U16" if n_tokens <= MAX_U16_TOKENS else "I32"


def _float_tensor_dtype(quant) -> str:
    """Safetensors dtype of the ``l{l}.float`` tensors, from quant.config."""
    cfg = quant.get("config") if isinstance(quant, dict) else None
    name = cfg.get("float_dtype") if isinstance(cfg, dict) else None
    if name not in _FLOAT_TENSOR_DTYPES:
        raise CardFormatError(
            "quant.config.float_dtype: expected one of "
            f"{sorted(_FLOAT_TENSOR_DTYPES)}, got {name!r:.60}"
        )
    return _FLOAT_TENSOR_DTYPES[name]


def _is_permutation(index: np.ndarray, n: int) -> bool:
    """Whether the integer array ``index`` holds each of 0..n-1 exactly once."""
    if index.shape != (n,):
        return False
    if n == 0:
        return True
    if int(index.min()) < 0 or int(index.max()) >= n:
        return False
    return bool((np.bincount(index, minlength=n) == 1).all())


def _segment_to_numpy(seg: Segment) -> Segment:
    return seg.map_arrays(np.asarray)


# ----------------------------------------------------------------------------
# Container: safetensors written and read with explicit checks.


def _canonical(obj) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def _version_for(quant: dict) -> int:
    cfg = quant.get("config") if isinstance(quant, dict) else None
    rotated = isinstance(cfg, dict) and cfg.get("rotation", "none") != "none"
    return 2 if rotated else 1


def _checksum(meta: bytes, tensors: dict[str, np.ndarray], version: int) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT_NAME}/{version}\n".encode())
    h.update(struct.pack("<Q", len(meta)))
    h.update(meta)
    for name in sorted(tensors):
        arr = tensors[name]
        desc = f"{name}|{_DTYPE_NAMES[arr.dtype]}|{list(arr.shape)}".encode()
        h.update(struct.pack("<Q", len(desc)))
        h.update(desc)
        h.update(struct.pack("<Q", arr.nbytes))
        h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def _write_safetensors(
    tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _DTYPE_NAMES:
            raise CardFormatError(f"{name}: unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": _DTYPE_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    parts = [struct.pack("<Q", len(blob)), blob]
    parts += [
        np.ascontiguousarray(tensors[n]).view(np.uint8).reshape(-1).data for n in names
    ]
    return b"".join(parts)


def _depth(obj, limit: int) -> int:
    """Nesting depth of parsed JSON; raise past ``limit`` (level by level, no
    recursion: a card's metadata has tens of thousands of values)."""
    level, d = [obj], 0
    while level:
        if d > limit:
            raise CardFormatError(f"metadata JSON nests deeper than {limit} levels")
        nxt = []
        for o in level:
            if type(o) is dict:
                nxt.extend(o.values())
            elif type(o) is list:
                nxt.extend(o)
        level, d = nxt, d + 1
    return d - 1


def _unique_keys(pairs):
    # json.loads keeps the last of duplicate keys, other parsers the first: a
    # card with duplicates reads differently in different readers, so refuse it.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise CardFormatError(f"duplicate JSON key {key!r:.60}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise CardFormatError(
        f"JSON constant {name} not allowed (expected a finite number)"
    )


def _finite_float(text):
    value = float(text)
    if not np.isfinite(value):
        raise CardFormatError(f"JSON number {text[:40]} overflows a float")
    return value


def _json(text: str, what: str, limit_depth=MAX_JSON_DEPTH):
    # Objects and arrays cost ~60-200 bytes each once parsed; a card's JSON has
    # about one per 30 characters. Refuse dense container soup before parsing,
    # so a small file cannot make the parser allocate 20x its size.
    containers = text.count("{") + text.count("[")
    if containers > len(text) // JSON_CHARS_PER_CONTAINER + 256:
        raise CardFormatError(
            f"{what}: {containers} JSON objects/arrays in {len(text)} characters, "
            f"expected at most one per {JSON_CHARS_PER_CONTAINER}"
        )
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except CardFormatError as e:
        raise CardFormatError(f"{what}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CardFormatError(f"{what}: not valid JSON ({type(e).__name__})") from None
    _depth(obj, limit_depth)
    return obj


def _read_header(buf: memoryview, max_bytes: int):
    size = len(buf)
    if size < 8:
        raise CardFormatError(
            f"file is {size} bytes, too short for a safetensors header"
        )
    (n,) = struct.unpack("<Q", buf[:8])
    if n > size - 8:
        raise CardFormatError(f"header length {n} exceeds the file size {size}")
    if n > min(MAX_HEADER_BYTES, max_bytes):
        raise CardTooLargeError(
            f"header length {n} exceeds the cap {min(MAX_HEADER_BYTES, max_bytes)}"
        )
    try:
        text = bytes(buf[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise CardFormatError("header is not UTF-8") from None
    header = _json(text, "safetensors header")
    if not isinstance(header, dict):
        raise CardFormatError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CardFormatError("__metadata__ missing or not a map of strings")
    data_len = size - 8 - n
    spans = []
    total = 0
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CardFormatError(f"{name}: tensor entry is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CardFormatError(
                f"{name}: dtype {dtype!r} not one of {sorted(_DTYPES)}"
            )
        if (
            not isinstance(shape, list)
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                for d in shape
            )
            or len(shape) > 8
        ):
            raise CardFormatError(
                f"{name}: shape {shape!r:.60} is not a list of at most 8 sizes < 2^40"
            )
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise CardFormatError(
                f"{name}: data_offsets {offs!r:.60} is not [start, end]"
            )
        start, end = offs
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        total += nbytes
        if total > max_bytes:
            raise CardTooLargeError(
                f"tensors claim more than the cap of {max_bytes} bytes"
            )
        if not (0 <= start <= end <= data_len) or end - start != nbytes:
            raise CardFormatError(
                f"{name}: data_offsets {offs} do not fit shape {shape} of {dtype} "
                f"inside {data_len} data bytes"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CardFormatError(f"tensors {n0} and {n1} overlap")
    return meta, header, 8 + n


def _read(buf: memoryview, max_bytes: int) -> CacheCard:
    if len(buf) > max_bytes:
        raise CardTooLargeError(f"card is {len(buf)} bytes, cap is {max_bytes}")
    meta, header, base = _read_header(buf, max_bytes)
    # 1. format and version
    if meta.get("format") != FORMAT_NAME:
        raise CardFormatError(
            f"format: expected {FORMAT_NAME!r}, got {meta.get('format')!r}"
        )
    version = meta.get("version")
    if version not in [str(v) for v in READ_VERSIONS]:
        raise CardFormatError(
            f"version: this reader knows versions {list(READ_VERSIONS)}, "
            f"card has {version!r}"
        )
    for key in ("card", "sha256"):
        if key not in meta:
            raise CardFormatError(f"__metadata__: missing {key!r}")
    try:
        card_raw = meta["card"].encode("utf-8")
    except UnicodeEncodeError:
        raise CardFormatError("card metadata: contains a lone surrogate") from None
    card_meta = _json(meta["card"], "card metadata")
    # 2. schema and tensor table, before touching tensor bytes
    expected = _expected_tensors(card_meta, int(version))
    names = set(header)
    if names != set(expected):
        missing = sorted(set(expected) - names)[:5]
        extra = sorted(names - set(expected))[:5]
        raise CardFormatError(
            f"tensor set differs from metadata: missing {missing}, extra {extra}"
        )
    for name, (dtype, shape) in expected.items():
        info = header[name]
        if info["dtype"] != dtype or tuple(info["shape"]) != shape:
            raise CardFormatError(
                f"{name}: expected {dtype}{list(shape)}, "
                f"got {info['dtype']}{info['shape']}"
            )
    tensors = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        arr = np.frombuffer(buf[base + s : base + e], dtype=_DTYPES[info["dtype"]])
        tensors[name] = arr.reshape(info["shape"])
    # 3. integrity
    want = meta["sha256"]
    got = _checksum(card_raw, tensors, int(version))
    if got != want:
        raise CardIntegrityError(
            f"checksum mismatch: metadata says {want[:16]}..., content is {got[:16]}..."
        )
    # 4. content checks
    return _assemble(card_meta, tensors)


def _req(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise CardFormatError(f"{where}: missing field {key!r}")
    v = obj[key]
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
    if not ok:
        raise CardFormatError(
            f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {v!r:.60}"
        )
    return v


def _expected_tensors(m, version: int) -> dict[str, tuple[str, tuple[int, ...]]]:
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
    c = _req(m, "cache", dict, "card")
    for k in (
        "n_layers",
        "batch",
        "n_kv_heads",
        "head_dim_k",
        "head_dim_v",
        "n_tokens",
        "offset",
    ):
        v = _req(c, k, int, "cache")
        if v < 0 or v > 2**31:
            raise CardFormatError(f"cache.{k}: {v} out of range")
    for k in ("model", "quant", "producer", "user"):
        _req(m, k, dict, "card")
    dtype = _req(c, "dtype", str, "cache")
    if dtype not in CACHE_DTYPES:
        raise CardFormatError(
            f"cache.dtype: expected one of {list(CACHE_DTYPES)}, got {dtype!r:.60}"
        )
    _check_fingerprint(m["model"])
    _check_quant(m["quant"])
    if _version_for(m["quant"]) != version:
        raise CardFormatError(
            f"version {version}: quant.config.rotation "
            f"{m['quant']['config'].get('rotation', 'none')!r} is written as "
            f"version {_version_for(m['quant'])} (rotated cards are version 2)"
        )
    L, B, H = c["n_layers"], c["batch"], c["n_kv_heads"]
    dk, dv, T = c["head_dim_k"], c["head_dim_v"], c["n_tokens"]
    try:
        check_rotation(m["quant"]["config"].get("rotation", "none"), dk, dv)
    except ConfigError as e:
        raise CardFormatError(f"quant.config.rotation: {e}") from None
    table = _req(m, "layers", list, "card")
    if len(table) != L:
        raise CardFormatError(
            f"layers: expected {L} entries (cache.n_layers), got {len(table)}"
        )
    float_dtype = _float_tensor_dtype(m["quant"])  # validated by _check_quant
    out = {"tokens": ("I32", (T,))}
    for li, layer in enumerate(table):
        if not isinstance(layer, list):
            raise CardFormatError(f"layers[{li}]: expected a list of segments")
        covered = 0
        sizes = dict.fromkeys(_PACKED, 0)
        for si, seg in enumerate(layer):
            where = f"layers[{li}][{si}]"
            bits = _req(seg, "bits", int, where)
            n = _req(seg, "n", int, where)
            if bits not in ALL_BITS:
                raise CardFormatError(
                    f"{where}.bits: {bits} not one of {list(ALL_BITS)}"
                )
            if not 0 < n <= T:
                raise CardFormatError(f"{where}.n: {n} not in 1..{T}")
            covered += n
            for kv, D in (("k", dk), ("v", dv)):
                e = _req(seg, kv, dict, where)
                layout = _req(e, "layout", str, f"{where}.{kv}")
                group = _req(e, "group", int, f"{where}.{kv}")
                shape = (B, H, n, D)
                shapes = _encoded_shapes(layout, group, bits, shape, where, float_dtype)
                for part, (_, shape) in shapes.items():
                    sizes[part] += math.prod(shape)
        if covered != T:
            raise CardFormatError(
                f"layers[{li}]: segments cover {covered} tokens, expected {T}"
            )
        out[f"l{li}.index"] = (_index_dtype(T), (T,))
        for part, dtype in _PACKED.items():
            out[f"l{li}.{part}"] = (dtype or float_dtype, (sizes[part],))
    return out


_FINGERPRINT_KINDS = {
    "model_type": str,
    "n_layers": int,
    "n_kv_heads": int,
    "head_dim": int,
    "rope_theta": (int, float),
    "rope_scaling": dict,
    "vocab_size": int,
    "tokenizer_sha256": str,
    "weights_sha256": str,
}


def _check_fingerprint(model: dict) -> None:
    """Fingerprint fields, where present and not null, have their JSON types."""
    for key, kind in _FINGERPRINT_KINDS.items():
        if model.get(key) is None:
            continue
        v = _req(model, key, kind, "model")
        if kind is int and v < 0:
            raise CardFormatError(f"model.{key}: expected a size >= 0, got {v}")


def _check_quant(quant: dict) -> None:
    """The quantization summary can rebuild a QuantConfig (see to_quantized)."""
    _req(quant, "controller", str, "quant")
    for key in ("budget_bits", "effective_bits", "nominal_bits"):
        if key == "budget_bits" and key in quant and quant[key] is None:
            continue
        v = _req(quant, key, (int, float), "quant")
        if not 0 <= v <= 64:
            raise CardFormatError(f"quant.{key}: expected 0..64 bits, got {v}")
    cfg = _req(quant, "config", dict, "quant")
    defaults = QuantConfig().to_dict()
    optional = {"rotation": "none"}  # written only when not the default
    if not set(defaults) <= set(cfg) <= set(defaults) | set(optional):
        raise CardFormatError(
            f"quant.config: expected keys {sorted(defaults)} (optional "
            f"{sorted(optional)}), got {sorted(cfg)[:10]}"
        )
    for key, default in {**defaults, **optional}.items():
        if key in cfg:
            _req(cfg, key, type(default), "quant.config")
    if cfg.get("rotation") == "none":  # one spelling: no rotation, no key
        raise CardFormatError("quant.config.rotation: 'none' is written as no key")
    widths = cfg["widths"]
    if not all(type(b) is int for b in widths):
        raise CardFormatError(f"quant.config.widths: expected ints, got {widths!r:.60}")
    try:
        QuantConfig(**dict(cfg, widths=tuple(widths)))
    except ConfigError as e:
        raise CardFormatError(f"quant.config: {e}") from None


def _encoded_shapes(layout, group, bits, shape, where, float_dtype):
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
    else:
        raise CardFormatError(
            f"{where}: layout {layout!r} not one of token/channel/float"
        )
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


def _assemble(m: dict, t: dict[str, np.ndarray]) -> CacheCard:
    c = m["cache"]
    B, H, T = c["batch"], c["n_kv_heads"], c["n_tokens"]
    dims = (("k", c["head_dim_k"]), ("v", c["head_dim_v"]))
    float_dtype = _float_tensor_dtype(m["quant"])
    layers = []
    for li, layer in enumerate(m["layers"]):
        p = f"l{li}"
        # int32 positions in memory (Segment.index), whatever the stored dtype
        index = np.asarray(t[f"{p}.index"], dtype=np.int32)
        if index.size and (index.min() < 0 or index.max() >= T):
            raise CardFormatError(f"{p}.index: positions outside 0..{T - 1}")
        if not _is_permutation(index, T):
            raise CardFormatError(
                f"layer {li}: token indices are not a permutation of 0..{T - 1}"
            )
        packed = {part: t[f"{p}.{part}"] for part in _PACKED}
        for part in ("scales", "biases", "float"):
            if not np.isfinite(packed[part]).all():
                raise CardFormatError(f"{p}.{part}: NaN or Inf")
        # Each segment's arrays are views of the next slices of the packed
        # tensors: keys then values, in segment order (sizes checked already).
        offsets = dict.fromkeys(_PACKED, 0)
        start = 0
        segs = []
        for si, seg in enumerate(layer):
            n = seg["n"]
            encs = []
            for kv, D in dims:
                e = seg[kv]
                shapes = _encoded_shapes(
                    e["layout"],
                    e["group"],
                    seg["bits"],
                    (B, H, n, D),
                    f"layers[{li}][{si}]",
                    float_dtype,
                )
                arrays = {}
                for part, (_, shape) in shapes.items():
                    o = offsets[part]
                    offsets[part] = o + math.prod(shape)
                    view = packed[part][o : offsets[part]].reshape(shape)
                    arrays["data" if part == "float" else part] = view
                encs.append(Encoded(e["layout"], e["group"], **arrays))
            idx = index[start : start + n]
            segs.append(Segment(seg["bits"], idx, encs[0], encs[1]))
            start += n
        layers.append(segs)
    tokens = t["tokens"]
    if tokens.size and tokens.min() < 0:
        raise CardFormatError("tokens: negative token id")
    vocab = m["model"].get("vocab_size")
    if isinstance(vocab, int) and tokens.size and tokens.max() >= vocab:
        raise CardFormatError(
            f"tokens: id {int(tokens.max())} outside vocabulary of {vocab}"
        )
    return CacheCard(
        layers=layers,
        tokens=tokens,
        model=m["model"],
        cache=c,
        quant=m["quant"],
        producer=m["producer"],
        user=m["user"],
    )


__all__ = [
    "CacheCard",
    "CardError",
    "fingerprint_from_config",
    "fingerprint_mismatches",
    "tokenizer_hash",
]
