"""The MLX backend: K/V quantized with ``mx.quantize`` and decoded on MLX arrays.

:data:`MLX` gives :func:`.pipeline.quantize` its array operations (each
bucket is one ``mx.quantize`` call; per-channel keys, KIVI-style, quantize
the transposed tokens); :func:`quantize_cache` is the pipeline on MLX
arrays. :func:`decode` and :func:`dequantize_layer` turn segments (numpy
or MLX arrays) back into (B, H_kv, T, D) MLX arrays in token order;
:func:`unrotate` undoes a rotation. The receiver's fast path into mlx-lm's
cache buffers is :mod:`.fastpath`.

The module knows how to store tokens; *which* token gets which format is
decided by :mod:`.controllers`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import mlx.core as mx
import numpy as np

from ..blas import fast_cpu_matmul
from ..formats import (
    Encoded,
    QuantConfig,
    QuantizedKV,
    Segment,
    check_cover,
    layer_index,
    pad_rows,
    padded,
)
from ..rope import layer_spec, rope_mx
from ..rotation import rotation_matrix, rotation_signs
from . import pipeline
from .controllers import HandoffPlan, TokenStats


def _quantize(x: mx.array, bits: int, group: int):
    # Scales and biases are stored in float16 (what the budget counts). The
    # codes are chosen on the float32 input (one pass, no float16 copy of the
    # tokens first: half the time on a CPU), then the grid is rounded to
    # float16, which moves a decoded value by under 0.4% of a step.
    # mx.quantize puts zero on the grid (the far end of a group may clip by up
    # to one step); a min/max grid measured worse on the default model
    # (teacher-forced KL 1.58 vs 1.09 at 2.5 bits), so we keep mx.quantize.
    codes, scales, biases = mx.quantize(
        x.astype(mx.float32), group_size=group, bits=bits
    )
    return codes, scales.astype(mx.float16), biases.astype(mx.float16)


def encode(x: mx.array, bits: int, layout: str, group: int, float_dtype) -> Encoded:
    """Encode (B, H, n, D) tokens in one layout (see formats.Encoded).

    ``float_dtype``: the name of a float copy's dtype (``"float16"``/``"float32"``).
    """
    if layout == "float":
        return Encoded("float", data=x.astype(getattr(mx, float_dtype)))
    if layout == "channel":
        x = x.swapaxes(-1, -2)
    D = x.shape[-1]
    codes, scales, biases = _quantize(pad_rows(x, group, mx), bits, group)
    dim = D if padded(layout, D, group) else None
    return Encoded(layout, group, codes, scales, biases, dim=dim)


def unpack_codes(words: mx.array, bits: int) -> mx.array:
    """Unpack (..., W) uint32 words into (..., W*32/bits) uint32 codes.

    The layout of ``mx.quantize`` (and numpy_backend.pack_codes): one little-endian
    bit stream per row. Widths dividing 8 read single bytes; 3 and 6 bits
    read 3-byte units (8 or 4 whole codes), 5 bits 5-byte units (8 codes).
    """
    *lead, W = words.shape
    mask = (1 << bits) - 1
    b = words.view(mx.uint8)
    if bits == 8:
        return b.astype(mx.uint32)
    if 8 % bits == 0:
        parts = [(b >> (bits * j)) & mask for j in range(8 // bits)]
    else:
        size = 5 if bits == 5 else 3  # bytes per unit of whole codes
        u = b.reshape(*lead, W * 4 // size, size).astype(mx.uint32)
        v = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16)
        if bits == 5:
            v = v | (u[..., 3] << 24)  # codes 0-5, and 2 bits of code 6
            parts = [(v >> (5 * j)) & mask for j in range(6)]
            parts += [(v >> 30) | ((u[..., 4] & 7) << 2), u[..., 4] >> 3]
        else:
            parts = [(v >> (bits * j)) & mask for j in range(24 // bits)]
    return mx.stack(parts, axis=-1).reshape(*lead, W * 32 // bits).astype(mx.uint32)


def dequantize(
    codes: mx.array, scales: mx.array, biases: mx.array, group: int, bits: int
) -> mx.array:
    """``mx.dequantize`` in float32 (``scale * code + bias`` per group).

    On the CPU it is computed with plain element-wise ops, about 3x faster
    there than ``mx.dequantize``'s kernel, with the same float32 result (and
    the numpy reference decoder's, bit for bit). Other devices use
    ``mx.dequantize``.
    """
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    if mx.default_device() != mx.cpu:
        return mx.dequantize(codes, scales, biases, group_size=group, bits=bits)
    q = unpack_codes(codes, bits).astype(mx.float32)
    *lead, n = q.shape
    q = q.reshape(*lead, n // group, group)
    return (q * scales[..., None] + biases[..., None]).reshape(*lead, n)


def decode(enc: Encoded, bits: int, dtype=mx.float32) -> mx.array:
    """Decode an :class:`Encoded` to (B, H, n, D) in ``dtype``."""
    if enc.layout == "float":
        return mx.array(enc.data).astype(dtype)
    # float32 scales make the result match the numpy reference decoder exactly.
    x = dequantize(
        mx.array(enc.codes),
        mx.array(enc.scales),
        mx.array(enc.biases),
        enc.group,
        bits,
    ).astype(dtype)
    if enc.layout == "channel":
        x = x.swapaxes(-1, -2)
    return x if enc.dim is None else x[..., : enc.dim]


_CPU_STREAMS: list = []


def _cpu_streams() -> list:
    """One MLX CPU stream per core (up to 4): ops on different streams run
    on different threads, and MLX's CPU kernels are single-threaded."""
    if not _CPU_STREAMS:
        n = max(1, min(4, os.cpu_count() or 1))
        _CPU_STREAMS.append(mx.default_stream(mx.cpu))
        _CPU_STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(n - 1))
    return _CPU_STREAMS


