"""The sender's side of a handoff: prefill a prompt and measure its tokens.

:func:`prefill` runs an mlx-lm model over a prompt with ordinary mlx-lm caches
and returns everything a card needs: per-layer keys and values (B, H, T, D),
the last-position logits, and :class:`~qkvshare_mlx.quant.controllers.TokenStats`
for the saliency controllers:

- ``key_norms`` (L, T): the L2 norm of each token's key, summed over heads;
- ``attention`` (L, T): the attention mass each cached token receives from
  the sender's last ``probe_queries`` query positions (post-RoPE, causal,
  scaled like the model does, summed over query heads and probe positions).

Queries are captured without touching model code: while the last chunk (the
probe positions) runs, each attention module's ``q_proj`` (or the query
columns of a fused ``qkv_proj``, as in Phi-3) is wrapped in a small recording
module (the way mlx-lm wraps linears for LoRA) and restored afterwards. The
recorded projections go through the module's own ``q_norm`` (if any, as in
Qwen3) and ``rope`` at the chunk's offset, so the probe sees exactly the
queries the model used. Attention modules with neither projection, or
without ``rope``, get key norms only (``attention`` is None), and the
``saliency`` controller falls back to them with a notice.

The probe costs ``P * T * D`` per query head and layer (P = probe queries),
against ``T^2 * D`` for the prefill's own attention plus its matmuls, so it
is a small fraction of the prefill at any context length.

The module knows nothing about quantization or cards.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import (
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from .align import token_ids
from .errors import CacheShapeError, ConfigError, UnsupportedCacheError
from .fingerprint import window_limit
from .quant.controllers import TokenStats

_ATTN_FIELDS = ("rope", "n_heads", "n_kv_heads", "scale")
# the projection whose output holds the queries: a plain q_proj, or the query
# columns of a fused qkv_proj (Phi-3: queries first, then keys, values)
_QUERY_PROJECTIONS = ("q_proj", "qkv_proj")


@dataclass
class Prefill:
    """What the sender's prefill produced.

    Attributes:
        cache: the mlx-lm prompt cache (one cache per layer), ready to extend.
        keys, values: per layer, (B, H_kv, T, D) arrays covering the whole
            cache (tokens cached before this call included).
        logits: (B, V) logits at the last prompt position.
        stats: token statistics over the T cached tokens.
        tokens: (n,) int32 ids fed by this call.
        probe_queries: probe positions used (0 when attention was not probed).
    """

    cache: list
    keys: list[mx.array]
    values: list[mx.array]
    logits: mx.array
    stats: TokenStats
    tokens: np.ndarray
    probe_queries: int = 0


class _RecordQueries(nn.Module):
    """Wraps a query projection and keeps the last ``keep`` rows of its
    output's first ``width`` columns (all of a ``q_proj``'s; the queries of
    a fused ``qkv_proj``)."""

    def __init__(self, inner: nn.Module, keep: int, width: int | None = None):
        super().__init__()
        self.inner = inner
        self.keep = keep
        self.width = width
        self.recorded = None

    def __call__(self, x):
        y = self.inner(x)
        self.recorded = y[:, -self.keep :, : self.width]
        return y


def _query_projection(attn) -> tuple[str, int | None] | None:
    """(attribute name, query columns) of a module's query projection."""
    if hasattr(attn, "q_proj"):
        return "q_proj", None
    if hasattr(attn, "qkv_proj") and hasattr(attn, "head_dim"):
        return "qkv_proj", attn.n_heads * attn.head_dim
    return None


def _query_projection_name(attn) -> str:
    """The attribute a wrapper replaced (its ``inner`` is the projection)."""
    for name in _QUERY_PROJECTIONS:
        if isinstance(getattr(attn, name, None), _RecordQueries):
            return name
    raise AssertionError("no wrapped query projection")  # never: we wrapped it


