"""The error model: expected squared error of each token under each format.

Written once for any array namespace with numpy's spelling (``numpy`` or
``mlx.core``), so both backends measure the same thing; the result is
always float64 numpy for the allocator: an :class:`ErrorTable`, the
(L, 2, T, F) table in factored form.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np

from ..formats import Format, pad_rows, padded_dim
from ..rotation import rotation_matrix


def _merge(mx_, mn_, m: int, axis: int, xp):
    """Max/min of groups ``m`` times wider from (..., n, ...) group maxima
    and minima along ``axis``: blocks of ``m`` consecutive groups, the last
    block completed with copies of the last group (what padding by repeating
    the last element gives)."""
    n = mx_.shape[axis]
    pad = (-n) % m
    if pad:
        last = [slice(None)] * mx_.ndim
        last[axis] = slice(n - 1, n)
        reps = [1] * mx_.ndim
        reps[axis] = pad
        mx_ = xp.concatenate([mx_, xp.tile(mx_[tuple(last)], reps)], axis=axis)
        mn_ = xp.concatenate([mn_, xp.tile(mn_[tuple(last)], reps)], axis=axis)
    shape = list(mx_.shape)
    shape[axis : axis + 1] = [(n + pad) // m, m]
    return mx_.reshape(shape).max(axis=axis + 1), mn_.reshape(shape).min(axis=axis + 1)


def _all_finite(hi, lo, xp):
    # NaN propagates through max and min, +Inf is a maximum and -Inf a
    # minimum: the group extrema are finite exactly when every element is
    # (unlike their ranges or sums, which overflow for large finite values).
    return xp.logical_and(xp.isfinite(hi).all(), xp.isfinite(lo).all())


def _token_group_sq_ranges(x, groups, xp=np, weights=None) -> tuple[dict, object]:
    """Per group size: sum over (B, H, groups) of n * range^2 for per-token
    groups -> (T,), ``n`` the group's real elements (a padded row's last
    group has fewer; with (H, D) channel ``weights``, the sum of its real
    channels' weights), and whether ``x`` is finite. One max/min pass at the
    smallest group; wider groups are merged from it (every size here is a
    multiple of the smallest)."""
    B, H, T, D = x.shape
    g0 = min(groups)
    n0 = padded_dim(D, g0) // g0
    g = pad_rows(x, g0, xp).reshape(B, H, T, n0, g0)
    hi0, lo0 = g.max(axis=-1), g.min(axis=-1)  # (B, H, T, n0)
    out = {}
    for group in groups:
        hi, lo = (hi0, lo0) if group == g0 else _merge(hi0, lo0, group // g0, 3, xp)
        r = hi - lo
        n_groups = padded_dim(D, group) // group
        if weights is not None:
            wpad = np.zeros((H, n_groups * group), np.float32)
            wpad[:, :D] = weights
            wg = xp.array(wpad.reshape(H, n_groups, group).sum(axis=-1))
            out[group] = (r * r * wg[None, :, None, :]).sum(axis=(0, 1, 3))
            continue
        sq = (r * r).sum(axis=(0, 1))  # (T, groups)
        if D % group == 0:
            out[group] = group * sq.sum(axis=-1)
        else:
            last = D - (n_groups - 1) * group
            out[group] = group * sq[:, :-1].sum(axis=-1) + last * sq[:, -1]
    return out, _all_finite(hi0, lo0, xp)


def _channel_sq_ranges(x, groups, xp, weights=None) -> tuple[dict, object]:
    """Per group size: sum over channels (times their (H, D) ``weights``, if
    given) of range^2 in windows of ``group`` tokens, per token (the last
    window padded by repeating the last token), and whether ``x`` is
    finite. One max/min pass in windows of the smallest group, merged for
    the rest."""
    B, H, T, D = x.shape
    g0 = min(groups)
    pad = (-T) % g0
    if pad:
        x = xp.concatenate([x, xp.repeat(x[:, :, -1:], pad, axis=2)], axis=2)
    w = x.reshape(B, H, (T + pad) // g0, g0, D)
    hi0, lo0 = w.max(axis=3), w.min(axis=3)  # (B, H, W0, D)
    if weights is not None:  # (1, H, 1, D), made once for every group size
        weights = xp.array(weights.astype(np.float32))[None, :, None, :]
    out = {}
    for group in groups:
        hi, lo = (hi0, lo0) if group == g0 else _merge(hi0, lo0, group // g0, 2, xp)
        r = hi - lo
        sq = r * r if weights is None else r * r * weights
        per_window = sq.sum(axis=(0, 1, 3))  # (W,)
        out[group] = xp.repeat(per_window, group)[:T]
    return out, _all_finite(hi0, lo0, xp)


def _sq_norms(x, xp, weights=None):
    """(T,) sum over (B, H, D) of x^2 (times (H, D) ``weights``, if given)."""
    if xp is np:
        if weights is None:
            return np.einsum("bhtd,bhtd->t", x, x, dtype=np.float64)
        return np.einsum("bhtd,bhtd,hd->t", x, x, weights, dtype=np.float64)
    sq = xp.square(x)
    if weights is not None:
        sq = sq * xp.array(weights.astype(np.float32))[None, :, None, :]
    # the contiguous axis first: MLX's CPU reduction over (0, 1, 3) at once
    # runs about 2x slower
    return sq.sum(axis=-1).sum(axis=(0, 1))


def _statistics(keys, values, formats: list[Format], float_bits: int, xp, kw=None):
    """The (T,) statistics a layer's error table needs, unevaluated on a lazy
    ``xp``: per group kind and size the summed squared ranges, and the
    squared norms where float16 rows have an error to count (key channels
    weighted by ``kw``, (H, D), if given); and whether keys and values are
    finite (None: not scanned, a float-only menu)."""
    xk, xv = keys.astype(xp.float32), values.astype(xp.float32)
    quantized = [f for f in formats if not f.is_float]
    kc = sorted({f.key_group for f in quantized if f.key_layout == "channel"})
    kt = sorted({f.key_group for f in quantized if f.key_layout != "channel"})
    vt = sorted({f.value_group for f in quantized})
    out, finite = {}, {}
    for tag, groups, fn, x, w in (
        ("kc", kc, _channel_sq_ranges, xk, kw),
        ("kt", kt, _token_group_sq_ranges, xk, kw),
        ("vt", vt, _token_group_sq_ranges, xv, None),
    ):
        if groups:
            ranges, finite[tag[0]] = fn(x, groups, xp, w)
            out.update({(tag, g): r for g, r in ranges.items()})
    if float_bits == 16 and any(f.is_float for f in formats):
        out["k2"], out["v2"] = _sq_norms(xk, xp, kw), _sq_norms(xv, xp)
    both = None  # every quantized format scans both keys and values
    if "k" in finite and "v" in finite:
        both = xp.logical_and(finite["k"], finite["v"])
    return out, both


def query_weights(moments: np.ndarray, rotation: str = "none") -> np.ndarray:
    """Per-channel weights of key errors from the sender's probe queries.

    A key error ``e`` moves the logit of a query ``q`` by ``q . e``; for
    independent channel errors its mean square over the queries is
    ``sum_d E[q_d^2] e_d^2``. So each channel's weight is the queries' mean
    energy in it, in the basis the keys are quantized in (``R^T M R`` for a
    rotation ``R``: rotated keys ``k R`` meet rotated queries ``q R``),
    normalised to mean 1 per layer (keys and values keep their balance).

    Args:
        moments: (L, H_kv, D, D) ``TokenStats.query_moments``.
        rotation: the card's ``QuantConfig.rotation``.

    Returns:
        (L, H_kv, D) float32 weights (all 1 for a layer whose queries are 0).
    """
    m = np.asarray(moments, dtype=np.float64)
    if rotation != "none":
        r = rotation_matrix(rotation, m.shape[-1]).astype(np.float64)
        m = r.T @ m @ r
    w = np.maximum(np.diagonal(m, axis1=-2, axis2=-1), 0.0)
    mean = w.mean(axis=(1, 2), keepdims=True)
    ok = mean > 0
    return np.where(ok, w / np.where(ok, mean, 1.0), 1.0).astype(np.float32)


@dataclass(frozen=True)
class ErrorTable:
    """(L, 2, T, F) expected squared errors of K and V, in factored form.

    Each format's error is one token statistic times a constant (per half),
    so the table is ``stats`` (L, T, S) times ``coef`` (2, S, F). The whole
    table is built only on request (:meth:`dense`): at 8000 tokens, 30
    layers and 37 formats it is 140 MB of float64, while the allocator
    needs only its importance-weighted sum over K and V (:meth:`weighted`).

    Attributes:
        stats: (L, T, S) float64 statistics per layer and token.
        coef: (2, S, F) float64 coefficient of each statistic in each
            format's key (0) and value (1) error.
        finite: (L,) bool, whether each layer's keys and values are all
            finite (found in the same pass as the statistics); None where
            they were not scanned (a float-only menu).
    """

    stats: np.ndarray
    coef: np.ndarray
    finite: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        L, T, _ = self.stats.shape
        return (L, 2, T, self.coef.shape[2])

    def dense(self) -> np.ndarray:
        """The (L, 2, T, F) table."""
        return np.einsum("lts,ksf->lktf", self.stats, self.coef)

    def weighted(self, importance: np.ndarray, dtype=np.float64) -> np.ndarray:
        """(L, T, F) sum over K and V of ``importance`` (L, 2, T) times the
        errors, in ``dtype``: one (L*T, 2S) x (2S, F) product."""
        L, T, S = self.stats.shape
        scaled = np.empty((L, T, 2, S), dtype=dtype)
        np.multiply(
            self.stats[:, :, None, :],
            importance.transpose(0, 2, 1)[..., None],
            out=scaled,
            casting="same_kind",
        )
        coef = self.coef.reshape(2 * S, -1).astype(dtype)
        return (scaled.reshape(L * T, 2 * S) @ coef).reshape(L, T, -1)

    def totals(self) -> np.ndarray:
        """(F,) each format's error summed over layers, tokens, K and V."""
        return self.stats.sum(axis=(0, 1)) @ self.coef.sum(axis=0)


