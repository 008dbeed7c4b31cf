"""Token-level mixed-precision quantization of a KV cache, on MLX arrays.

Per layer, keys and values of shape (B, H_kv, T, D) are cut into buckets of
tokens that share a storage format (width + grouping); each bucket is one
``mx.quantize`` call (keys optionally per channel, KIVI-style). The result
is a list of :class:`~qkvshare_mlx.formats.Segment` per layer, which
:func:`dequantize_layer` turns back into (B, H_kv, T, D) in token order.

The module knows how to store tokens; *which* token gets which format is
decided by :mod:`qkvshare_mlx.controllers`.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from . import codec, controllers
from .controllers import validate_budget  # noqa: F401  (re-exported)
from .errors import CacheShapeError
from .formats import (
    FLOAT_BITS,
    Encoded,
    Format,
    QuantConfig,
    QuantizedKV,
    Segment,
    split_for_layout,
)
from .rotation import check_rotation, rotation_matrix

_MX_FLOAT = {"float16": mx.float16, "float32": mx.float32}
# numpy releases the GIL in the decode loops: keys and values in parallel
_DECODE_THREADS = min(2, os.cpu_count() or 1)


def check_kv(keys: list[mx.array], values: list[mx.array]) -> tuple[int, ...]:
    """Validate per-layer K/V lists; return (B, H, T, D_k, D_v)."""
    return controllers.check_kv(keys, values, xp=mx)


def _quantize(x: mx.array, bits: int, group: int):
    # float16 input so scales/biases are float16 (what the budget counts).
    # mx.quantize puts zero on the grid (the far end of a group may clip by up
    # to one step); a min/max grid measured worse on the default model
    # (teacher-forced KL 1.58 vs 1.09 at 2.5 bits), so we keep mx.quantize.
    return mx.quantize(x.astype(mx.float16), group_size=group, bits=bits)


def encode(x: mx.array, bits: int, layout: str, group: int, float_dtype) -> Encoded:
    """Encode (B, H, n, D) tokens in one layout (see formats.Encoded)."""
    if layout == "float":
        return Encoded("float", data=x.astype(float_dtype))
    if layout == "channel":
        x = x.swapaxes(-1, -2)
    codes, scales, biases = _quantize(x, bits, group)
    return Encoded(layout, group, codes, scales, biases)


def unpack_codes(words: mx.array, bits: int) -> mx.array:
    """Unpack (..., W) uint32 words into (..., W*32/bits) uint32 codes.

    The layout of ``mx.quantize`` (and codec.pack_codes): one little-endian
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
    return x


def quantize_layer(
    keys: mx.array,
    values: mx.array,
    formats: list[Format],
    assignment: np.ndarray,
    *,
    config: QuantConfig,
    start: int = 0,
) -> list[Segment]:
    """Quantize tokens ``start..T-1`` of one layer.

    Token ``t`` is stored in ``formats[assignment[t - start]]``.

    Args:
        keys, values: (B, H, T, D) arrays.
        formats: the format menu.
        assignment: (T - start,) indices into ``formats``.
        config: quantizer settings (float dtype).
        start: first token to quantize (earlier tokens are inherited).

    Returns:
        Segments covering tokens ``start..T-1``.
    """
    float_dtype = _MX_FLOAT[config.float_dtype]
    out = []
    for f in np.unique(assignment):
        fmt = formats[int(f)]
        index = (np.nonzero(assignment == f)[0] + start).astype(np.int32)
        for s0, s1, k_layout, k_group in split_for_layout(len(index), fmt):
            idx = index[s0:s1]
            midx = mx.array(idx)
            k = mx.take(keys, midx, axis=2)
            v = mx.take(values, midx, axis=2)
            if fmt.is_float:
                ek = encode(k, FLOAT_BITS, "float", 0, float_dtype)
                ev = encode(v, FLOAT_BITS, "float", 0, float_dtype)
            else:
                ek = encode(k, fmt.bits, k_layout, k_group, None)
                ev = encode(v, fmt.bits, "token", fmt.value_group, None)
            out.append(Segment(fmt.bits, idx, ek, ev))
    mx.eval([a for s in out for e in (s.keys, s.values) for a in e.arrays().values()])
    return out


def rotate(x: mx.array, rotation: str) -> mx.array:
    """(..., D) vectors in the rotated basis, float32 (``x @ R``)."""
    r = rotation_matrix(rotation, x.shape[-1])
    return x if r is None else x.astype(mx.float32) @ mx.array(r)


