"""CacheCard: one quantized KV cache, its tokens and the metadata to use it safely.

A card holds one :class:`~qkvshare_mlx.formats.QuantizedKV` (the segments of
every layer, numpy arrays), the (T,) token ids they cover, the model
fingerprint, the RoPE offset and dtype of the cache, and free-form user
metadata. Its ``cache`` and ``quant`` summaries are derived from those, so
the card exists once in memory. Bytes come and go through :meth:`to_bytes`
/ :meth:`from_bytes` (and :meth:`save` / :meth:`load`): a safetensors file
(:mod:`.container`) laid out as :mod:`.schema` (docs/cachecard-format.md)
says. Reading treats the bytes as hostile; every failure is a
:class:`~qkvshare_mlx.errors.CardError` subclass.

Only numpy is needed (no MLX, no torch): the transformers side reads and
writes cards through this module too.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import fingerprint as fingerprints
from ..dtypes import SAFETENSORS, safetensors_code
from ..errors import (
    CardFormatError,
    CardIntegrityError,
    CardOffsetError,
    CardTooLargeError,
)
from ..formats import (
    Encoded,
    QuantizedKV,
    Segment,
    check_cover,
    layer_index,
    padded,
    width_histogram,
)
from . import auth, container, schema

DEFAULT_MAX_BYTES = 8 << 30  # refuse cards claiming more than 8 GiB


@dataclass
class CacheCard:
    """A quantized KV cache plus everything needed to use it safely.

    Attributes:
        qkv: the quantized cache: per layer, segments with numpy arrays, of
            (B, H_kv, T, D_k/D_v) keys and values.
        tokens: (T,) int32 token ids the cache covers (shared by all batch
            rows).
        model: model fingerprint (see :mod:`qkvshare_mlx.fingerprint`).
        offset: RoPE position of token 0.
        dtype: dtype of the cache the card was made from.
        producer: runtime and library that wrote the card.
        user: free-form JSON metadata (e.g. the sender's role).
        key_id: the key id of the signature the card was read with (set by
            the reader when it checked one; None for an unchecked or unsigned
            card). Not part of the card's content.
    """

    qkv: QuantizedKV
    tokens: np.ndarray
    model: dict
    offset: int = 0
    dtype: str = "float32"
    producer: dict = field(default_factory=dict)
    user: dict = field(default_factory=dict)
    key_id: str | None = field(default=None, compare=False)

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
        """Wrap a :class:`QuantizedKV` (MLX or numpy arrays) as a card.

        Args:
            qkv: the quantized cache (its arrays are copied to numpy).
            tokens: the (T,) token ids it covers.
            model: the model fingerprint.
            offset: RoPE position of the first token.
            dtype: the cache's dtype name (``cache.dtype``).
            runtime: ``producer.runtime`` (``"mlx"``, ``"numpy"``, ...).
            user: free-form JSON metadata.
        """
        from .. import __version__

        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.shape[0] != qkv.n_tokens:
            raise CardFormatError(
                f"tokens: expected {qkv.n_tokens} ids (cache length), "
                f"got {tokens.shape[0]}"
            )
        if dtype not in schema.CACHE_DTYPES:
            raise CardFormatError(
                f"dtype: expected one of {list(schema.CACHE_DTYPES)}, got {dtype!r}"
            )
        layers = [[s.map_arrays(np.asarray) for s in layer] for layer in qkv.layers]
        qkv = QuantizedKV(
            layers,
            qkv.n_tokens,
            tuple(qkv.shape),
            qkv.config,
            qkv.controller,
            qkv.budget_bits,
            dict(qkv.info),
            held_from=qkv.held_from,
        )
        producer = {
            "runtime": runtime,
            "library": "qkvshare-mlx",
            "version": __version__,
        }
        return cls(
            qkv, tokens, dict(model), int(offset), dtype, producer, dict(user or {})
        )

    def to_quantized(self) -> QuantizedKV:
        """The card's :class:`QuantizedKV` (numpy arrays; shared, not copied)."""
        return self.qkv

    # ---- summary -------------------------------------------------------------

    @property
    def layers(self) -> list[list[Segment]]:
        return self.qkv.layers

    @property
    def n_tokens(self) -> int:
        return self.qkv.n_tokens

    @property
    def cache(self) -> dict:
        """The card JSON's ``cache`` entry (shape summary, offset, dtype)."""
        B, H, dk, dv = self.qkv.shape
        return {
            "n_layers": len(self.qkv.layers),
            "batch": B,
            "n_kv_heads": H,
            "head_dim_k": dk,
            "head_dim_v": dv,
            "n_tokens": self.n_tokens,
            "offset": int(self.offset),
            "dtype": self.dtype,
            # version 3 (schema.needs_v3): windows, padded rows, split widths
            **({"held_from": self.qkv.starts} if schema.needs_v3(self.qkv) else {}),
        }

    @property
    def quant(self) -> dict:
        """The card JSON's ``quant`` entry (controller, budget, bits, config)."""
        return {
            "controller": self.qkv.controller,
            "budget_bits": self.qkv.budget_bits,
            "effective_bits": round(self.qkv.effective_bits, 6),
            "nominal_bits": round(self.qkv.nominal_bits, 6),
            "config": self.qkv.config.to_dict(),
        }

    @property
    def payload_bytes(self) -> int:
        """Bytes of the encoded K/V (codes, scales, biases, float copies)."""
        return self.qkv.payload_bytes

    @property
    def n_elements(self) -> int:
        return self.qkv.n_elements

    @property
    def effective_bits(self) -> float:
        return self.qkv.effective_bits

    @property
    def fp16_bytes(self) -> int:
        """Bytes the held tokens take in float16 (mlx-lm's KVCache at fp16)."""
        return 2 * self.n_elements

    def width_histogram(self) -> dict[int, int]:
        """Token count per width, summed over layers."""
        return width_histogram(self.layers)

    def require_start(self, receiver: str) -> None:
        """Raise CardOffsetError unless the card starts at RoPE position 0.

        Args:
            receiver: what needs it, for the message (e.g. "a DynamicCache").
        """
        if self.offset != 0:
            raise CardOffsetError(
                f"cache.offset: {receiver} starts at position 0, card has {self.offset}"
            )

    def check_model(self, expect, *, allow_other_weights: bool = False) -> str:
        """Raise ModelMismatchError listing every field that differs from ``expect``.

        Args:
            expect: a fingerprint dict (or a model, folder or config that
                :func:`qkvshare_mlx.fingerprint.fingerprint` accepts).
            allow_other_weights: accept a card made with other weights (e.g.
                a base model's card for its LoRA merge).

        Returns:
            How the weights compared (see :func:`qkvshare_mlx.fingerprint.check`).
        """
        is_fp = isinstance(expect, dict) and not hasattr(expect, "parameters")
        fp = (
            expect if is_fp else fingerprints.fingerprint(expect)
        )  # (a Module is a dict)
        extra = []
        vocab = fp.get("vocab_size")
        if vocab is not None and self.tokens.size and int(self.tokens.max()) >= vocab:
            extra.append(
                f"tokens: id {int(self.tokens.max())} outside the model's vocabulary "
                f"of {vocab}"
            )
        return fingerprints.check(
            self.model, fp, extra=extra, allow_other_weights=allow_other_weights
        )

    # ---- serialisation -----------------------------------------------------

    def _tensors(self) -> dict[str, np.ndarray | container.Pieces]:
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
        B, H, dk, dv = self.qkv.shape
        T = self.n_tokens
        float_dtype = schema.float_tensor_dtype(self.quant)
        index_dtype = SAFETENSORS[schema.index_dtype(T)]
        tensors = {"tokens": self.tokens}
        for li, (layer, start) in enumerate(zip(self.layers, self.qkv.starts)):
            packed: dict[str, list[np.ndarray]] = {part: [] for part in schema.PACKED}
            index = layer_index(layer)
            check_cover(index, T, f"layers[{li}]", start=start)
            tensors[f"l{li}.index"] = index.astype(index_dtype)
            for si, seg in enumerate(layer):
                where = f"layers[{li}][{si}]"
                for kv, enc, D, b in (
                    ("k", seg.keys, dk, seg.bits),
                    ("v", seg.values, dv, seg.vbits),
                ):
                    shapes = schema.encoded_shapes(
                        enc.layout,
                        enc.group,
                        b,
                        (B, H, seg.n_tokens, D),
                        where,
                        float_dtype,
                    )
                    arrays = enc.arrays()
                    for part, (dtype, shape) in shapes.items():
                        arr = np.asarray(arrays["data" if part == "float" else part])
                        if safetensors_code(arr.dtype) != dtype or arr.shape != shape:
                            raise CardFormatError(
                                f"{where}.{kv}: {part} expected {dtype}{list(shape)}, "
                                f"got {arr.dtype}{list(arr.shape)}"
                            )
                        packed[part].append(arr.reshape(-1))
            for part, dtype in schema.PACKED.items():
                dt = SAFETENSORS[float_dtype if dtype is None else dtype]
                # written piece by piece: no copy of the card in memory
                tensors[f"l{li}.{part}"] = container.Pieces(tuple(packed[part]), dt)
        return tensors

    def _metadata(self) -> dict:
        cache, quant = self.cache, self.quant  # each summed over segments once
        return {
            "format": schema.FORMAT_NAME,
            "version": schema.version_for(quant, cache),
            "producer": self.producer,
            "model": self.model,
            "cache": cache,
            "quant": quant,
            "layers": schema.layer_table(self.layers),
            "user": self.user,
        }

    @property
    def version(self) -> int:
        """The format version this card is written as (see schema.READ_VERSIONS)."""
        return schema.version_for(self.quant, self.cache)

    def _serial(self) -> tuple[str, bytes, dict[str, np.ndarray], int]:
        """(checksum domain, canonical card JSON, tensors, version)."""
        meta = self._metadata()
        version = meta["version"]
        return (
            schema.checksum_domain(version),
            container.canonical_json(meta),
            self._tensors(),
            version,
        )

    def checksum(self) -> str:
        """The card's SHA-256 (hex), as written in its header."""
        domain, meta, tensors, _ = self._serial()
        return container.digest(domain, meta, tensors)

    def to_bytes(self, *, key=None) -> bytes:
        """Serialise to safetensors bytes (see docs/cachecard-format.md).

        Args:
            key: sign the card with this key (a :class:`~.auth.CardKey`, raw
                bytes or hex text; section 11 of the spec).
        """
        key = auth.load_key(key, env={})
        domain, meta, tensors, version = self._serial()
        checksum = container.digest(domain, meta, tensors)
        header = schema.file_metadata(meta, version, checksum)
        return container.write(tensors, auth.signed(header, key))

    def save(self, path, *, key=None) -> Path:
        """Write atomically: temp file in the same folder, fsync, rename.

        The file holds exactly :meth:`to_bytes`, written straight from the
        card's arrays while its checksum is computed on another thread (no
        copy of the whole card in memory). It gets the permissions
        ``open()`` would give it (0o666 less the umask), so an agent running
        as another user can read a card meant for it where the umask allows.

        Args:
            path: the card file.
            key: sign the card with this key (see :meth:`to_bytes`).
        """
        key = auth.load_key(key, env={})
        domain, meta, tensors, version = self._serial()
        return container.write_tensors_file(
            path,
            tensors,
            lambda checksum: auth.signed(
                schema.file_metadata(meta, version, checksum), key
            ),
            domain=domain,
            meta=meta,
        )

    @classmethod
    def from_bytes(
        cls,
        data,
        *,
        expect=None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_tokens: int | None = None,
        key=None,
        allow_other_weights: bool = False,
    ) -> CacheCard:
        """Parse and fully validate card bytes; see :meth:`load`."""
        if max_tokens is None and expect is not None:
            max_tokens = fingerprints.context_length(expect)
        key = auth.load_key(key, env={})
        card = _read(memoryview(data), max_bytes, max_tokens, key)
        if expect is not None:
            card.check_model(expect, allow_other_weights=allow_other_weights)
        return card

    @classmethod
    def load(
        cls,
        path,
        *,
        expect=None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_tokens: int | None = None,
        key=None,
        allow_other_weights: bool = False,
    ) -> CacheCard:
        """Read a card file, validating it before use.

        Args:
            path: the card file.
            expect: a model fingerprint (dict), or a model, folder or config
                (see :func:`qkvshare_mlx.fingerprint.fingerprint`) to check
                the card against.
            max_bytes: refuse cards claiming more than this many bytes.
            max_tokens: refuse cards of more tokens, before any tensor is
                touched; default: the context length of ``expect`` when it is
                a model, folder or config (a fingerprint dict has none).
            key: require a valid signature with this key (a
                :class:`~.auth.CardKey`, raw bytes or hex text).
            allow_other_weights: accept a card made with other weights.

        Raises:
            CardFormatError, CardIntegrityError, CardTooLargeError,
            CardAuthError, ModelMismatchError.
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
        return cls.from_bytes(
            data,
            expect=expect,
            max_bytes=max_bytes,
            max_tokens=max_tokens,
            key=key,
            allow_other_weights=allow_other_weights,
        )


# ----------------------------------------------------------------------------
# Reading


def _read(buf: memoryview, max_bytes: int, max_tokens, key) -> CacheCard:
    header = container.read_header(buf, max_bytes)
    meta = header.metadata
    # 1. format, version and keys
    version = schema.check_file_metadata(meta)
    # 1b. authentication: refuse an unsigned or forged card before parsing
    auth.check_fields(meta)
    if key is not None:
        auth.verify(meta, key)
    try:
        card_raw = meta["card"].encode("utf-8")
    except UnicodeEncodeError:
        raise CardFormatError("card metadata: contains a lone surrogate") from None
    card_meta = container.parse_json(meta["card"], "card metadata")
    # 2. schema and tensor table, before touching tensor bytes
    expected = schema.expected_tensors(card_meta, version)
    n_tokens = card_meta["cache"]["n_tokens"]
    if max_tokens is not None and n_tokens > max_tokens:
        raise CardTooLargeError(
            f"cache.n_tokens: card holds {n_tokens} tokens, this receiver takes at "
            f"most {max_tokens}"
        )
    names = set(header.tensors)
    if names != set(expected):
        missing = sorted(set(expected) - names)[:5]
        extra = sorted(names - set(expected))[:5]
        raise CardFormatError(
            f"tensor set differs from metadata: missing {missing}, extra {extra}"
        )
    for name, (dtype, shape) in expected.items():
        info = header.tensors[name]
        if info["dtype"] != dtype or tuple(info["shape"]) != shape:
            raise CardFormatError(
                f"{name}: expected {dtype}{list(shape)}, "
                f"got {info['dtype']}{info['shape']}"
            )
    container.check_tiling(header)
    tensors = container.tensor_views(buf, header)
    # 3. integrity, and 4. content checks while the checksum runs: a mismatch
    # is reported whatever the content checks found (the spec's order)
    want = meta["sha256"]
    got, card, problem = container.digest_during(
        schema.checksum_domain(version),
        card_raw,
        tensors,
        lambda: _assemble(card_meta, tensors),
    )
    if got != want:
        raise CardIntegrityError(
            f"checksum mismatch: metadata says {want[:16]:.16}..., content is "
            f"{got[:16]}..."
        )
    if problem is not None:
        raise problem
    card.key_id = meta.get("key_id") if key is not None else None
    return card


def _segments(m: dict, li: int, packed: dict, index: np.ndarray) -> list[Segment]:
    """Layer ``li``'s segments: views of the next slices of its packed tensors,
    keys then values, in segment order (sizes checked already)."""
    c = m["cache"]
    B, H = c["batch"], c["n_kv_heads"]
    float_dtype = schema.float_tensor_dtype(m["quant"])
    offsets = dict.fromkeys(schema.PACKED, 0)
    start, segs = 0, []
    for si, seg in enumerate(m["layers"][li]):
        n = seg["n"]
        encs = []
        vbits = seg.get("vbits", seg["bits"])
        for kv, D, b in (
            ("k", c["head_dim_k"], seg["bits"]),
            ("v", c["head_dim_v"], vbits),
        ):
            e = seg[kv]
            shapes = schema.encoded_shapes(
                e["layout"],
                e["group"],
                b,
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
            pad = padded(e["layout"], D, e["group"])
            encs.append(
                Encoded(e["layout"], e["group"], **arrays, dim=D if pad else None)
            )
        segs.append(
            Segment(
                seg["bits"],
                index[start : start + n],
                encs[0],
                encs[1],
                value_bits=seg.get("vbits"),
            )
        )
        start += n
    return segs


def _assemble(m: dict, t: dict[str, np.ndarray]) -> CacheCard:
    c = m["cache"]
    T = c["n_tokens"]
    starts = schema.held_from(c, m["model"])
    layers = []
    for li in range(len(m["layers"])):
        p = f"l{li}"
        # int32 positions in memory (Segment.index), whatever the stored dtype
        index = np.asarray(t[f"{p}.index"], dtype=np.int32)
        check_cover(index, T, f"{p}.index", start=starts[li])
        packed = {part: t[f"{p}.{part}"] for part in schema.PACKED}
        for part in ("scales", "biases", "float"):
            if not np.isfinite(packed[part]).all():
                raise CardFormatError(f"{p}.{part}: NaN or Inf")
        layers.append(_segments(m, li, packed, index))
    tokens = t["tokens"]
    if tokens.size and tokens.min() < 0:
        raise CardFormatError("tokens: negative token id")
    vocab = m["model"].get("vocab_size")
    if isinstance(vocab, int) and tokens.size and tokens.max() >= vocab:
        raise CardFormatError(
            f"tokens: id {int(tokens.max())} outside vocabulary of {vocab}"
        )
    q = m["quant"]
    qkv = QuantizedKV(
        layers,
        T,
        (c["batch"], c["n_kv_heads"], c["head_dim_k"], c["head_dim_v"]),
        schema.quant_config(q),
        q["controller"],
        q.get("budget_bits"),
        held_from=tuple(starts),
    )
    card = CacheCard(
        qkv, tokens, m["model"], c["offset"], c["dtype"], m["producer"], m["user"]
    )
    # the summaries are derived from the segments: a card whose JSON says
    # otherwise contradicts itself (and would not re-serialise to its bytes)
    held = card.quant  # summed over the segments once
    for key in ("effective_bits", "nominal_bits"):
        if type(q[key]) is not float or held[key] != q[key]:
            raise CardFormatError(
                f"quant.{key}: card says {q[key]}, its segments hold {held[key]}"
            )
    return card