def _factors(stats: list[dict], T: int, formats: list[Format], float_bits: int):
    """(L, T, S) statistics and (2, S, F) coefficients from every layer's
    statistics (the same names in every layer)."""
    fl_eps = 2.0 ** (-2 * 11) / 3 if float_bits == 16 else 0.0
    names = sorted(stats[0], key=str) if stats else []
    col = {n: i for i, n in enumerate(names)}
    S = np.empty((len(stats), T, len(names)))
    for li, st in enumerate(stats):
        for n in names:
            S[li, :, col[n]] = np.asarray(st[n], dtype=np.float64)
    coef = np.zeros((2, len(names), len(formats)))
    for i, f in enumerate(formats):
        if f.is_float:
            if fl_eps:
                coef[0, col["k2"], i] = coef[1, col["v2"], i] = fl_eps
            continue
        kk = ("kc" if f.key_layout == "channel" else "kt", f.key_group)
        coef[0, col[kk], i] = 1.0 / (12.0 * ((1 << f.bits) - 1) ** 2)
        coef[1, col[("vt", f.value_group)], i] = 1.0 / (
            12.0 * ((1 << f.vbits) - 1) ** 2
        )
    return ErrorTable(S, coef)


def no_errors(L: int, T: int, n_formats: int) -> ErrorTable:
    """An all-zero (L, 2, T, F) table (float formats only, or a lossless
    budget: nothing to measure)."""
    return ErrorTable(np.zeros((L, T, 0)), np.zeros((2, 0, n_formats)))


