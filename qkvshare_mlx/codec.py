"""Reference codec in plain numpy: packing, affine (de)quantization, layers.

This is the executable form of docs/cachecard-format.md. It needs numpy only,
so a machine with torch + transformers and no MLX can read and write cards
(``qkvshare_converters.hf_cache`` uses it). The MLX quantizer produces the
same codes layout through ``mx.quantize``; tests check both agree.

Packing: a row of ``n`` codes of ``bits`` each is one little-endian bit
stream; code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, and the
stream is cut into uint32 words, least significant bit first (the layout of
``mx.quantize``). Dequantized value = ``scale * code + bias`` per group.
"""

from __future__ import annotations

import functools

import numpy as np

from .formats import Encoded, Format, Segment, split_for_layout


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


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint32 words (..., W) into codes (..., W*32/bits) as uint8.

    Codes are read a chunk at a time through a lookup table (one gather per
    chunk), several times faster than shifting out each code.
    """
    stream = np.ascontiguousarray(words, dtype="<u4")
    *lead, n_words = stream.shape
    b = stream.view(np.uint8)  # (..., 4W): the little-endian bit stream
    chunk = _CHUNK_BITS[bits]
    if chunk == 8:
        chunks = b
    else:
        unit = chunk // 2 if chunk == 12 else 5  # bytes holding whole chunks
        u = b.reshape(*lead, n_words * 4 // unit, unit)
        wide = np.uint32 if unit <= 4 else np.uint64
        v = u[..., 0].astype(wide)
        for i in range(1, unit):
            v |= u[..., i].astype(wide) << wide(8 * i)
        per_unit = unit * 8 // chunk
        chunks = np.empty((*u.shape[:-1], per_unit), dtype=np.uint16)
        for j in range(per_unit):
            chunks[..., j] = (v >> wide(chunk * j)) & wide((1 << chunk) - 1)
    if bits == 8:
        return chunks.copy()  # not a view of the caller's words
    codes = np.take(_code_table(bits), chunks).view(np.uint8)
    return codes.reshape(*lead, n_words * 32 // bits)


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
        return Encoded("float", data=np.ascontiguousarray(x.astype(float_dtype)))
    if layout == "channel":
        x = np.swapaxes(x, -1, -2)
    codes, scales, biases = quantize_groups(x, bits, group)
    return Encoded(layout, group, codes, scales, biases)


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
    return x


def encode_bucket(
    keys: np.ndarray,
    values: np.ndarray,
    index: np.ndarray,
    fmt: Format,
    float_dtype=np.float16,
) -> list[Segment]:
    """Encode the tokens ``index`` of (B, H, T, D) keys/values in ``fmt``."""
    out = []
    for start, stop, k_layout, k_group in split_for_layout(len(index), fmt):
        idx = np.asarray(index[start:stop], dtype=np.int32)
        k, v = keys[:, :, idx], values[:, :, idx]
        if fmt.is_float:
            ek = encode(k, 16, "float", 0, float_dtype)
            ev = encode(v, 16, "float", 0, float_dtype)
        else:
            ek = encode(k, fmt.bits, k_layout, k_group, None)
            ev = encode(v, fmt.bits, "token", fmt.value_group, None)
        out.append(Segment(fmt.bits, idx, ek, ev))
    return out


def decode_layer(
    segments: list[Segment], n_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reassemble (B, H, T, D) float32 keys and values from a layer's segments."""
    ks = [decode(s.keys, s.bits) for s in segments]
    vs = [decode(s.values, s.bits) for s in segments]
    index = np.concatenate([np.asarray(s.index) for s in segments])
    if index.shape[0] != n_tokens:
        raise ValueError(f"segments cover {index.shape[0]} tokens, expected {n_tokens}")
    order = np.argsort(index, kind="stable")
    k = np.concatenate(ks, axis=2)[:, :, order]
    v = np.concatenate(vs, axis=2)[:, :, order]
    return k, v