def _attention_modules(model) -> list | None:
    """Each layer's attention module, or None if some layer cannot be probed."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, f) for f in _ATTN_FIELDS):
            return None
        if _query_projection(attn) is None:
            return None
        out.append(attn)
    return out


def _cache_kv(c) -> tuple[mx.array, mx.array]:
    """(B, H, T, D) keys and values held by one layer's cache."""
    if hasattr(c, "dequantized"):  # caches.MixedQuantizedKVCache
        return c.dequantized()
    if isinstance(c, KVCache) and c.keys is not None:  # or a StreamedKVCache
        return c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    if isinstance(c, QuantizedKVCache) and c.keys is not None:
        # a sender running mlx-lm's --kv-bits: its tokens as it attends to them
        k, v = (
            mx.dequantize(*t, group_size=c.group_size, bits=c.bits)
            for t in (c.keys, c.values)
        )
        return k[..., : c.offset, :], v[..., : c.offset, :]
    # within its window (check_cache_layers) a rotating cache holds every
    # token in order
    if isinstance(c, RotatingKVCache) and c.keys is not None:
        if c.offset <= c.keys.shape[2]:
            return c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    raise CacheShapeError(
        f"prefill reads keys from mlx-lm KVCache layers, got {type(c).__name__}"
    )


def sender_cache(model) -> list:
    """The sender's prompt cache: the model's own (``make_prompt_cache``),
    a sliding-window layer's ``RotatingKVCache`` replaced by a ``KVCache``.

    The model's windowed attention mask still applies (mlx-lm builds it from
    the window size), so the forward pass is the same; the cache just keeps
    every token, which a card holds (a receiver's rotating cache keeps the
    window of them, :func:`qkvshare_mlx.inject.inject`).
    """
    return [
        KVCache() if isinstance(c, RotatingKVCache) else c
        for c in make_prompt_cache(model)
    ]


def check_cache_layers(cache: list, n_new: int = 0) -> None:
    """Raise UnsupportedCacheError, naming the layer and its cache type,
    unless every layer keeps plain keys and values a card can carry.

    Called before any prefill of ``n_new`` tokens: ``KVCache`` and mlx-lm's
    ``QuantizedKVCache`` (a sender running ``--kv-bits``; its tokens are
    read dequantized) are carried; a layer that is not keys and values
    (``ArraysCache``, Mamba, a hybrid's ``CacheList``) is refused at once,
    and so is a
    caller's sliding-window layer (``RotatingKVCache``) that would drop
    tokens (past :func:`~qkvshare_mlx.fingerprint.window_limit`): cards hold
    every token in every layer (:func:`sender_cache` keeps them all).
    """
    for i, c in enumerate(cache):
        if isinstance(c, (KVCache, QuantizedKVCache)) or hasattr(c, "dequantized"):
            continue
        kind = type(c).__name__
        if isinstance(c, CacheList):
            inner = ", ".join(type(x).__name__ for x in c.caches)
            raise UnsupportedCacheError(
                f"layer {i}: the model's cache is CacheList({inner}), several "
                "caches in one layer (a hybrid with recurrent state); cards "
                "carry KV cache layers only"
            )
        if isinstance(c, RotatingKVCache):
            total, limit = c.offset + n_new, window_limit(c.max_size)
            if total <= limit:
                continue
            raise UnsupportedCacheError(
                f"layer {i}: a sliding window of {c.max_size} tokens "
                f"({kind}) would drop tokens: {total} > {limit} (prefill with a "
                "sender cache, capture.sender_cache, which keeps every token)"
            )
        raise UnsupportedCacheError(
            f"layer {i}: the model's cache is {kind}, not keys and values "
            "(recurrent or other state); cards carry KV cache layers only"
        )


def _tokens_array(tokens) -> np.ndarray:
    return token_ids(tokens, "tokens").astype(np.int32)


