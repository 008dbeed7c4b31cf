"""The quantizer in plain numpy, for runtimes without MLX (torch, transformers).

Same semantics as :func:`qkvshare_mlx.quantizer.quantize_cache`: the same
format menu, the same error model, the same controllers (through
:func:`controllers.run_controller`) and the same segment layout, with the
encoding done by the reference codec (:mod:`qkvshare_mlx.codec`). A card
written here reads in the MLX runtime and vice versa.

The codes can differ from ``mx.quantize`` by one step where the two round a
group's scale differently; both decode within half a step of the input. This
module imports numpy and nothing that imports MLX.
"""

from __future__ import annotations

import numpy as np

from . import codec, controllers
from .errors import CacheShapeError
from .formats import Format, QuantConfig, QuantizedKV, Segment
from .rotation import check_rotation, rotation_matrix

_NP_FLOAT = {"float16": np.float16, "float32": np.float32}


def check_kv_np(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[int, ...]:
    """Validate per-layer K/V lists; return (B, H, T, D_k, D_v).

    Raises:
        CacheShapeError: lists of different lengths, a tensor that is not
            (B, H, T, D), layers of different shapes, or NaN/Inf values.
    """
    return controllers.check_kv(keys, values, xp=np)


def error_table_np(
    keys: np.ndarray, values: np.ndarray, formats: list[Format], float_bits: int = 16
) -> np.ndarray:
    """(2, T, F) expected squared K/V error per token and format (numpy arrays).

    See :func:`qkvshare_mlx.controllers.error_table`.
    """
    return controllers.error_table(
        np.asarray(keys), np.asarray(values), formats, float_bits, xp=np
    )


# ----------------------------------------------------------------------------
# The whole cache.


def quantize_layer_np(
    keys: np.ndarray,
    values: np.ndarray,
    formats: list[Format],
    assignment: np.ndarray,
    *,
    config: QuantConfig,
    start: int = 0,
) -> list[Segment]:
    """Quantize tokens ``start..T-1`` of one layer, token t in its assigned format.

    Segments come out in the order of ``quantizer.quantize_layer``: by format
    index, then the per-channel part before the per-token tail.

    Args:
        keys, values: (B, H, T, D) arrays.
        formats: the format menu.
        assignment: (T - start,) indices into ``formats``.
        config: quantizer settings (float dtype).
        start: first token to quantize (earlier tokens are inherited).
    """
    float_dtype = _NP_FLOAT[config.float_dtype]
    out = []
    for f in np.unique(assignment):
        index = (np.nonzero(assignment == f)[0] + start).astype(np.int32)
        out += codec.encode_bucket(keys, values, index, formats[int(f)], float_dtype)
    return out


def quantize_cache_np(
    keys: list[np.ndarray],
    values: list[np.ndarray],
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: controllers.TokenStats | None = None,
    plan: controllers.HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
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

    Returns:
        A :class:`QuantizedKV` (numpy arrays) covering all T tokens.

    Raises:
        CacheShapeError: bad shapes, non-finite values, or an inherited cache
            that does not fit.
        ConfigError: unknown controller, budget out of range, missing stats.
    """
    config = config or QuantConfig()
    keys = [np.asarray(k) for k in keys]
    values = [np.asarray(v) for v in values]
    B, H, T, dk, dv = check_kv_np(keys, values)
    if config.rotation != "none":  # quantize in the rotated basis
        check_rotation(config.rotation, dk, dv)
        keys = [
            k.astype(np.float32) @ rotation_matrix(config.rotation, dk) for k in keys
        ]
        values = [
            v.astype(np.float32) @ rotation_matrix(config.rotation, dv) for v in values
        ]
    return controllers.quantize_with(
        keys,
        values,
        (B, H, T, dk, dv),
        error_table=error_table_np,
        quantize_layer=quantize_layer_np,
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
        plan=plan,
        inherited=inherited,
    )


def dequantize_cache_np(qkv: QuantizedKV) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All layers of a :class:`QuantizedKV` as lists of (B, H, T, D) float32 arrays.

    Raises:
        CacheShapeError: a layer's segments do not cover ``n_tokens`` tokens.
    """
    keys, values = [], []
    for li, layer in enumerate(qkv.layers):
        try:
            k, v = codec.decode_layer(layer, qkv.n_tokens)
        except ValueError as e:
            raise CacheShapeError(f"layer {li}: {e}") from None
        rk = rotation_matrix(qkv.config.rotation, k.shape[-1])
        rv = rotation_matrix(qkv.config.rotation, v.shape[-1])
        keys.append(k if rk is None else k @ rk.T)
        values.append(v if rv is None else v @ rv.T)
    return keys, values
