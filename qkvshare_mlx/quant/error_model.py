"""The error model: expected squared error of each token under each format.

Written once for any array namespace with numpy's spelling (``numpy`` or
``mlx.core``), so both backends measure the same thing; the result is
always a float64 numpy table for the allocator.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..formats import Format, pad_rows, padded_dim


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


def _token_group_sq_ranges(x, groups, xp=np) -> dict:
    """Per group size: sum over (B, H, groups) of n * range^2 for per-token
    groups -> (T,), ``n`` the group's real elements (a padded row's last
    group has fewer). One max/min pass at the smallest group; wider groups
    are merged from it (every size here is a multiple of the smallest)."""
    B, H, T, D = x.shape
    g0 = min(groups)
    n0 = padded_dim(D, g0) // g0
    g = pad_rows(x, g0, xp).reshape(B, H, T, n0, g0)
    hi0, lo0 = g.max(axis=-1), g.min(axis=-1)  # (B, H, T, n0)
    out = {}
    for group in groups:
        hi, lo = (hi0, lo0) if group == g0 else _merge(hi0, lo0, group // g0, 3, xp)
        r = hi - lo
        sq = (r * r).sum(axis=(0, 1))  # (T, groups)
        n_groups = padded_dim(D, group) // group
        if D % group == 0:
            out[group] = group * sq.sum(axis=-1)
        else:
            last = D - (n_groups - 1) * group
            out[group] = group * sq[:, :-1].sum(axis=-1) + last * sq[:, -1]
    return out


def _channel_sq_ranges(x, groups, xp) -> dict:
    """Per group size: sum over channels of range^2 in windows of ``group``
    tokens, per token (the last window padded by repeating the last token).
    One max/min pass in windows of the smallest group, merged for the rest."""
    B, H, T, D = x.shape
    g0 = min(groups)
    pad = (-T) % g0
    if pad:
        x = xp.concatenate([x, xp.repeat(x[:, :, -1:], pad, axis=2)], axis=2)
    w = x.reshape(B, H, (T + pad) // g0, g0, D)
    hi0, lo0 = w.max(axis=3), w.min(axis=3)  # (B, H, W0, D)
    out = {}
    for group in groups:
        hi, lo = (hi0, lo0) if group == g0 else _merge(hi0, lo0, group // g0, 2, xp)
        r = hi - lo
        per_window = (r * r).sum(axis=(0, 1, 3))  # (W,)
        out[group] = xp.repeat(per_window, group)[:T]
    return out


def _sq_norms(x, xp):
    """(T,) sum over (B, H, D) of x^2."""
    if xp is np:
        return np.einsum("bhtd,bhtd->t", x, x, dtype=np.float64)
    return (x * x).sum(axis=(0, 1, 3))


def _statistics(keys, values, formats: list[Format], float_bits: int, xp) -> dict:
    """The (T,) statistics a layer's error table needs, unevaluated on a lazy
    ``xp``: per group kind and size the summed squared ranges, and the
    squared norms where float16 rows have an error to count."""
    xk, xv = keys.astype(xp.float32), values.astype(xp.float32)
    quantized = [f for f in formats if not f.is_float]
    kc = sorted({f.key_group for f in quantized if f.key_layout == "channel"})
    kt = sorted({f.key_group for f in quantized if f.key_layout != "channel"})
    vt = sorted({f.value_group for f in quantized})
    out = {}
    for tag, groups, fn, x in (
        ("kc", kc, _channel_sq_ranges, xk),
        ("kt", kt, _token_group_sq_ranges, xk),
        ("vt", vt, _token_group_sq_ranges, xv),
    ):
        if groups:
            out.update({(tag, g): r for g, r in fn(x, groups, xp).items()})
    if float_bits == 16 and any(f.is_float for f in formats):
        out["k2"], out["v2"] = _sq_norms(xk, xp), _sq_norms(xv, xp)
    return out


def _table(stats: dict, T: int, formats: list[Format], float_bits: int) -> np.ndarray:
    """(2, T, F) errors from a layer's statistics: each format's column is
    one statistic times a constant, so the table is one (T, S) x (S, F)
    product per half (K, V)."""
    fl_eps = 2.0 ** (-2 * 11) / 3 if float_bits == 16 else 0.0
    names = sorted(stats, key=str)
    if not names:  # float formats only, stored exactly
        return np.zeros((2, T, len(formats)))
    col = {n: i for i, n in enumerate(names)}
    S = np.stack([np.asarray(stats[n], dtype=np.float64) for n in names], axis=1)
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
    return np.stack([S @ coef[0], S @ coef[1]])


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
    return error_tables([(keys, values)], formats, float_bits, xp=xp)[0]


def error_tables(
    layers, formats: list[Format], float_bits: int = 16, *, xp=np, lane=None
) -> list[np.ndarray]:
    """:func:`error_table` of every ``(keys, values)`` layer, evaluated at
    once on a lazy ``xp``; ``lane(i)`` (``Backend.lane``) is the context
    layer ``i``'s work is built in (parallel streams on a CPU)."""
    stats = []
    for i, (k, v) in enumerate(layers):
        ctx = lane(i) if lane is not None else contextlib.nullcontext()
        with ctx:
            stats.append(_statistics(k, v, formats, float_bits, xp))
    if xp is not np:  # one evaluation for every statistic of every layer
        xp.eval([list(st.values()) for st in stats])
    return [
        _table(st, k.shape[2], formats, float_bits) for st, (k, _) in zip(stats, layers)
    ]