def probe_attention(
    queries: mx.array, keys: mx.array, q_pos: int, *, scale: float
) -> mx.array:
    """Attention mass each key receives from some queries, summed over them.

    Args:
        queries: (B, H_q, P, D) post-RoPE queries at positions
            ``q_pos .. q_pos+P-1`` of the cache.
        keys: (B, H_kv, T, D) keys; H_q is a multiple of H_kv (GQA).
        q_pos: cache index of the first query.
        scale: the model's attention scale.

    Returns:
        (T,) float32 mass per key, summed over batch, heads and queries.
    """
    B, Hq, P, D = queries.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    q = queries.astype(mx.float32).reshape(B, Hkv, Hq // Hkv * P, D)
    scores = (q * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
    rows = (q_pos + mx.arange(P))[:, None] >= mx.arange(T)[None]  # causal
    rows = mx.tile(rows, (Hq // Hkv, 1))
    scores = mx.where(rows, scores, -mx.inf)
    return mx.softmax(scores, axis=-1, precise=True).sum(axis=(0, 1, 2))


def query_moments(queries: mx.array, n_kv_heads: int) -> mx.array:
    """(H_kv, D, D) mean of ``q q^T`` over the (B, H_q, P, D) queries of each
    KV head's query heads (GQA: H_q is a multiple of H_kv)."""
    B, Hq, P, D = queries.shape
    q = queries.astype(mx.float32).reshape(B, n_kv_heads, Hq // n_kv_heads * P, D)
    q = q.swapaxes(0, 1).reshape(n_kv_heads, -1, D)
    return (q.swapaxes(-1, -2) @ q) / q.shape[1]


def _probe_stats(attns, records, keys, q_pos: int, offset: int):
    """(L, T) attention mass and (L, H_kv, D, D) query moments."""
    mass, moments = [], []
    for attn, rec, k in zip(attns, records, keys):
        B, P, _ = rec.shape
        q = rec.reshape(B, P, attn.n_heads, -1)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = attn.rope(q.transpose(0, 2, 1, 3), offset=offset)
        mass.append(probe_attention(q, k, q_pos, scale=attn.scale))
        moments.append(query_moments(q, k.shape[1]))
    return mx.stack(mass), mx.stack(moments)


def prefill(
    model,
    tokens,
    *,
    cache: list | None = None,
    probe_queries: int = 32,
    chunk_size: int = 512,
    progress=None,
) -> Prefill:
    """Run the prompt through the model and capture its cache and statistics.

    Args:
        model: an mlx-lm model.
        tokens: prompt token ids (sequence of int).
        cache: an mlx-lm prompt cache to extend (e.g. an injected card);
            a fresh one by default.
        probe_queries: how many last positions probe the attention (0: key
            norms only).
        chunk_size: tokens per forward pass before the probe chunk.
        progress: called as ``progress(processed, total)`` after each chunk
            (mlx-lm's ``prompt_progress_callback`` convention).

    Returns:
        A :class:`Prefill`.
    """
    ids = _tokens_array(tokens)
    if chunk_size < 1 or probe_queries < 0:
        raise ConfigError(
            f"chunk_size must be >= 1 and probe_queries >= 0, got {chunk_size} "
            f"and {probe_queries}"
        )
    cache = sender_cache(model) if cache is None else cache
    check_cache_layers(cache, len(ids))
    attns = _attention_modules(model) if probe_queries else None
    n = len(ids)
    P = min(probe_queries, n) if attns is not None else 0
    last = max(P, 1)

    # 1. everything before the probe chunk, in chunks
    body = mx.array(ids[: n - last])
    for i in range(0, n - last, chunk_size):
        model(body[None, i : i + chunk_size], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(i + chunk_size, n - last), n)

    # 2. the probe chunk, with q_proj recorded
    offset = cache[0].offset if cache else 0
    wrappers = []
    try:
        if P:
            for attn in attns:
                name, width = _query_projection(attn)
                wrappers.append(_RecordQueries(getattr(attn, name), P, width))
                setattr(attn, name, wrappers[-1])
        logits = model(mx.array(ids[n - last :])[None], cache=cache)[:, -1, :]
        mx.eval(logits, [c.state for c in cache])
        if progress is not None:
            progress(n, n)
    finally:
        for attn, w in zip(attns or [], wrappers):
            setattr(attn, _query_projection_name(attn), w.inner)

    # 3. keys, values and statistics over the whole cache
    kv = [_cache_kv(c) for c in cache]
    keys, values = [k for k, _ in kv], [v for _, v in kv]
    norms = mx.stack(
        [mx.linalg.norm(k.astype(mx.float32), axis=-1).sum(axis=(0, 1)) for k in keys]
    )
    T = keys[0].shape[2]
    attention = moments = None
    if P:
        q_pos = T - P  # cache index of the first probe query
        attention, moments = _probe_stats(
            attns, [w.recorded for w in wrappers], keys, q_pos, offset
        )
    mx.eval(norms, attention, moments)
    stats = TokenStats(
        attention=None if attention is None else np.array(attention, dtype=np.float64),
        key_norms=np.array(norms, dtype=np.float64),
        query_moments=None if moments is None else np.array(moments, np.float64),
    )
    return Prefill(cache, keys, values, logits, stats, ids, P)
