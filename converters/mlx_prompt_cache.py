"""Bridge between CacheCards and mlx-lm prompt-cache files.

mlx-lm saves a prefilled cache with ``mlx_lm.models.cache.save_prompt_cache``
(``mlx_lm.cache_prompt`` does this from the command line): a safetensors file
holding each layer's ``state`` plus the class names, and string metadata
(``cache_prompt`` writes ``model`` and ``tokenizer_config``). This module
writes such files from cards, so ``mlx_lm.generate --prompt-cache-file`` can
use a received card, and reads them into cards.

Written layers are ``KVCache`` (dequantized, in the card's cache dtype) or,
for a card that is exactly what mlx-lm's own ``QuantizedKVCache`` stores (one
token-layout segment per layer, one width, one group size), that
``QuantizedKVCache`` with the card's codes unchanged. The card's token ids
and fingerprint go into the metadata, so the file can come back as a card.

Only MLX and mlx-lm are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, save_prompt_cache

from qkvshare_mlx.caches import load_prompt_cache
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import CacheShapeError, ConfigError
from qkvshare_mlx.formats import CODE_BITS, QuantConfig
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache

TOKENS_KEY = "qkvshare_tokens"  # no dots: mlx-lm nests keys on "."
MODEL_KEY = "qkvshare_model"
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def quantized_layout(card: CacheCard) -> tuple[int, int] | None:
    """(bits, group_size) when the card is storable as mlx-lm QuantizedKVCache.

    That is: every layer one segment covering tokens 0..T-1 in order, keys and
    values both in ``token`` layout with one group size, one width for all,
    and the codes in the model's own basis (no rotation, no pre-RoPE keys:
    mlx-lm's quantized attention reads them as they are).
    """
    if not card.qkv.config.model_basis:
        return None
    found = set()
    for layer in card.layers:
        if len(layer) != 1:
            return None
        seg = layer[0]
        k, v = seg.keys, seg.values
        if seg.bits not in CODE_BITS or seg.value_bits is not None:
            return None
        if k.layout != "token" or v.layout != "token":
            return None
        if k.group != v.group or not np.array_equal(
            seg.index, np.arange(card.n_tokens)
        ):
            return None
        found.add((seg.bits, k.group))
    return found.pop() if len(found) == 1 else None


def card_to_prompt_cache_file(
    card: CacheCard,
    path,
    *,
    quantized: bool | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a card as an mlx-lm prompt-cache file.

    Args:
        card: the card.
        path: the ``.safetensors`` file to write.
        quantized: True to require ``QuantizedKVCache`` layers, False to write
            dequantized ``KVCache`` layers, None for quantized when possible.
        metadata: extra string metadata (e.g. ``{"model": "path/to/model"}``).

    Returns:
        The path written.

    Raises:
        ConfigError: ``quantized=True`` for a card mlx-lm cannot store
            quantized, or a card whose RoPE offset is not 0 (mlx-lm caches
            start at position 0).
    """
    card.require_start("an mlx-lm prompt cache")
    dtype = _DTYPES.get(card.cache.get("dtype"), mx.float32)
    layout = quantized_layout(card)
    if quantized and layout is None:
        raise ConfigError(
            "quantized=True needs one token-layout segment per layer with one width "
            f"and group size; card has widths {sorted(card.width_histogram())} in "
            f"{sum(len(layer) for layer in card.layers)} segments"
        )
    T = card.n_tokens
    layers = []
    if layout is not None and quantized is not False:
        bits, group = layout
        for layer in card.layers:
            k, v = layer[0].keys, layer[0].values
            cache = QuantizedKVCache(group_size=group, bits=bits)
            # mlx-lm keeps scales in the model dtype; float16 -> float32 is exact.
            cache.state = (
                tuple(
                    mx.array(a).astype(dtype) if a.dtype != np.uint32 else mx.array(a)
                    for a in (k.codes, k.scales, k.biases)
                ),
                tuple(
                    mx.array(a).astype(dtype) if a.dtype != np.uint32 else mx.array(a)
                    for a in (v.codes, v.scales, v.biases)
                ),
                T,
                group,
                bits,
            )
            layers.append(cache)
    else:
        keys, values = dequantize_cache(card.to_quantized(), dtype)
        for k, v in zip(keys, values):
            cache = KVCache()
            cache.state = (k, v, T)
            layers.append(cache)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[TOKENS_KEY] = json.dumps([int(t) for t in card.tokens])
    meta[MODEL_KEY] = json.dumps(card.model, sort_keys=True)
    path = Path(path)
    save_prompt_cache(str(path), layers, meta)
    return path