class MLXBackend:
    """:class:`.pipeline.Backend` on MLX arrays (lazy; evaluated per layer)."""

    xp = mx

    def lane(self, i: int):
        # On a CPU, layer i's lazy work goes to one of several streams (one
        # per core: 2x on 2 cores for the encode); elsewhere the default one.
        if mx.default_device() != mx.cpu:
            return contextlib.nullcontext()
        streams = _cpu_streams()
        return mx.stream(streams[i % len(streams)])

    def asarray(self, x):
        return x if isinstance(x, mx.array) else mx.array(x)

    def host(self, x):
        # On the CPU, MLX arrays are plain host memory: numpy reads them in
        # place (no copy) and its gathers and reductions are several times
        # faster there than MLX's CPU kernels. Other devices stay in MLX.
        if mx.default_device() == mx.cpu and x.dtype in (mx.float32, mx.float16):
            return np.asarray(x)
        return None

    def take(self, x, index: np.ndarray):
        a, b = int(index[0]), int(index[-1]) + 1
        if b - a == len(index) and np.array_equal(index, np.arange(a, b)):
            return x[:, :, a:b]  # a run of tokens: a slice, not a gather
        h = self.host(x)
        if h is not None:
            return mx.array(np.take(h, index, axis=2))
        return mx.take(x, mx.array(index), axis=2)

    def rotate(self, x, kind: str):
        return _rotate(x, kind, inverse=False)

    def unrope(self, x, spec):
        return rope_mx(x, spec, inverse=True)

    encode = staticmethod(encode)

    def finish(self, layers) -> None:
        mx.eval(
            [
                a
                for layer in layers
                for s in layer
                for e in (s.keys, s.values)
                for a in e.arrays().values()
            ]
        )


MLX = MLXBackend()


@functools.cache
def _rotation_matrix(kind: str, dim: int, inverse: bool) -> mx.array:
    r = rotation_matrix(kind, dim)
    return mx.array(r.T.copy() if inverse else r)


def _rotate(x: mx.array, kind: str, inverse: bool) -> mx.array:
    """(..., D) ``x @ R`` (or ``x @ R.T``) in float32.

    On a CPU with an optimized BLAS, the dense (D, D) product (one BLAS
    call, about 2.5x faster there); elsewhere the fast Walsh-Hadamard
    transform on the device. Both agree to float32 rounding.
    """
    D = x.shape[-1]
    s = rotation_signs(kind, D)
    if s is None:
        return x
    x = x.astype(mx.float32)
    if mx.default_device() == mx.cpu and fast_cpu_matmul():
        return x @ _rotation_matrix(kind, D, inverse)
    scale = 1.0 / float(np.sqrt(D))
    if inverse:  # x @ R.T: the Hadamard transform of x, times the signs
        return mx.hadamard_transform(x, scale=scale) * mx.array(s)
    return mx.hadamard_transform(x * mx.array(s), scale=scale)


