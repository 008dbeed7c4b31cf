"""Attention on a card's codes: mixed widths, layouts and group sizes.

A compressed receiver (:class:`~qkvshare_mlx.caches.MixedQuantizedKVCache`)
keeps the card's segments quantized, held as :func:`merge_formats` and
:func:`widen` arrange them. :func:`mixed_attention` attends to them without
decoding the card: per segment, the scores are one
``mx.quantized_matmul`` of the queries against the segment's key codes
(per-token keys with ``transpose=True``, per-channel keys, stored as
(D, n) rows grouped along the tokens, with ``transpose=False``), and per
block of values of one format the output is one ``mx.quantized_matmul`` of
the block's probabilities against its codes. The R query heads that share
a KV head are one (R * L, D) block of rows, so each code is read once for
them all. The segments' scores and those of the receiver's own float
tokens (the tail) share one softmax. A rotated card is attended in its
rotated basis: ``q . k = (q R) . (k R)``, and the card's part of the output
is rotated back once (``x @ R.T``).

How mlx-lm reaches it: mlx-lm's attention
(``mlx_lm.models.base.scaled_dot_product_attention``) hands any cache with a
``bits`` attribute to ``base.quantized_scaled_dot_product_attention``, with
the keys and values ``update_and_fetch`` returned. :func:`install` wraps
that one function (once, when the first compressed cache is made): when the
keys are the ones a compressed cache just returned, the cache attends on
its codes (on a CPU, for decoding steps: :data:`CPU_MAX_QUERIES`); anything
else (mlx-lm's own ``QuantizedKVCache`` tuples) goes to mlx-lm's function
unchanged. The keys and values a compressed cache returns
are lazily decoded arrays: never evaluated when its attention runs on the
codes, and the exact decoded K/V for any other caller (so a model whose
attention bypasses the hook is still correct, only slower).
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import numpy as np

from .formats import Encoded, Segment
from .quant import numpy_backend

# On a CPU, mx.quantized_matmul costs about the same per query row as
# decoding the rows it reads (a 3-bit 8000-token layer: 13 ms at 1 query,
# 595 ms at 48, against 64 and 177 ms decoded then attended), so a forward
# of more queries than this (a prefill) attends on the decoded K/V there;
# decoding steps run on the codes. Other devices always run on the codes.
CPU_MAX_QUERIES = 8

_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_installed = {"original": None}


def install() -> bool:
    """Route mlx-lm's quantized attention through compressed caches (once).

    Returns whether the hook is in place (False: this mlx-lm has no
    ``base.quantized_scaled_dot_product_attention``; compressed caches then
    attend on their decoded K/V).
    """
    from mlx_lm.models import base

    current = getattr(base, "quantized_scaled_dot_product_attention", None)
    if current is None:
        return False
    if getattr(current, "_qkvshare_hook", False):
        return True
    original = current

    def quantized_scaled_dot_product_attention(
        queries, q_keys, q_values, scale, mask, group_size=64, bits=8
    ):
        owner = _OWNERS.pop(id(q_keys), None) if isinstance(q_keys, mx.array) else None
        if owner is not None:
            out = owner.attend(queries, q_keys, scale, mask)
            if out is not None:
                return out
        if isinstance(q_keys, mx.array):  # decoded K/V: plain attention
            return mx.fast.scaled_dot_product_attention(
                queries, q_keys, q_values, scale=scale, mask=mask
            )
        return original(
            queries,
            q_keys,
            q_values,
            scale=scale,
            mask=mask,
            group_size=group_size,
            bits=bits,
        )

    quantized_scaled_dot_product_attention._qkvshare_hook = True
    base.quantized_scaled_dot_product_attention = quantized_scaled_dot_product_attention
    _installed["original"] = original
    return True


def on_codes(n_queries: int) -> bool:
    """Whether a forward of ``n_queries`` queries attends on the codes here."""
    return mx.default_device() != mx.cpu or n_queries <= CPU_MAX_QUERIES


def register(keys: mx.array, cache) -> None:
    """Mark ``keys`` (what ``cache.update_and_fetch`` returned, about to be
    passed to attention) as ``cache``'s. By id: the entry is overwritten by
    the next cache whose keys get that id, before attention looks it up."""
    _OWNERS[id(keys)] = cache


# ----------------------------------------------------------------------------
# How a compressed cache holds a layer's segments for attention on the codes

# mx.quantized_matmul's CPU kernels for widths that do not divide 32 run
# ~4x slower per code than for 4 and 8 bits (a 3- or 5-bit 8000-token layer:
# ~11 ms against ~2.5), so a compressed cache on a CPU holds such codes
# widened: the same integers, scales and biases, so the same values bit for
# bit, at a few percent more memory (they are a few percent of a card's
# tokens at 4.5 bits).
WIDER_ON_CPU = {3: 4, 5: 8, 6: 8}


def _widen_codes(codes, bits: int, to: int) -> np.ndarray:
    """uint32 words of ``bits``-bit codes (..., W) repacked at ``to`` bits."""
    q = numpy_backend.unpack_codes(np.asarray(codes), bits, np.uint8)
    return numpy_backend.pack_codes(q, to)


def widen(seg: Segment) -> Segment:
    """``seg`` with its 3-, 5- and 6-bit codes repacked at 4 or 8 bits."""
    kb, vb = WIDER_ON_CPU.get(seg.bits), WIDER_ON_CPU.get(seg.vbits)
    if kb is None and vb is None:
        return seg

    def repack(e: Encoded, bits: int, to: int | None) -> Encoded:
        if to is None:
            return e
        codes = _widen_codes(e.codes, bits, to)
        return Encoded(e.layout, e.group, codes, e.scales, e.biases, dim=e.dim)

    bits, vbits = kb or seg.bits, vb or seg.vbits
    return Segment(
        bits,
        seg.index,
        repack(seg.keys, seg.bits, kb),
        repack(seg.values, seg.vbits, vb),
        value_bits=None if vbits == bits else vbits,
    )


def _format_key(seg: Segment) -> tuple:
    k, v = seg.keys, seg.values
    return (seg.bits, seg.vbits, k.layout, k.group, k.dim, v.layout, v.group, v.dim)


def _concat_encoded(parts: list[Encoded]) -> Encoded:
    """One Encoded holding the tokens of ``parts`` (one format) in order."""
    e = parts[0]
    if len(parts) == 1:
        return e
    axis = -1 if e.layout == "channel" else 2  # channel rows: (D, n) per head
    arrays = {
        name: mx.concatenate([p.arrays()[name] for p in parts], axis=axis)
        for name in e.arrays()
    }
    return Encoded(e.layout, e.group, **arrays, dim=e.dim)


def _slice_tokens(e: Encoded, a: int, b: int) -> Encoded:
    """Tokens a..b of a token-layout or float Encoded (views, no copy)."""
    arrays = {name: x[:, :, a:b] for name, x in e.arrays().items()}
    return Encoded(e.layout, e.group, **arrays, dim=e.dim)


def _value_key(seg: Segment) -> tuple:
    v = seg.values
    return (seg.vbits, v.layout, v.group, v.dim)


def merge_formats(segments: list[Segment]) -> tuple[list[Segment], list[tuple]]:
    """A layer's segments regrouped for attention on the codes, codes unchanged.

    A card writes one segment per format and token run (a channel-layout
    run is a whole number of groups, its remainder another segment), about
    15 per layer at 4.5 bits, and attention on the codes costs a kernel per
    segment for the scores and one for the output. So:

    1. the segments of one format are concatenated along the tokens (every
       channel-layout segment holds whole groups of at least 32 tokens: its
       packed rows end on a word boundary and concatenate as they are);
    2. segments whose values share a format (the values are always per
       token, whatever the keys' layout) are placed side by side, their
       values concatenated into one block, and each segment's values become
       a view of its rows of the block (no second copy).

    Returns:
        The segments, and the value blocks ``(Encoded, value bits, number of
        segments)`` covering them in order (for
        :func:`~qkvshare_mlx.attention.mixed_attention`).
    """
    groups: dict[tuple, list[Segment]] = {}
    for s in segments:
        groups.setdefault(_format_key(s), []).append(s)
    merged = []
    for parts in groups.values():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        merged.append(
            Segment(
                parts[0].bits,
                np.concatenate([np.asarray(p.index, np.int32) for p in parts]),
                _concat_encoded([p.keys for p in parts]),
                _concat_encoded([p.values for p in parts]),
                value_bits=parts[0].value_bits,
            )
        )
    by_value: dict[tuple, list[Segment]] = {}
    for s in merged:
        by_value.setdefault(_value_key(s), []).append(s)
    out, blocks = [], []
    for parts in by_value.values():
        block = _concat_encoded([p.values for p in parts])
        blocks.append((block, parts[0].vbits, len(parts)))
        at = 0
        for p in parts:
            n = p.n_tokens
            values = p.values if len(parts) == 1 else _slice_tokens(block, at, at + n)
            out.append(
                Segment(p.bits, p.index, p.keys, values, value_bits=p.value_bits)
            )
            at += n
    return out, blocks


# ----------------------------------------------------------------------------
# Attention


def _pad_last(x: mx.array, width: int) -> mx.array:
    """(..., D) ``x`` with zeros up to ``width`` along the last axis."""
    D = x.shape[-1]
    if width == D:
        return x
    return mx.concatenate([x, mx.zeros((*x.shape[:-1], width - D), x.dtype)], axis=-1)


def _key_scores(q: mx.array, seg: Segment) -> mx.array:
    """(B, Hk, M, n) scores of grouped queries (B, Hk, M, D) against one
    segment's n keys (M = R * L: a head's R query heads' L rows, so each
    key code is read once for all of them)."""
    e = seg.keys
    if e.layout == "float":
        return q @ e.data.astype(q.dtype).swapaxes(-1, -2)
    codes, scales, biases = e.codes, e.scales, e.biases
    if e.layout == "channel":  # (D, n) rows grouped along the tokens
        return mx.quantized_matmul(
            q, codes, scales, biases, transpose=False, group_size=e.group, bits=seg.bits
        )
    width = codes.shape[-1] * 32 // seg.bits  # padded rows: zeros meet the pad
    return mx.quantized_matmul(
        _pad_last(q, width),
        codes,
        scales,
        biases,
        transpose=True,
        group_size=e.group,
        bits=seg.bits,
    )


def _value_output(p: mx.array, e: Encoded, bits: int, dim: int) -> mx.array:
    """(B, Hk, M, D_v) probabilities (B, Hk, M, n) times n encoded values."""
    if e.layout == "float":
        return p @ e.data.astype(p.dtype)
    codes, scales, biases = e.codes, e.scales, e.biases
    out = mx.quantized_matmul(
        p, codes, scales, biases, transpose=False, group_size=e.group, bits=bits
    )
    return out[..., :dim]


def mixed_attention(
    queries: mx.array,
    segments: list[Segment],
    tail_keys: mx.array | None,
    tail_values: mx.array | None,
    *,
    scale: float,
    mask=None,
    rotate=None,
    unrotate=None,
    value_blocks=None,
) -> mx.array:
    """Attention of (B, H_q, L, D) queries over a card's segments and a tail.

    Args:
        queries: (B, H_q, L, D_k) queries (RoPE applied), H_q a multiple of
            the card's H_kv.
        segments: the card's segments of this layer (MLX arrays), every one
            before every tail token.
        tail_keys, tail_values: (B, H_kv, n, D) the receiver's own tokens
            (``n`` of them, the last L being the queries' own), or None.
        scale: the score scale.
        mask: None, ``"causal"`` (the queries are the last L tail tokens), or
            a boolean/additive array over (card tokens in the order of the
            segments, then the tail) broadcastable to (B, H_q, L, T).
        rotate, unrotate: ``x -> x @ R`` and ``x -> x @ R.T`` for a rotated
            card, else None.
        value_blocks: ``(Encoded, value bits, k)`` per run of ``k``
            consecutive segments whose values are one block (see
            :func:`merge_formats`): one product per
            block instead of one per segment. None: each segment's own.

    Returns:
        (B, H_q, L, D_v) attention output in the queries' dtype.
    """
    B, Hq, L, Dk = queries.shape
    first = segments[0] if segments else None
    if first is not None:
        e = first.keys
        Hk = (e.data if e.layout == "float" else e.codes).shape[1]
    else:
        Hk = tail_keys.shape[1]
    R = Hq // Hk
    # (B, H_q, L, D) -> (B, H_kv, R * L, D): query head h = h_kv * R + r
    q = (queries * scale).reshape(B, Hk, R * L, Dk)
    qc = rotate(q) if rotate is not None else q
    parts = [_key_scores(qc, s) for s in segments]
    if tail_keys is not None:
        parts.append(q @ tail_keys.astype(q.dtype).swapaxes(-1, -2))
    sizes = [p.shape[-1] for p in parts]
    scores = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    mask = _folded_mask(mask, scores.shape[-1], Hk, R, L)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    p = mx.softmax(scores, axis=-1, precise=True)
    Dv = tail_values.shape[-1] if tail_values is not None else _value_dim(first)
    if value_blocks is None:
        value_blocks = [(s.values, s.vbits, 1) for s in segments]
    out = None
    at = seg = 0
    for block, bits, k in value_blocks:
        n = sum(sizes[seg : seg + k])
        o = _value_output(p[..., at : at + n], block, bits, Dv)
        out = o if out is None else out + o
        at, seg = at + n, seg + k
    if out is not None and unrotate is not None:
        out = unrotate(out)
    if tail_values is not None:
        o = p[..., at:] @ tail_values.astype(p.dtype)
        out = o if out is None else out + o
    return out.reshape(B, Hq, L, Dv).astype(queries.dtype)


def _folded_mask(mask, T: int, Hk: int, R: int, L: int):
    """The attention mask over (B, H_q, L, T) scores laid out as the folded
    (B, H_kv, R * L, T) ones (``"causal"``: among the tail's last L tokens)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        rows = mx.tile(mx.arange(T - L, T), (R,))[:, None]
        return rows >= mx.arange(T)[None]
    if mask.ndim == 4 and mask.shape[1] == Hk * R and R > 1:  # per query head
        return mask.reshape(mask.shape[0], Hk, R * L, mask.shape[-1])
    if mask.ndim == 4 and mask.shape[1] not in (1, Hk * R):
        raise ValueError(f"mask heads: expected 1 or {Hk * R}, got {mask.shape[1]}")
    # shared by the query heads: (..., L, T), repeated for each of the R
    mask = mx.broadcast_to(mask, (*mask.shape[:-2], L, mask.shape[-1]))
    return mask if R == 1 else mx.tile(mask, (1,) * (mask.ndim - 2) + (R, 1))


def _value_dim(seg: Segment) -> int:
    e = seg.values
    if e.layout == "float":
        return e.data.shape[-1]
    return e.dim if e.dim is not None else e.codes.shape[-1] * 32 // seg.vbits
