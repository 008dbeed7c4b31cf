"""The quantization pipeline, written once for every array library.

:func:`quantize` runs the same steps for any :class:`Backend`: validate the
per-layer (B, H_kv, T, D) keys and values, rotate them (optional), keep an
inherited cache's segments, measure each token's error under each format
(:mod:`.error_model`), let a controller allocate the formats under the
budget (:mod:`.controllers`, :mod:`.allocator`), and encode each (layer,
format) bucket. A backend implements only the array operations (gather
tokens, rotate, encode a bucket, evaluate), after transformers'
``BaseQuantizedLayer``, where backends implement only ``_quantize``.

The backends are :data:`~.mlx_backend.MLX` and :data:`~.numpy_backend.NUMPY`;
a card written by either reads in both runtimes.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..errors import CacheShapeError, ConfigError
from ..formats import (
    FLOAT_BITS,
    GROUP_SIZES,
    Encoded,
    Format,
    QuantConfig,
    QuantizedKV,
    Segment,
    split_for_layout,
    trim_segments,
    window_start,
)
from ..rotation import check_rotation
from .allocator import AllocationProblem, lossless_format
from .controllers import HandoffPlan, TokenStats, check_controller, run_controller
from .error_model import error_tables, no_errors, query_weights


class Backend(Protocol):
    """The array operations the pipeline needs from a library.

    Attributes:
        xp: the array namespace with numpy's spelling (``numpy``, ``mlx.core``).
    """

    xp: Any

    def asarray(self, x) -> Any:
        """``x`` as this library's array."""

    def host(self, x) -> np.ndarray | None:
        """``x`` as a numpy array read in place (no copy) where that is the
        fast way to scan it (this library's arrays in host memory, on a CPU),
        else None."""

    def lane(self, i: int) -> Any:
        """A context manager for layer ``i``'s array work: lazy libraries
        may spread layers over parallel streams; others do nothing."""

    def take(self, x, index: np.ndarray) -> Any:
        """Tokens ``index`` (sorted, non-empty) of (B, H, T, D) ``x`` along T."""

    def rotate(self, x, kind: str) -> Any:
        """(..., D) vectors times the rotation's (D, D) matrix ``R``
        (:mod:`qkvshare_mlx.rotation`), in float32."""

    def unrope(self, x, spec) -> Any:
        """(B, H, T, D) keys rotated back by their rows' RoPE angles
        (:func:`qkvshare_mlx.rope.rope_rows`, ``inverse``), in float32."""

    def encode(
        self, x, bits: int, layout: str, group: int, float_dtype: str
    ) -> Encoded:
        """(B, H, n, D) tokens in one layout (see formats.Encoded)."""

    def finish(self, layers: list[list[Segment]]) -> None:
        """Evaluate the encoded arrays (lazy libraries), or nothing."""


def check_kv(keys, values, *, xp=np, finite: bool = True) -> tuple[int, ...]:
    """Validate per-layer (B, H, T, D) K/V lists of namespace ``xp``.

    ``finite=False`` checks the shapes only (:func:`quantize` finds NaN and
    Inf in its error model's pass over the tokens it encodes).

    Returns:
        (B, H, T, D_k, D_v).

    Raises:
        CacheShapeError: lists of different lengths, a tensor that is not
            (B, H, T, D), layers of different shapes, or NaN/Inf values.
    """
    if len(keys) != len(values) or not keys:
        raise CacheShapeError(
            f"expected the same non-zero number of key and value layers, "
            f"got {len(keys)} and {len(values)}"
        )
    ref = None
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.ndim != 4 or v.ndim != 4:
            raise CacheShapeError(
                f"layer {i}: expected (B, H, T, D) arrays, got shapes "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.shape[:3] != v.shape[:3]:
            raise CacheShapeError(
                f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} "
                "differ in (B, H, T)"
            )
        dims = (*k.shape, v.shape[3])
        if ref is None:
            ref = dims
        elif dims != ref:
            raise CacheShapeError(f"layer {i}: shape {dims} differs from layer 0 {ref}")
    if finite:
        # one pass (and, on MLX, one evaluation) for every layer's finiteness
        ok = xp.stack(
            [xp.isfinite(x).all() for pair in zip(keys, values) for x in pair]
        )
        refuse_non_finite(np.asarray(ok).reshape(-1, 2).all(axis=1))
    return ref


def refuse_non_finite(finite: np.ndarray) -> None:
    """Raise CacheShapeError naming the first layer not ``finite`` ((L,) bool)."""
    bad = np.nonzero(~finite)[0]
    if bad.size:
        raise CacheShapeError(f"layer {int(bad[0])}: keys or values contain NaN or Inf")