def unrotate(x: mx.array, rotation: str, dtype=None) -> mx.array:
    """Undo the pipeline's rotation of (..., D) vectors (``x @ R.T``, in
    float32), cast to ``dtype``."""
    x = _rotate(x, rotation, inverse=True)
    return x if dtype is None else x.astype(dtype)


def _zero_pad(x: mx.array, pad: int) -> mx.array:
    """(B, H, T, D) ``x`` with ``pad`` zero positions appended along T."""
    if not pad:
        return x
    B, H, _, D = x.shape
    return mx.concatenate([x, mx.zeros((B, H, pad, D), x.dtype)], axis=2)


def dequantize_layer(
    segments: list[Segment],
    n_tokens: int,
    dtype=mx.float32,
    *,
    capacity: int = 0,
    rotation: str = "none",
    start: int = 0,
    rope=None,
) -> tuple[mx.array, mx.array]:
    """Reassemble (B, H, T, D) keys and values from one layer's segments.

    Args:
        segments: the layer's segments (numpy or MLX arrays).
        n_tokens: T, the tokens they cover.
        dtype: dtype of the result.
        capacity: if larger than T, the results have ``capacity`` positions
            along axis 2, zeros after T (room for new tokens, so an mlx-lm
            ``KVCache`` can append without reallocating). Built in the same
            single gather that puts tokens in order: no extra pass.
        rotation: the cache's ``QuantConfig.rotation``, undone after decoding.
        start: the layer's first held position; rows before it are zeros
            (positions a sliding window masks out of every later query).
        rope: the layer's :class:`~qkvshare_mlx.rope.RopeSpec` when the card
            holds pre-RoPE keys (``QuantConfig.key_rope``): its rows are
            rotated forward after any rotation is undone, in float32.
    """
    if rotation != "none" or rope is not None:
        k, v = dequantize_layer(segments, n_tokens, mx.float32, start=start)
        if rotation != "none":
            k, v = unrotate(k, rotation), unrotate(v, rotation)
        if rope is not None:
            k = rope_mx(k, rope)
        k, v = k.astype(dtype), v.astype(dtype)
        pad = max(int(capacity) - n_tokens, 0)
        return _zero_pad(k, pad), _zero_pad(v, pad)
    ks = [decode(s.keys, s.bits, dtype) for s in segments]
    vs = [decode(s.values, s.vbits, dtype) for s in segments]
    index = layer_index(segments)
    check_cover(index, n_tokens, start=start)
    pad = max(int(capacity) - n_tokens, 0)
    in_order = (
        len(segments) == 1 and not start and np.array_equal(index, np.arange(n_tokens))
    )
    if in_order:
        return _zero_pad(ks[0], pad), _zero_pad(vs[0], pad)
    held = n_tokens - start
    order = np.argsort(index, kind="stable").astype(np.int32)
    if pad or start:
        # positions before start and past T read one appended zero token
        B, H = ks[0].shape[:2]
        ks.append(mx.zeros((B, H, 1, ks[0].shape[3]), dtype))
        vs.append(mx.zeros((B, H, 1, vs[0].shape[3]), dtype))
        zero = np.int32(held)
        order = np.concatenate(
            [np.full(start, zero), order, np.full(pad, zero)]
        ).astype(np.int32)
    order = mx.array(order)
    k = mx.take(mx.concatenate(ks, axis=2), order, axis=2)
    v = mx.take(mx.concatenate(vs, axis=2), order, axis=2)
    return k, v


def dequantize_cache(qkv: QuantizedKV, dtype=mx.float32):
    """All layers of a :class:`QuantizedKV` as lists of (B, H, T, D) keys, values."""
    rot, key_rope = qkv.config.rotation, qkv.config.key_rope
    pairs = [
        dequantize_layer(
            layer,
            qkv.n_tokens,
            dtype,
            rotation=rot,
            start=start,
            rope=layer_spec(key_rope, li),
        )
        for li, (layer, start) in enumerate(zip(qkv.layers, qkv.starts))
    ]
    return [k for k, _ in pairs], [v for _, v in pairs]


def quantize_cache(
    keys: list[mx.array],
    values: list[mx.array],
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
    windows: list[int | None] | None = None,
) -> QuantizedKV:
    """Quantize a KV cache under an average-bit budget, on MLX arrays.

    :func:`.pipeline.quantize` with the MLX backend: per layer, (B, H_kv, T,
    D) keys and values; see there for the arguments.
    """
    return pipeline.quantize(
        keys,
        values,
        backend=MLX,
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
        plan=plan,
        inherited=inherited,
        windows=windows,
    )
