"""The numpy backend: packing, affine (de)quantization and the pipeline in numpy.

The executable form of docs/cachecard-format.md. It needs numpy only, so a
machine with torch + transformers and no MLX can read and write cards
(``qkvshare_converters.hf_cache`` uses it): :data:`NUMPY` gives
:func:`.pipeline.quantize` its array operations, :func:`quantize_cache_np`
and :func:`dequantize_cache_np` are the whole cache. Its table-lookup
decoder (:func:`dequantize_rows`) is also the MLX receiver's fast path on the
CPU (:mod:`.fastpath`). The MLX backend produces the same codes layout
through ``mx.quantize``; tests check both agree. The codes can differ from
``mx.quantize`` by one step where the two round a group's scale
differently; both decode within half a step of the input.

Packing: a row of ``n`` codes of ``bits`` each is one little-endian bit
stream; code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, and the
stream is cut into uint32 words, least significant bit first (the layout of
``mx.quantize``). Dequantized value = ``scale * code + bias`` per group.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..formats import (
    Encoded,
    Format,
    QuantConfig,
    QuantizedKV,
    Segment,
    check_cover,
    layer_index,
    pad_rows,
    padded,
)
from ..rope import rope_np, rope_rows
from ..rotation import rotation_matrix
from . import pipeline
from .controllers import HandoffPlan, TokenStats


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (..., n) into uint32 words (..., n*bits/32)."""
    *lead, n = q.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    q = q.astype(np.uint64).reshape(*lead, n // 32, 32)
    words = np.zeros((*lead, n // 32, bits), dtype=np.uint64)
    for j in range(32):
        offset = j * bits
        w, s = divmod(offset, 32)
        words[..., w] |= (q[..., j] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:
            words[..., w + 1] |= q[..., j] >> np.uint64(32 - s)
    return words.astype(np.uint32).reshape(*lead, n * bits // 32)


# Unpacking reads the bit stream in chunks of whole codes: a byte for widths
# dividing 8, 12 bits (two per 3 bytes) for 3 and 6, 10 bits (four per 5
# bytes) for 5. One table lookup turns a chunk into its codes, one per byte.
_CHUNK_BITS = {2: 8, 4: 8, 8: 8, 3: 12, 6: 12, 5: 10}


@functools.cache
def _code_table(bits: int) -> np.ndarray:
    """Chunk value -> its chunk_bits/bits codes, packed as little-endian bytes."""
    chunk = _CHUNK_BITS[bits]
    per = chunk // bits
    v = np.arange(1 << chunk, dtype=np.uint32)
    packed = np.zeros(1 << chunk, dtype=np.uint32)
    for j in range(per):
        packed |= ((v >> (bits * j)) & ((1 << bits) - 1)) << (8 * j)
    return packed.astype(f"<u{per}")


@functools.cache
def _float_table(bits: int) -> np.ndarray:
    """Chunk value -> its codes as float32, shape (2**chunk_bits, codes per chunk)."""
    table = _code_table(bits)
    return table.view(np.uint8).reshape(table.shape[0], -1).astype(np.float32)


def _chunks(words: np.ndarray, bits: int) -> np.ndarray:
    """The bit stream of each row of words, cut into chunks of whole codes.

    (..., W) words -> (..., n_chunks) chunk values (uint8 or uint16).
    """
    stream = np.ascontiguousarray(words, dtype="<u4")
    *lead, n_words = stream.shape
    b = stream.view(np.uint8)  # (..., 4W): the little-endian bit stream
    chunk = _CHUNK_BITS[bits]
    if chunk == 8:
        return b
    unit = chunk // 2 if chunk == 12 else 5  # bytes holding whole chunks
    per_unit = unit * 8 // chunk
    rows, n_units = int(np.prod(lead, dtype=np.int64)), n_words * 4 // unit
    chunks = np.empty((rows, n_units, per_unit), dtype=np.uint16)
    for j in range(per_unit):
        # chunk j: the 16-bit little-endian word at its first byte, shifted
        byte, shift = divmod(chunk * j, 8)
        w = np.ndarray(
            (rows, n_units),
            dtype="<u2",
            buffer=b,
            offset=byte,
            strides=(4 * n_words, unit),
        )
        np.bitwise_and(w >> shift, (1 << chunk) - 1, out=chunks[:, :, j])
    return chunks.reshape(*lead, n_units * per_unit)


def unpack_codes(
    words: np.ndarray, bits: int, dtype=np.uint8, out: np.ndarray | None = None
) -> np.ndarray:
    """Unpack uint32 words (..., W) into codes (..., W*32/bits).

    Codes are read a chunk at a time through a lookup table (one gather per
    chunk), several times faster than shifting out each code. ``dtype``:
    ``np.uint8`` or ``np.float32`` (the table holds the codes as floats, so
    no separate conversion pass). ``out``: a contiguous float32 array of the
    result's size to write to (float32 only).
    """
    *lead, n_words = np.shape(words)
    n = n_words * 32 // bits
    chunks = _chunks(words, bits)
    if dtype == np.float32:
        table = _float_table(bits)
        dest = None if out is None else out.reshape(*chunks.shape, table.shape[1])
        q = np.take(table, chunks, axis=0, out=dest, mode="clip")
        return q.reshape(*lead, n)
    if bits == 8:
        return chunks.copy()  # not a view of the caller's words
    return np.take(_code_table(bits), chunks).view(np.uint8).reshape(*lead, n)


def _unpack_columns(
    words: np.ndarray, bits: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Per-channel codes (..., D, W) -> float32 codes (..., n, D), token rows.

    Unpacked one byte per code, then transposed and widened in one copy
    (faster here than any transposing table lookup tried).
    """
    q = unpack_codes(words, bits)  # (..., D, n)
    shape = (*q.shape[:-2], q.shape[-1], q.shape[-2])
    out = np.empty(shape, np.float32) if out is None else out.reshape(shape)
    np.copyto(out, q.swapaxes(-1, -2))
    return out


def dequantize_rows(
    enc: Encoded,
    bits: int,
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Decode a quantized :class:`Encoded` to (B, H, n, D) float32 token rows.

    ``scale * code + bias`` per group, the float32 operations of
    :func:`dequantize_groups` (same values, bit for bit), written to ``out``
    if given: any (B, H, n, D) float32 array or view (e.g. a slice of a
    preallocated cache), so the rows are written once, where they belong.
    Per-channel keys are unpacked straight into token rows. ``scratch``: a
    contiguous float32 buffer of at least B*H*n*D elements for the unpacked
    codes (reused across calls, fresh memory costs a page fault per 4 KiB);
    without ``out`` the result is written there.
    """
    if enc.dim is not None:  # padded rows: decode whole, keep the first dim
        full = Encoded(enc.layout, enc.group, enc.codes, enc.scales, enc.biases)
        rows = dequantize_rows(full, bits, scratch=scratch)[..., : enc.dim]
        if out is None:
            return np.ascontiguousarray(rows)
        out[...] = rows
        return out
    s = np.asarray(enc.scales).astype(np.float32)
    b = np.asarray(enc.biases).astype(np.float32)
    g = enc.group
    if enc.layout == "token":
        B, H, n, W = np.shape(enc.codes)
        D = W * 32 // bits
        split = (B, H, n, D // g, g)
        s, b = s[..., None], b[..., None]
    else:  # codes (B, H, D, W): groups of g tokens per channel
        B, H, D, W = np.shape(enc.codes)
        n = W * 32 // bits
        split = (B, H, n // g, g, D)
        s, b = s.swapaxes(-1, -2)[..., None, :], b.swapaxes(-1, -2)[..., None, :]
    need = B * H * n * D
    q = None if scratch is None or scratch.size < need else scratch[:need]
    if enc.layout == "token":
        q = unpack_codes(enc.codes, bits, np.float32, out=q)
    else:
        q = _unpack_columns(enc.codes, bits, out=q)
    if out is None:
        out = q  # in place
    o = np.reshape(out, split, copy=False)
    np.multiply(np.reshape(q, split), s, out=o)
    np.add(o, b, out=o)
    return out


def quantize_groups(
    x: np.ndarray, bits: int, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine-quantize along the last axis in groups; float16 scales and biases.

    Returns (codes uint32 (..., n*bits/32), scales (..., n/group),
    biases (..., n/group)). Scales and biases are rounded to float16 before
    the codes are chosen, so ``|x - dequant| <= scale/2`` per element (up to
    float rounding).
    """
    *lead, n = x.shape
    g = x.astype(np.float32).reshape(*lead, n // group, group)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    levels = (1 << bits) - 1
    scales = ((hi - lo) / levels).astype(np.float16)
    biases = lo.astype(np.float16)
    s = scales.astype(np.float32)
    s_safe = np.where(s > 0, s, 1.0)
    q = np.rint((g - biases.astype(np.float32)[..., None]) / s_safe[..., None])
    q = np.clip(q, 0, levels).astype(np.uint8).reshape(*lead, n)
    return pack_codes(q, bits), scales, biases


def dequantize_groups(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int
) -> np.ndarray:
    """Inverse of :func:`quantize_groups` (float32 result)."""
    q = unpack_codes(codes, bits).astype(np.float32)
    *lead, n = q.shape
    q = q.reshape(*lead, n // group, group)
    out = (
        q * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]
    )
    return out.reshape(*lead, n)


def encode(x: np.ndarray, bits: int, layout: str, group: int, float_dtype) -> Encoded:
    """Encode (B, H, n, D) tokens in one layout."""
    if layout == "float":
        data = np.ascontiguousarray(x.astype(np.dtype(float_dtype)))
        return Encoded("float", data=data)
    if layout == "channel":
        x = np.swapaxes(x, -1, -2)
    D = x.shape[-1]
    codes, scales, biases = quantize_groups(pad_rows(x, group), bits, group)
    dim = D if padded(layout, D, group) else None
    return Encoded(layout, group, codes, scales, biases, dim=dim)


def decode(enc: Encoded, bits: int) -> np.ndarray:
    """Decode an :class:`Encoded` back to (B, H, n, D) float32."""
    if enc.layout == "float":
        return np.asarray(enc.data, dtype=np.float32)
    x = dequantize_groups(
        np.asarray(enc.codes),
        np.asarray(enc.scales),
        np.asarray(enc.biases),
        bits,
        enc.group,
    )
    if enc.layout == "channel":
        x = np.swapaxes(x, -1, -2)
    return x if enc.dim is None else x[..., : enc.dim]


class NumpyBackend:
    """:class:`.pipeline.Backend` on numpy arrays."""

    xp = np

    def asarray(self, x):
        return np.asarray(x)

    def host(self, x):
        return x

    def lane(self, i: int):
        return contextlib.nullcontext()

    def take(self, x, index: np.ndarray):
        return x[:, :, index]

    def rotate(self, x, kind: str):
        matrix = rotation_matrix(kind, x.shape[-1])
        return x.astype(np.float32) @ matrix

    def unrope(self, x, spec):
        return rope_np(x, spec, inverse=True)

    encode = staticmethod(encode)

    def finish(self, layers) -> None:
        pass


NUMPY = NumpyBackend()


def encode_bucket(
    keys: np.ndarray,
    values: np.ndarray,
    index: np.ndarray,
    fmt: Format,
    float_dtype: str = "float16",
) -> list[Segment]:
    """Encode the tokens ``index`` of (B, H, T, D) keys/values in ``fmt``."""
    return pipeline.encode_bucket(NUMPY, keys, values, index, fmt, float_dtype)


def decode_layer(
    segments: list[Segment], n_tokens: int, *, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Reassemble (B, H, T, D) float32 keys and values from a layer's segments.

    A layer held from ``start`` (a sliding window's tokens) gets zero rows
    before it: positions its window masks out of every later query.
    """
    index = layer_index(segments)
    check_cover(index, n_tokens, start=start)
    ks = [decode(s.keys, s.bits) for s in segments]
    vs = [decode(s.values, s.vbits) for s in segments]
    order = np.argsort(index, kind="stable")
    k = np.concatenate(ks, axis=2)[:, :, order]
    v = np.concatenate(vs, axis=2)[:, :, order]
    if start:
        pad = [(0, 0), (0, 0), (start, 0), (0, 0)]
        k, v = np.pad(k, pad), np.pad(v, pad)
    return k, v


def unrotate_rows(d: np.ndarray, T: int, rotation: str, chunk: int = 1024) -> None:
    """Undo a rotation in place on rows ``:T`` of a (B, H, n, D) float32 view.

    Chunk by chunk through a small scratch buffer (cache-resident, no fresh
    pages), each row range of one head being contiguous."""
    r = rotation_matrix(rotation, d.shape[-1])
    if r is None:
        return
    rt = np.ascontiguousarray(r.T)
    scratch = np.empty((min(chunk, T), d.shape[-1]), np.float32)
    B, H = d.shape[:2]
    for b in range(B):
        for h in range(H):
            for a in range(0, T, chunk):
                rows = d[b, h, a : min(a + chunk, T)]
                out = scratch[: rows.shape[0]]
                np.matmul(rows, rt, out=out)
                rows[...] = out


def quantize_cache_np(
    keys: list[np.ndarray],
    values: list[np.ndarray],
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
    windows: list[int | None] | None = None,
) -> QuantizedKV:
    """Quantize a KV cache under an average-bit budget, in numpy.

    Args:
        keys, values: per layer, (B, H_kv, T, D) float arrays.
        controller: a name in :data:`controllers.CONTROLLERS`.
        budget_bits: target effective bits per K/V element (scales included)
            for the newly quantized tokens.
        config: quantizer settings.
        stats: token statistics for saliency-based controllers.
        plan: the handoff plan (hops remaining, receivers) for ``topology``.
        inherited: a cache covering the first tokens; its segments are kept
            bit for bit and only tokens after it are quantized.
        windows: per layer, the sliding window (None: full attention); a
            sliding layer holds only its window (see pipeline.quantize).

    Returns:
        A :class:`QuantizedKV` (numpy arrays) covering all T tokens.

    Raises:
        CacheShapeError: bad shapes, non-finite values, or an inherited cache
            that does not fit.
        ConfigError: unknown controller, budget out of range, missing stats.
    """
    return pipeline.quantize(
        keys,
        values,
        backend=NUMPY,
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
        plan=plan,
        inherited=inherited,
        windows=windows,
    )


def dequantize_cache_np(qkv: QuantizedKV) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All layers of a :class:`QuantizedKV` as lists of (B, H, T, D) float32 arrays.

    A layer held from ``held_from[l] > 0`` has zero rows before it. A
    rotation is undone, then pre-RoPE keys are rotated forward (``key_rope``).

    Raises:
        CacheShapeError: a layer's segments do not cover ``n_tokens`` tokens.
    """
    keys, values = [], []
    key_rope = qkv.config.key_rope
    for li, (layer, start) in enumerate(zip(qkv.layers, qkv.starts)):
        k, v = decode_layer(layer, qkv.n_tokens, start=start)
        rk = rotation_matrix(qkv.config.rotation, k.shape[-1])
        rv = rotation_matrix(qkv.config.rotation, v.shape[-1])
        k = k if rk is None else k @ rk.T
        if key_rope is not None:  # pre-RoPE keys: rotated forward again
            k = np.ascontiguousarray(k, dtype=np.float32)
            rope_rows(k, key_rope.spec(li))
        keys.append(k)
        values.append(v if rv is None else v @ rv.T)
    return keys, values