def unrotate(x: mx.array, rotation: str, dtype=None) -> mx.array:
    """Undo :func:`rotate` (``x @ R.T``, in float32), cast to ``dtype``."""
    r = rotation_matrix(rotation, x.shape[-1])
    if r is not None:
        x = x.astype(mx.float32) @ mx.array(r.T)
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
    """
    if rotation != "none":
        k, v = dequantize_layer(segments, n_tokens, mx.float32)
        k, v = unrotate(k, rotation, dtype), unrotate(v, rotation, dtype)
        pad = max(int(capacity) - n_tokens, 0)
        return _zero_pad(k, pad), _zero_pad(v, pad)
    ks = [decode(s.keys, s.bits, dtype) for s in segments]
    vs = [decode(s.values, s.bits, dtype) for s in segments]
    index = np.concatenate([np.asarray(s.index) for s in segments])
    if index.shape[0] != n_tokens:
        raise CacheShapeError(
            f"segments cover {index.shape[0]} tokens, expected {n_tokens}"
        )
    pad = max(int(capacity) - n_tokens, 0)
    in_order = len(segments) == 1 and np.array_equal(index, np.arange(n_tokens))
    if in_order:
        return _zero_pad(ks[0], pad), _zero_pad(vs[0], pad)
    order = np.argsort(index, kind="stable").astype(np.int32)
    if pad:
        # positions past T read one appended zero token
        B, H = ks[0].shape[:2]
        ks.append(mx.zeros((B, H, 1, ks[0].shape[3]), dtype))
        vs.append(mx.zeros((B, H, 1, vs[0].shape[3]), dtype))
        order = np.concatenate([order, np.full(pad, n_tokens, np.int32)])
    order = mx.array(order)
    k = mx.take(mx.concatenate(ks, axis=2), order, axis=2)
    v = mx.take(mx.concatenate(vs, axis=2), order, axis=2)
    return k, v


def _bucket_key(enc: Encoded, bits: int) -> tuple:
    if enc.layout == "float":
        return ("float", str(np.asarray(enc.data).dtype))
    return (enc.layout, bits, enc.group)


def _cat(encs: list[Encoded]) -> Encoded:
    """Same-format pieces as one Encoded (numpy), concatenated along tokens."""
    e = encs[0]
    axis = 3 if e.layout == "channel" else 2  # channel codes: words along tokens

    def cat(name):
        parts = [np.asarray(getattr(x, name)) for x in encs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis)

    return Encoded(e.layout, e.group, **{name: cat(name) for name in e.arrays()})


def _contiguous(index: np.ndarray) -> bool:
    n = index.shape[0]
    return n > 0 and (n == 1 or bool((np.diff(index) == 1).all()))


def _host_view(a: mx.array) -> np.ndarray:
    # An evaluated MLX array exposes its memory through the buffer protocol;
    # np.array(a, copy=False) is a view of it, and writes to the view are
    # writes to the array (MLX docs, "Conversion to NumPy").
    return np.array(a, copy=False)


def _write_bucket(
    key: tuple, items: list, dst: list[np.ndarray], scratch: np.ndarray
) -> None:
    """Decode one format's pieces (layer, Segment, Encoded) into their rows of dst.

    ``scratch``: a float32 buffer as large as the largest bucket, reused.
    """
    if key[0] == "float":  # converted by the copy into place
        src = _cat([e for *_, e in items]).data
        decoded = items
    else:
        bits = key[1]
        scattered = []
        for li, s, e in items:
            index = np.asarray(s.index)
            if _contiguous(index):  # straight into place
                rows = dst[li][:, :, index[0] : index[0] + len(index)]
                codec.dequantize_rows(e, bits, out=rows, scratch=scratch)
            else:
                scattered.append((li, s, e))
        if not scattered:
            return
        src = codec.dequantize_rows(
            _cat([e for *_, e in scattered]), bits, scratch=scratch
        )
        decoded = scattered
    t = 0
    for li, s, _ in decoded:
        index = np.asarray(s.index)
        n = index.shape[0]
        if _contiguous(index):
            dst[li][:, :, index[0] : index[0] + n] = src[:, :, t : t + n]
        else:
            dst[li][:, :, index] = src[:, :, t : t + n]
        t += n


def _check_cover(layer: list[Segment], n_tokens: int, li: int) -> None:
    index = np.concatenate([np.asarray(s.index, dtype=np.int64) for s in layer])
    ok = index.shape[0] == n_tokens and (
        n_tokens == 0
        or (
            index.min() >= 0
            and index.max() < n_tokens
            and np.bincount(index, minlength=n_tokens).max() == 1
        )
    )
    if not ok:
        raise CacheShapeError(
            f"layer {li}: segments do not cover tokens 0..{n_tokens - 1} exactly once"
        )


def _row_shape(enc: Encoded, bits: int) -> tuple[int, int, int]:
    """(B, H, D) of the tokens an Encoded holds."""
    if enc.layout == "float":
        B, H, _, D = np.shape(enc.data)
    elif enc.layout == "token":
        B, H, _, W = np.shape(enc.codes)
        D = W * 32 // bits
    else:
        B, H, D, _ = np.shape(enc.codes)
    return B, H, D


def dequantize_layers(
    layers: list[list[Segment]],
    n_tokens: int,
    dtype=mx.float32,
    *,
    capacity: int = 0,
    layers_per_pass: int = 2,
    rotation: str = "none",
) -> list[tuple[mx.array, mx.array]]:
    """:func:`dequantize_layer` for many layers, fast: each token written once.

    Each layer's keys and values get a preallocated row-major (B, H,
    capacity, D) buffer, zeros past T (room for an mlx-lm ``KVCache`` to
    append in place). Segments are decoded in numpy (codec.dequantize_rows:
    table-lookup unpack, then ``scale * code + bias`` in float32) straight
    into their rows when their tokens are consecutive; otherwise the pieces
    of ``layers_per_pass`` layers that share a format are decoded together
    and their rows copied into place. Row-major matters: attention over a
    token-major cache (what ``mx.take`` along the token axis returns) ran ~3x
    slower per decoding step. Results equal :func:`dequantize_layer`'s bit
    for bit. A ``rotation`` is undone in place (numpy, float32) before any
    cast to ``dtype``.

    Returns:
        Per layer, evaluated (B, H, max(T, capacity), D) keys and values.
    """
    T = n_tokens
    n_pos = max(int(capacity), T)
    for li, layer in enumerate(layers):
        _check_cover(layer, T, li)
    check_rotation(rotation)
    scratch = {"keys": np.empty(0, np.float32), "values": np.empty(0, np.float32)}

    def fill(chunk, kv, dst):  # numpy only, so keys and values run in parallel
        scratch[kv] = _fill_rows(chunk, kv, dst, T, rotation, scratch[kv])

    def alloc(chunk):
        bufs = _alloc_rows(chunk, n_pos)
        mx.async_eval(bufs)
        return bufs

    out: list[tuple[mx.array, mx.array]] = []
    step = max(layers_per_pass, 1)
    chunks = [layers[c0 : c0 + step] for c0 in range(0, len(layers), step)]
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        ahead = alloc(chunks[0]) if chunks else None
        for ci, chunk in enumerate(chunks):
            # 1. the final buffers, allocated and zeroed by MLX on its own
            # thread while numpy decodes the previous chunk (fresh pages)
            bufs = ahead
            mx.eval(bufs)
            ahead = alloc(chunks[ci + 1]) if ci + 1 < len(chunks) else None
            # 2. numpy writes every token's row into them, through views
            jobs = [
                pool.submit(fill, chunk, kv, [_host_view(a) for a in bufs[kv]])
                for kv in ("keys", "values")
            ]
            for job in jobs:
                job.result()
            # 3. other dtypes: from float32, as dequantize_layer does
            pair = [
                [a if dtype == mx.float32 else a.astype(dtype) for a in bufs[kv]]
                for kv in ("keys", "values")
            ]
            mx.eval(pair)
            out += list(zip(*pair))
    return out


def _fill_rows(
    chunk, kv: str, dst: list[np.ndarray], T: int, rotation, scratch: np.ndarray
) -> np.ndarray:
    """Decode the ``kv`` ("keys"/"values") rows of a chunk of layers into dst.

    numpy only (it releases the GIL: safe on a worker thread). Returns the
    float32 scratch buffer it used (``scratch``, or a larger one) for reuse.
    """
    buckets: dict[tuple, list] = {}
    for li, layer in enumerate(chunk):
        for s in layer:
            enc = getattr(s, kv)
            buckets.setdefault(_bucket_key(enc, s.bits), []).append((li, s, enc))
    need = dst[0][..., :T, :].size * len(chunk)
    if scratch.size < need:
        scratch = np.empty(need, np.float32)
    for key, items in buckets.items():
        _write_bucket(key, items, dst, scratch)
    for d in dst:
        _unrotate_rows(d, T, rotation)
    return scratch


def _alloc_rows(chunk, n_pos: int) -> dict[str, list[mx.array]]:
    """Unevaluated zero (B, H, n_pos, D) float32 buffers per layer of a chunk."""
    bufs = {}
    for kv in ("keys", "values"):
        B, H, D = _row_shape(getattr(chunk[0][0], kv), chunk[0][0].bits)
        bufs[kv] = [mx.zeros((B, H, n_pos, D), mx.float32) for _ in chunk]
    return bufs


def stream_layers(
    layers: list[list[Segment]],
    n_tokens: int,
    *,
    capacity: int = 0,
    rotation: str = "none",
) -> list[Future]:
    """:func:`dequantize_layers` on a background thread, layer by layer.

    The (B, H, max(T, capacity), D) float32 buffers of every layer are
    allocated and zeroed here (MLX, the calling thread); one worker thread
    then decodes the layers in order straight into them (numpy only, through
    host views of the evaluated buffers). The caller may run MLX work (the
    receiver's forward) meanwhile, as long as it reads layer ``i``'s buffers
    only after ``futures[i].result()``. Results equal :func:`dequantize_layer`'s
    bit for bit.

    Returns:
        Per layer, a Future of its evaluated (keys, values).
    """
    T = n_tokens
    n_pos = max(int(capacity), T)
    for li, layer in enumerate(layers):
        _check_cover(layer, T, li)
    check_rotation(rotation)
    bufs = [_alloc_rows([layer], n_pos) for layer in layers]
    mx.eval(bufs)
    views = [
        {kv: [_host_view(a) for a in b[kv]] for kv in ("keys", "values")} for b in bufs
    ]
    scratch = np.empty(0, np.float32)

    def decode(li):  # one worker: the scratch buffer is never shared
        nonlocal scratch
        for kv in ("keys", "values"):
            scratch = _fill_rows([layers[li]], kv, views[li][kv], T, rotation, scratch)
        return bufs[li]["keys"][0], bufs[li]["values"][0]

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkvshare-decode")
    futures = [pool.submit(decode, li) for li in range(len(layers))]
    pool.shutdown(wait=False)  # the thread exits once the queue is drained
    return futures


def _unrotate_rows(d: np.ndarray, T: int, rotation: str, chunk: int = 1024) -> None:
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


def dequantize_cache(qkv: QuantizedKV, dtype=mx.float32):
    """All layers of a :class:`QuantizedKV` as lists of (B, H, T, D) keys, values."""
    rot = qkv.config.rotation
    pairs = [
        dequantize_layer(layer, qkv.n_tokens, dtype, rotation=rot)
        for layer in qkv.layers
    ]
    return [k for k, _ in pairs], [v for _, v in pairs]


def error_table(
    keys: mx.array, values: mx.array, formats: list[Format], float_bits: int = 16
) -> np.ndarray:
    """(2, T, F) expected squared K/V error per token and format (MLX arrays).

    See :func:`qkvshare_mlx.controllers.error_table`.
    """
    return controllers.error_table(keys, values, formats, float_bits, xp=mx)


# ----------------------------------------------------------------------------
# The whole cache.


def quantize_cache(
    keys: list[mx.array],
    values: list[mx.array],
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: controllers.TokenStats | None = None,
    plan: controllers.HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
) -> QuantizedKV:
    """Quantize a KV cache under an average-bit budget.

    Args:
        keys, values: per layer, (B, H_kv, T, D) arrays.
        controller: a name in :data:`controllers.CONTROLLERS`.
        budget_bits: target effective bits per K/V element (scales included)
            for the newly quantized tokens.
        config: quantizer settings.
        stats: token statistics for saliency-based controllers.
        plan: the handoff plan (hops remaining, receivers) for ``topology``.
        inherited: a cache covering the first tokens; its segments are kept
            bit for bit and only tokens after it are quantized.

    Returns:
        A :class:`QuantizedKV` covering all T tokens.
    """
    config = config or QuantConfig()
    B, H, T, dk, dv = check_kv(keys, values)
    if config.rotation != "none":  # quantize in the rotated basis
        check_rotation(config.rotation, dk, dv)
        keys = [rotate(k, config.rotation) for k in keys]
        values = [rotate(v, config.rotation) for v in values]
    return controllers.quantize_with(
        keys,
        values,
        (B, H, T, dk, dv),
        error_table=error_table,
        quantize_layer=quantize_layer,
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
        plan=plan,
        inherited=inherited,
    )