def _key_weights(config: QuantConfig, stats, shape) -> np.ndarray | None:
    """(L, H, D_k) key-channel weights of ``config.key_error`` (None: "mse")."""
    if config.key_error == "mse":
        return None
    moments = None if stats is None else stats.query_moments
    if moments is None:
        raise ConfigError(
            "key_error='query' weighs key errors by the sender's probe queries, "
            "but the token statistics have no query_moments (capture.prefill "
            "with probe_queries > 0 records them)"
        )
    L, H, D = shape
    if np.shape(moments) != (L, H, D, D):
        raise ConfigError(
            f"query_moments: expected shape {(L, H, D, D)} (layers, KV heads, "
            f"head_dim, head_dim), got {np.shape(moments)}"
        )
    return query_weights(moments, config.rotation)


def _check_finite(backend: Backend, keys, values, start: int) -> None:
    """Refuse NaN or Inf among tokens ``start..T-1`` (read in place with numpy
    where the backend's arrays are host memory: faster there)."""
    parts = [x[:, :, start:] for x in keys + values]
    hosted = [backend.host(x) for x in parts]
    xp = np if all(h is not None for h in hosted) else backend.xp
    parts = hosted if xp is np else parts
    n = len(keys)
    check_kv(parts[:n], parts[n:], xp=xp)


def encode_bucket(
    backend: Backend, keys, values, index: np.ndarray, fmt: Format, float_dtype: str
) -> list[Segment]:
    """Encode the tokens ``index`` of (B, H, T, D) keys/values in ``fmt``.

    Per-channel keys store whole groups of ``key_group`` tokens per channel
    and the remaining tokens per token (:func:`formats.split_for_layout`).
    """
    out = []
    for s0, s1, k_layout, k_group in split_for_layout(len(index), fmt):
        idx = np.asarray(index[s0:s1], dtype=np.int32)
        k, v = backend.take(keys, idx), backend.take(values, idx)
        if fmt.is_float:
            ek = backend.encode(k, FLOAT_BITS, "float", 0, float_dtype)
            ev = backend.encode(v, FLOAT_BITS, "float", 0, float_dtype)
        else:
            ek = backend.encode(k, fmt.bits, k_layout, k_group, float_dtype)
            ev = backend.encode(v, fmt.vbits, "token", fmt.value_group, float_dtype)
        out.append(Segment(fmt.bits, idx, ek, ev, value_bits=fmt.value_bits))
    return out


def encode_layer(
    backend: Backend,
    keys,
    values,
    formats: list[Format],
    assignment: np.ndarray,
    *,
    config: QuantConfig,
    start: int = 0,
) -> list[Segment]:
    """Encode tokens ``start..T-1`` of one layer, token t in its assigned format.

    Args:
        backend: the array library.
        keys, values: (B, H, T, D) arrays.
        formats: the format menu.
        assignment: (T - start,) indices into ``formats``; -1 for a token
            the layer does not hold (before its window).
        config: quantizer settings (float dtype).
        start: first token to encode (earlier tokens are inherited).

    Returns:
        Segments covering the held tokens of ``start..T-1``, by format index,
        the per-channel part before the per-token tail.
    """
    out = []
    for f in np.unique(assignment[assignment >= 0]):
        index = (np.nonzero(assignment == f)[0] + start).astype(np.int32)
        fmt = formats[int(f)]
        out += encode_bucket(backend, keys, values, index, fmt, config.float_dtype)
    return out


