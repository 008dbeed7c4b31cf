"""The receiver's side of a handoff: a CacheCard becomes mlx-lm caches.

:func:`inject` returns a list with one cache per layer that
``mlx_lm.generate`` / ``stream_generate`` / ``generate_step`` accept as
``prompt_cache`` and ``model(x, cache=...)`` accepts as ``cache``:

- ``mode="dequantize"``: a plain ``mlx_lm.models.cache.KVCache`` per layer,
  keys and values decoded once into the model dtype. Fastest decoding; the
  cache takes full float memory.
- ``mode="stream"``: the same ``KVCache`` contents, decoded layer by layer on
  a background thread while the receiver's forward runs (each layer waits
  for its own rows on first use, then is a plain ``KVCache``). Same result
  as ``dequantize``, bit for bit; the decode overlaps the suffix prefill.
- ``mode="compressed"``: the card stays quantized in memory. A card whose
  every layer is one uniform token-layout segment (one width, equal K/V group
  sizes, a width mlx-lm supports) becomes mlx-lm's own ``QuantizedKVCache``
  (attention runs on the quantized codes). Any other card (mixed widths,
  per-channel keys, float tokens, a rotation) becomes a
  :class:`MixedQuantizedKVCache`, which keeps the card's codes (the same
  values bit for bit, regrouped by format) and attends on them
  (:mod:`qkvshare_mlx.attention`: one ``mx.quantized_matmul`` per format for
  the scores and one per value format for the output, never decoding the
  card).

:func:`align` matches a receiver's prompt against the card's tokens and trims
the injected cache to what can be reused.

The module knows mlx-lm's cache protocol and the card's segments; it knows
nothing about how the card was made.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
    trim_prompt_cache,
)

from . import fingerprint as fingerprints
from .align import POLICIES, plan_reuse  # noqa: F401  (POLICIES re-exported)
from .caches import MixedQuantizedKVCache, StreamedKVCache
from .card import CacheCard
from .dtypes import to_mx
from .errors import ConfigError
from .formats import FLOAT_BITS, QuantizedKV
from .models import model_dtype
from .quant.fastpath import dequantize_layers, stream_layers
from .quant.mlx_backend import dequantize_layer
from .rope import layer_spec

MODES = ("dequantize", "stream", "compressed")
LAYOUTS = ("receiver", "sender")
DECODERS = ("auto", "numpy", "mlx")
QUANTIZED_KV_BITS = (2, 3, 4, 5, 6, 8)  # widths mlx-lm's QuantizedKVCache runs


# ----------------------------------------------------------------------------
# Injection


def check_fits(
    card_cache: dict,
    card_model: dict | None,
    model,
    expect=None,
    *,
    allow_other_weights: bool = False,
) -> str:
    """Raise ModelMismatchError if a card cannot be used with ``model``.

    Compares the card's cache shape with the model's own modules (layers,
    KV heads, head_dim), and the card's fingerprint, by the one policy of
    :func:`qkvshare_mlx.fingerprint.mismatches`, with the model's (built
    from its args: no tokenizer needed) and with ``expect`` if given.
    Returns how the weights compared (:func:`~qkvshare_mlx.fingerprint.check`).
    """
    shape = fingerprints.module_shape(model)
    held = {
        "n_layers": card_cache["n_layers"],
        "n_kv_heads": card_cache["n_kv_heads"],
        "head_dim": card_cache["head_dim_k"],
    }
    bad = [
        f"{k}: card has {held[k]!r}, model has {v!r}"
        for k, v in shape.items()
        if held[k] != v
    ]
    if card_model is None:
        return fingerprints.check({}, {}, extra=bad)
    model_fp = {}
    if fingerprints.model_args_config(model):
        # the shape fields were compared with the modules above
        model_fp = {
            k: v for k, v in fingerprints.fingerprint(model).items() if k not in shape
        }
    if expect is not None:
        bad += fingerprints.mismatches(
            card_model, expect, allow_other_weights=allow_other_weights
        )
    return fingerprints.check(
        card_model, model_fp, extra=bad, allow_other_weights=allow_other_weights
    )


def _uniform_token_format(qkv: QuantizedKV) -> tuple[int, int] | None:
    """(bits, group) if every layer is one identical token-layout segment."""
    first = None
    for layer in qkv.layers:
        if len(layer) != 1:
            return None
        s = layer[0]
        if (
            s.bits == FLOAT_BITS
            or s.value_bits is not None  # keys and values of other widths
            or s.keys.layout != "token"
            or s.values.layout != "token"
            or s.keys.group != s.values.group
            or s.keys.dim is not None  # padded rows: mlx-lm reads them as they are
            or s.values.dim is not None
            or not np.array_equal(np.asarray(s.index), np.arange(qkv.n_tokens))
        ):
            return None
        fmt = (s.bits, s.keys.group)
        if first is not None and fmt != first:
            return None
        first = fmt
    return first if first and first[0] in QUANTIZED_KV_BITS else None


def _quantized_kv_cache(segments, n_tokens, bits, group, dtype) -> QuantizedKVCache:
    s = segments[0]
    c = QuantizedKVCache(group_size=group, bits=bits)
    # mlx-lm's quantized attention wants scales and biases in the model dtype.
    c.keys = tuple(
        mx.array(a).astype(dtype) if i else mx.array(a)
        for i, a in enumerate((s.keys.codes, s.keys.scales, s.keys.biases))
    )
    c.values = tuple(
        mx.array(a).astype(dtype) if i else mx.array(a)
        for i, a in enumerate((s.values.codes, s.values.scales, s.values.biases))
    )
    c.offset = n_tokens
    return c


def inject(
    card_or_qkv,
    model=None,
    *,
    mode: str = "dequantize",
    layout: str = "receiver",
    dtype=None,
    expect: dict | None = None,
    allow_other_weights: bool = False,
    decode: str = "auto",
    reuse: list | None = None,
) -> list:
    """Turn a card into an mlx-lm prompt cache.

    Args:
        card_or_qkv: a :class:`~qkvshare_mlx.card.CacheCard` or a
            :class:`~qkvshare_mlx.formats.QuantizedKV` (offset 0).
        model: the receiving mlx-lm model: the card is checked against it
            (ModelMismatchError) and caches take its dtype.
        mode: ``"dequantize"`` (``KVCache``), ``"stream"`` (the same, decoded
            on a background thread while the caller's forward runs:
            :class:`StreamedKVCache`) or ``"compressed"``
            (``QuantizedKVCache`` or :class:`MixedQuantizedKVCache`).
        layout: ``"receiver"``: each layer's cache as the model's
            ``make_prompt_cache`` expects it (a sliding-window layer gets a
            ``RotatingKVCache`` holding its window of the card's tokens);
            ``"sender"``: a ``KVCache`` holding every token in every layer
            (to extend and make a card from, see
            :func:`~qkvshare_mlx.capture.sender_cache`).
        dtype: dtype of the decoded keys/values (an ``mx.Dtype`` or its name);
            default: the model's, else the card's, else float32.
        expect: a full fingerprint (e.g. with the tokenizer hash, see
            :func:`~qkvshare_mlx.fingerprint.fingerprint`) to check too.
        decode: who decodes the card for ``"dequantize"`` and ``"stream"``:
            ``"numpy"`` (host threads straight into mlx-lm's buffers, the
            fast path on a CPU), ``"mlx"`` (MLX ops on the default device,
            rotation undone by ``mx.hadamard_transform``; lazy, so a
            ``"stream"`` receiver's forward pulls each layer in) or
            ``"auto"``: ``"mlx"`` where the default device is a GPU. Both
            give the same caches, bit for bit without a rotation. While
            numpy decodes, numpy's bundled BLAS runs on one thread for the
            whole process (see :mod:`qkvshare_mlx.quant.fastpath`).
        reuse: caches this receiver is done with (an earlier handoff's
            ``KVCache`` list): for ``"dequantize"`` and ``"stream"`` decoded
            by numpy, each layer whose float32 buffers fit is decoded into
            them in place, with no fresh pages to fault in and zero (an agent
            receiving card after card). The old caches must not be used
            afterwards.

    Returns:
        One cache per layer; its ``offset`` is the card's offset plus its
        token count, so RoPE continues where the sender stopped.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)} but got {mode!r}")
    if decode not in DECODERS:
        raise ConfigError(f"decode must be one of {list(DECODERS)} but got {decode!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {list(LAYOUTS)} but got {layout!r}")
    if isinstance(card_or_qkv, CacheCard):
        card = card_or_qkv
        qkv, offset, card_model, card_dtype = (
            card.to_quantized(),
            card.offset,
            card.model,
            card.cache.get("dtype"),
        )
        cache_meta = card.cache
    elif isinstance(card_or_qkv, QuantizedKV):
        qkv, offset, card_model, card_dtype = card_or_qkv, 0, None, None
        B, H, dk, dv = qkv.shape
        cache_meta = {"n_layers": len(qkv.layers), "n_kv_heads": H, "head_dim_k": dk}
    else:
        raise ConfigError(
            f"expected a CacheCard or QuantizedKV, got {type(card_or_qkv).__name__}"
        )
    if model is not None:
        check_fits(
            cache_meta,
            card_model,
            model,
            expect,
            allow_other_weights=allow_other_weights,
        )
    elif expect is not None and card_model is not None:
        card.check_model(expect, allow_other_weights=allow_other_weights)
    dtype = _resolve_dtype(dtype, model, card_dtype)
    T = qkv.n_tokens

    rotation = qkv.config.rotation
    windows = _windows(model if layout == "receiver" else None, len(qkv.layers))
    if (any(windows) or qkv.held_from) and mode != "dequantize":
        raise ConfigError(
            f"mode {mode!r}: a sliding-window model receives cards in mode "
            "'dequantize' only"
        )
    _check_held(qkv, windows, layout)
    key_rope = qkv.config.key_rope
    if key_rope is not None and mode == "compressed":
        # q . R_t k does not fold into the query: no attention on the codes
        raise ConfigError(
            "mode 'compressed': a card with pre-RoPE keys (quant.config.key_rope) "
            "is received in mode 'dequantize' or 'stream' (make cards for "
            "compressed receivers with --no-pre-rope)"
        )
    if mode == "compressed":
        uniform = _uniform_token_format(qkv)
        # mlx-lm's quantized attention reads the codes as they are
        if uniform is not None and offset == 0 and qkv.config.model_basis:
            return [
                _quantized_kv_cache(layer, T, *uniform, dtype) for layer in qkv.layers
            ]
        caches = [
            MixedQuantizedKVCache(layer, T, start=offset, rotation=rotation)
            for layer in qkv.layers
        ]
        if _has_sinks(model):  # mlx-lm's quantized attention takes no sinks
            for c in caches:
                c.native = False
        return caches

    if offset != 0:
        card.require_start(f"mode {mode!r} (an mlx-lm KVCache; use 'compressed')")
    # Room for the receiver's next tokens (KVCache's step), made in the same
    # pass that orders the tokens: the first update then writes in place
    # instead of copying the whole cache into a larger buffer.
    capacity = (T // KVCache.step + 1) * KVCache.step
    on_device = decode == "mlx" or (
        decode == "auto" and mx.default_device().type == mx.DeviceType.gpu
    )
    if on_device:
        decoded = [
            dequantize_layer(
                layer,
                T,
                dtype,
                capacity=capacity,
                rotation=rotation,
                start=start,
                rope=layer_spec(key_rope, li),
            )
            for li, (layer, start) in enumerate(zip(qkv.layers, qkv.starts))
        ]
        if mode == "dequantize":
            mx.eval(decoded)
        return [_layer_cache(k, v, T, w) for (k, v), w in zip(decoded, windows)]
    if mode == "stream":
        futures = stream_layers(
            qkv.layers,
            T,
            capacity=capacity,
            rotation=rotation,
            starts=qkv.starts,
            buffers=_buffers(reuse),
            key_rope=key_rope,
        )
        return [StreamedKVCache(f, T, dtype) for f in futures]
    decoded = dequantize_layers(
        qkv.layers,
        T,
        dtype,
        capacity=capacity,
        rotation=rotation,
        starts=qkv.starts,
        buffers=_buffers(reuse),
        key_rope=key_rope,
    )
    return [_layer_cache(k, v, T, w) for (k, v), w in zip(decoded, windows)]


def _has_sinks(model) -> bool:
    """Whether a model's attention has learned sinks (gpt-oss), which
    mlx-lm's quantized attention refuses."""
    layers = getattr(model, "layers", None) or getattr(
        getattr(model, "model", None), "layers", []
    )
    return any(
        getattr(getattr(layer, "self_attn", None), "sinks", None) is not None
        for layer in layers
    )


def _buffers(caches) -> list | None:
    """Per layer, the (keys, values) buffers of reusable caches (a plain
    ``KVCache``'s whole arrays), else None."""
    if not caches:
        return None
    out = []
    for c in caches:
        ok = type(c) in (KVCache, StreamedKVCache) and c.keys is not None
        out.append((c.keys, c.values) if ok else None)
    return out


def _layer_cache(k, v, T: int, window):
    """A ``KVCache`` of (B, H, >= T, D) rows, or the receiver's rotating cache."""
    if window is not None:
        return _rotating(k, v, T, *window)
    c = KVCache()
    c.keys, c.values, c.offset = k, v, T
    return c


def _rotating(k, v, T: int, max_size: int, keep: int) -> RotatingKVCache:
    """A receiver's sliding-window layer: what mlx-lm's own rotating cache
    attends to after ``T`` tokens (the first ``keep`` and the last ones, in
    order, at most ``max_size``), from (B, H, >= T, D) rows of every token."""
    c = RotatingKVCache(max_size=max_size, keep=keep)
    if T <= max_size:
        c.state = (k[..., :T, :], v[..., :T, :], T, keep, max_size, T)
        return c
    tail = max_size - keep
    keys = mx.concatenate([k[..., :keep, :], k[..., T - tail : T, :]], axis=2)
    values = mx.concatenate([v[..., :keep, :], v[..., T - tail : T, :]], axis=2)
    c.state = (keys, values, T, keep, max_size, max_size)
    return c


def _check_held(qkv: QuantizedKV, windows: list, layout: str) -> None:
    """A layer whose card rows start after 0 (a sliding layer's window) is
    injected only where the receiver never reads the rows it lacks: a
    rotating cache of at most that many tokens, or (``layout="sender"``) a
    ``KVCache`` whose model masks them (the card's fingerprint, which the
    receiver matched, says that layer slides)."""
    T = qkv.n_tokens
    for li, (start, window) in enumerate(zip(qkv.starts, windows)):
        if not start or layout == "sender":
            continue
        if window is None or window[1] or start > T - window[0]:
            held = "a KVCache" if window is None else f"RotatingKVCache{window}"
            raise ConfigError(
                f"layer {li}: the card holds positions {start}..{T - 1} only, "
                f"but the receiver's {held} reads earlier ones"
            )


def _windows(model, n_layers: int) -> list:
    """Per layer, ``(max_size, keep)`` of the receiver's rotating cache, or
    None for a plain ``KVCache`` layer (and without a model)."""
    if model is None:
        return [None] * n_layers
    expected = make_prompt_cache(model)
    return [
        (c.max_size, c.keep) if isinstance(c, RotatingKVCache) else None
        for c in expected
    ]


def _resolve_dtype(dtype, model, card_dtype):
    if dtype is None:
        if model is not None:
            return model_dtype(model)
        dtype = card_dtype or "float32"
    return to_mx(dtype)


# ----------------------------------------------------------------------------
# Prompt alignment


def align(
    card, prompt_tokens, *, policy: str = "prefix", cache: list | None = None
) -> tuple[int, list[int]]:
    """How much of a card a receiver's prompt can reuse, trimming the cache to it.

    :func:`qkvshare_mlx.align.plan_reuse` (the rule both runtimes share), then
    mlx-lm's ``trim_prompt_cache`` on ``cache``.

    Args:
        card: a :class:`~qkvshare_mlx.card.CacheCard` (or anything with
            ``tokens``).
        prompt_tokens: the receiver's full prompt ids.
        policy: ``"strict"`` or ``"prefix"`` (see ``plan_reuse``).
        cache: the injected cache; trimmed in place to the reused tokens.

    Returns:
        ``(n_reuse, remaining_tokens)``: card tokens reused and the prompt
        tokens still to prefill (never empty).
    """
    n_reuse, rest = plan_reuse(card.tokens, prompt_tokens, policy=policy)
    if cache is not None:
        c = cache[0]
        held = c.size() if isinstance(c, MixedQuantizedKVCache) else c.offset
        drop = held - n_reuse
        if drop > 0 and trim_prompt_cache(cache, drop) != drop:
            raise ConfigError(
                f"cache: could not trim {drop} tokens (cache type "
                f"{type(cache[0]).__name__})"
            )
    return n_reuse, rest