def _layer_kv(cache, i: int) -> tuple[mx.array, mx.array]:
    if isinstance(cache, KVCache):
        if cache.keys is None:
            raise CacheShapeError(f"layer {i}: KVCache is empty")
        n = cache.offset
        return cache.keys[..., :n, :], cache.values[..., :n, :]
    if isinstance(cache, QuantizedKVCache):
        if cache.keys is None:
            raise CacheShapeError(f"layer {i}: QuantizedKVCache is empty")
        n = cache.offset
        out = []
        for parts in (cache.keys, cache.values):
            codes, scales, biases = (a[..., :n, :] for a in parts)
            out.append(
                mx.dequantize(
                    codes,
                    scales.astype(mx.float32),
                    biases.astype(mx.float32),
                    group_size=cache.group_size,
                    bits=cache.bits,
                )
            )
        return out[0], out[1]
    raise CacheShapeError(
        f"layer {i}: cache type {type(cache).__name__} is not supported "
        "(expected KVCache or QuantizedKVCache)"
    )


def prompt_cache_file_to_card(
    path,
    *,
    tokens=None,
    controller: str = "uniform",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    model_fingerprint: dict | None = None,
    stats=None,
    user: dict | None = None,
) -> CacheCard:
    """Read an mlx-lm prompt-cache file and quantize it into a card.

    Args:
        path: a file written by ``save_prompt_cache`` (or this module); read
            with :func:`qkvshare_mlx.load_prompt_cache`, so layers saved from
            ``inject(..., mode="stream")`` caches load as ``KVCache``.
        tokens: the token ids the cache covers; default: the ids stored by
            :func:`card_to_prompt_cache_file` in the metadata.
        controller, budget_bits, config, stats: passed to ``quantize_cache``.
            ``config=QuantConfig(widths=(16,), float_dtype="float32")`` with
            ``budget_bits=32`` keeps a float32 cache exactly.
        model_fingerprint: the model fingerprint; default: the one in the
            metadata, else ``{}``.
        user: free-form card metadata.

    Raises:
        ConfigError: the token ids are unknown or do not match the cache length.
        CacheShapeError: a layer type other than KVCache/QuantizedKVCache.
    """
    cache, meta = load_prompt_cache(str(path), return_metadata=True)
    pairs = [_layer_kv(c, i) for i, c in enumerate(cache)]
    if tokens is None:
        if TOKENS_KEY not in meta:
            raise ConfigError(
                f"tokens: {path} has no {TOKENS_KEY!r} metadata; pass tokens="
            )
        tokens = json.loads(meta[TOKENS_KEY])
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    T = pairs[0][0].shape[2] if pairs else 0
    if tokens.shape[0] != T:
        raise ConfigError(
            f"tokens: expected {T} ids (cache length), got {tokens.shape[0]}"
        )
    if model_fingerprint is None:
        model_fingerprint = json.loads(meta.get(MODEL_KEY, "{}"))
    dtype = pairs[0][0].dtype if pairs else mx.float32
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), "float32")
    qkv = quantize_cache(
        [k for k, _ in pairs],
        [v for _, v in pairs],
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
    )
    return CacheCard.from_quantized(
        qkv, tokens, model_fingerprint, dtype=dtype_name, user=user
    )