def error_table(keys, values, formats: list[Format], float_bits: int = 16, *, xp=np):
    """Expected squared reconstruction error per token and format.

    Uses the uniform-rounding model ``(range / (2^b - 1))^2 / 12`` per element
    with the group ranges measured on this cache.

    Args:
        keys, values: (B, H, T, D) arrays of one layer (of namespace ``xp``).
        formats: the format menu.
        float_bits: storage bits of float tokens (16 or 32).
        xp: the array namespace (``numpy`` or ``mlx.core``).

    Returns:
        (2, T, F) float64 numpy array: key errors and value errors.
    """
    return error_tables([(keys, values)], formats, float_bits, xp=xp).dense()[0]


def error_tables(
    layers,
    formats: list[Format],
    float_bits: int = 16,
    *,
    xp=np,
    lane=None,
    key_weights=None,
) -> ErrorTable:
    """The :class:`ErrorTable` of every ``(keys, values)`` layer (all of
    the same T), evaluated at once on a lazy ``xp``; ``lane(i)``
    (``Backend.lane``) is the context layer ``i``'s work is built in
    (parallel streams on a CPU). ``key_weights``: (L, H, D_k) weights of
    each key channel's squared error (:func:`query_weights`), or None (all
    1: the key vector's squared error)."""
    stats, finite = [], []
    for i, (k, v) in enumerate(layers):
        ctx = lane(i) if lane is not None else contextlib.nullcontext()
        kw = None if key_weights is None else np.asarray(key_weights[i])
        with ctx:
            st, ok = _statistics(k, v, formats, float_bits, xp, kw)
        stats.append(st)
        finite.append(ok)
    if xp is not np:  # one evaluation for every statistic of every layer
        xp.eval(
            [list(st.values()) for st in stats], [f for f in finite if f is not None]
        )
    T = layers[0][0].shape[2] if layers else 0
    if not stats or not stats[0]:  # float formats only, stored exactly
        return no_errors(len(layers), T, len(formats))
    table = _factors(stats, T, formats, float_bits)
    if all(f is not None for f in finite):
        table = dataclasses.replace(table, finite=np.array([bool(f) for f in finite]))
    return table
