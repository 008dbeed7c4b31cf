"""The error model: expected squared error of each token under each format.

Written once for any array namespace with numpy's spelling (``numpy`` or
``mlx.core``), so both backends measure the same thing; the result is
always a float64 numpy table for the allocator.
"""

from __future__ import annotations

import numpy as np

from ..formats import Format, pad_rows, padded_dim


def _token_group_sq_range(x, group: int, xp=np):
    """Sum over (B, H, groups) of n * range^2 for per-token groups -> (T,),
    ``n`` the group's real elements (a padded row's last group has fewer)."""
    B, H, T, D = x.shape
    n_groups = padded_dim(D, group) // group
    g = pad_rows(x, group, xp).reshape(B, H, T, n_groups, group)
    r = g.max(axis=-1) - g.min(axis=-1)
    sq = (r * r).sum(axis=(0, 1))  # (T, groups)
    if D % group == 0:
        return group * sq.sum(axis=-1)
    last = D - (n_groups - 1) * group
    return group * sq[:, :-1].sum(axis=-1) + last * sq[:, -1]


def _channel_sq_range(x, group: int, xp):
    """Sum over channels of range^2 in windows of ``group`` tokens, per token."""
    B, H, T, D = x.shape
    pad = (-T) % group
    if pad:
        x = xp.concatenate([x, xp.repeat(x[:, :, -1:], pad, axis=2)], axis=2)
    w = x.reshape(B, H, (T + pad) // group, group, D)
    r = w.max(axis=3) - w.min(axis=3)  # (B, H, W, D)
    per_window = (r * r).sum(axis=(0, 1, 3))  # (W,)
    return xp.repeat(per_window, group)[:T]


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
    xk, xv = keys.astype(xp.float32), values.astype(xp.float32)
    ranges = {}
    for f in formats:
        if f.is_float:
            continue
        kk = ("kc" if f.key_layout == "channel" else "kt", f.key_group)
        if kk not in ranges:
            if kk[0] == "kc":
                ranges[kk] = _channel_sq_range(xk, f.key_group, xp)
            else:
                ranges[kk] = _token_group_sq_range(xk, f.key_group, xp)
        if ("vt", f.value_group) not in ranges:
            ranges[("vt", f.value_group)] = _token_group_sq_range(xv, f.value_group, xp)
    ranges = {k: np.asarray(v, dtype=np.float64) for k, v in ranges.items()}
    T = keys.shape[2]
    out = np.zeros((2, T, len(formats)), dtype=np.float64)
    fl_eps = 2.0 ** (-2 * 11) / 3 if float_bits == 16 else 0.0
    k2 = np.asarray((xk * xk).sum(axis=(0, 1, 3)), dtype=np.float64)
    v2 = np.asarray((xv * xv).sum(axis=(0, 1, 3)), dtype=np.float64)
    for i, f in enumerate(formats):
        if f.is_float:
            out[0, :, i] = k2 * fl_eps
            out[1, :, i] = v2 * fl_eps
            continue
        kk = ("kc" if f.key_layout == "channel" else "kt", f.key_group)
        out[0, :, i] = ranges[kk] / (12.0 * ((1 << f.bits) - 1) ** 2)
        out[1, :, i] = ranges[("vt", f.value_group)] / (
            12.0 * ((1 << f.vbits) - 1) ** 2
        )
    return out