def quantize(
    keys,
    values,
    *,
    backend: Backend,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
    windows: list[int | None] | None = None,
) -> QuantizedKV:
    """Quantize a KV cache under an average-bit budget.

    Args:
        keys, values: per layer, (B, H_kv, T, D_k) and (B, H_kv, T, D_v)
            arrays of the backend's library (or anything it converts).
        backend: the array library (``MLX`` or ``NUMPY``).
        controller: a name in :data:`.controllers.CONTROLLERS`.
        budget_bits: target effective bits per K/V element (scales included)
            for the newly quantized tokens.
        config: quantizer settings.
        stats: token statistics for saliency-based controllers.
        plan: the handoff plan (hops remaining, receivers) for ``topology``.
        inherited: a cache covering the first tokens; its segments are kept
            bit for bit and only tokens after it are quantized.
        windows: per layer, the sliding window of the model that made the
            cache (None for a full-attention layer; see
            :func:`qkvshare_mlx.fingerprint.layer_windows`): a sliding layer
            holds only its last ``window`` tokens (``held_from``), whole
            inherited segments that fall out of it are dropped, and the
            budget counts the held tokens.

    Returns:
        A :class:`QuantizedKV` (the backend's arrays) covering all T tokens
        (each layer from its ``held_from``).

    Raises:
        CacheShapeError: bad shapes, non-finite values, or an inherited cache
            that does not fit.
        ConfigError: unknown controller, budget out of range, missing stats.
    """
    # 1. validate
    config = config or QuantConfig()
    keys = [backend.asarray(k) for k in keys]
    values = [backend.asarray(v) for v in values]
    B, H, T, dk, dv = check_kv(keys, values, xp=backend.xp, finite=False)
    check_controller(controller)
    # 2. rotate: keys back before RoPE, then both into the rotated basis
    # (undone by every decoder, in the opposite order)
    if config.key_rope is not None:
        config.key_rope.check(len(keys), dk)
        if config.key_error == "query":
            raise ConfigError(
                "key_error 'query' weighs post-RoPE key channels; with key_rope "
                "use key_error 'mse'"
            )
        for i in range(len(keys)):
            with backend.lane(i):
                keys[i] = backend.unrope(keys[i], config.key_rope.spec(i))
    if config.rotation != "none":
        check_rotation(config.rotation, dk, dv)
        for i in range(len(keys)):
            with backend.lane(i):
                keys[i] = backend.rotate(keys[i], config.rotation)
                values[i] = backend.rotate(values[i], config.rotation)
    # 3. inherit: an earlier hop's segments are kept, only new tokens encoded
    start = 0
    if inherited is not None:
        if len(inherited.layers) != len(keys) or inherited.shape != (B, H, dk, dv):
            raise CacheShapeError(
                f"inherited cache has {len(inherited.layers)} layers of shape "
                f"{inherited.shape}, new cache {len(keys)} of {(B, H, dk, dv)}"
            )
        start = inherited.n_tokens
        if inherited.config.rotation != config.rotation:
            raise ConfigError(
                f"inherited cache has rotation {inherited.config.rotation!r}, "
                f"new tokens {config.rotation!r}: a card keeps one rotation"
            )
        if inherited.config.key_rope != config.key_rope:
            raise ConfigError(
                "inherited cache and new tokens differ in key_rope (pre-RoPE "
                "keys): a card keeps one"
            )
        if start > T:
            raise CacheShapeError(f"inherited cache covers {start} tokens but T={T}")
    formats = config.menu(dk, dv)
    if all(f.is_float for f in formats) and float(budget_bits) < config.float_bits:
        raise ConfigError(
            f"head dims ({dk}, {dv}): no group size of {list(GROUP_SIZES)} divides "
            f"them, so only lossless cards are possible (budget_bits="
            f"{config.float_bits}), but got budget_bits={budget_bits}"
        )
    # 3b. windows: a sliding layer keeps the tokens its window still sees
    if windows is not None and len(windows) != len(keys):
        raise ConfigError(
            f"windows: expected one per layer ({len(keys)}), got {len(windows)}"
        )
    old_layers = [
        list(inherited.layers[i]) if inherited else [] for i in range(len(keys))
    ]
    held = inherited.starts if inherited is not None else [0] * len(keys)
    for li, window in enumerate(windows or [None] * len(keys)):
        first = window_start(T, window)
        if first > 0:
            old_layers[li], held[li] = trim_segments(old_layers[li], first)
    new_layers: list[list[Segment]] = [[] for _ in keys]
    # 4. allocate: errors per (layer, token, format), then the controller
    info = {}
    if T > start:
        if lossless_format(formats, config.float_bits, budget_bits) is not None:
            # a lossless budget: every token is stored in float, no errors
            errors = no_errors(len(keys), T - start, len(formats))
        else:
            errors = error_tables(
                [(k[:, :, start:], v[:, :, start:]) for k, v in zip(keys, values)],
                formats,
                config.float_bits,
                xp=backend.xp,
                lane=backend.lane,
                key_weights=_key_weights(config, stats, (len(keys), H, dk)),
            )  # (L, 2, T', F), factored
        # the tokens to encode are finite: found by the error model's pass
        # over them where it scanned them, else in a pass of its own
        if errors.finite is not None:
            refuse_non_finite(errors.finite)
        else:
            _check_finite(backend, keys, values, start)
        mask = None
        if any(held):
            mask = np.arange(start, T)[None, :] >= np.array(held)[:, None]
        pinned = None
        if config.pin_sinks or config.pin_recent:
            pos = np.arange(start, T)
            pin = (pos < config.pin_sinks) | (pos >= T - config.pin_recent)
            pinned = np.repeat(pin[None, :], len(keys), axis=0)
            if mask is not None:
                pinned &= mask
        problem = AllocationProblem(
            errors=errors,
            formats=formats,
            head_dims=(dk, dv),
            float_bits=config.float_bits,
            start=start,
            n_tokens=T,
            held=mask,
            pinned=pinned,
        )
        assignment, info = run_controller(
            controller, problem, budget_bits, stats=stats, plan=plan, config=config
        )
        if mask is not None:
            assignment = np.where(mask, assignment, -1)
        # 5. one encode call per (layer, format) bucket
        for li, (k, v) in enumerate(zip(keys, values)):
            with backend.lane(li):
                new_layers[li] = encode_layer(
                    backend, k, v, formats, assignment[li], config=config, start=start
                )
        backend.finish(new_layers)
    layers = [old_layers[i] + new_layers[i] for i in range(len(keys))]
    qkv = QuantizedKV(
        layers,
        T,
        (B, H, dk, dv),
        config,
        controller,
        budget_bits,
        info,
        held_from=tuple(held),
    )
    if inherited is None and T > 0 and abs(qkv.effective_bits - budget_bits) > 0.05:
        info["budget_note"] = (
            f"effective bits {qkv.effective_bits:.3f} differ from budget {budget_bits}"
        )
    return qkv
