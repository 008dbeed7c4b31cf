"""Row groups: the group sizes a head size may use, and the padding of
rows no group size divides (a head size of 80 is grouped in 32s over a row
padded to 96). Re-exported by :mod:`qkvshare_mlx.formats`."""

from __future__ import annotations

import numpy as np

GROUP_SIZES = (32, 64, 128)
PAD_GROUP = 32  # per-token group of head sizes no group size divides


def padded_dim(dim: int, group: int) -> int:
    """The stored width of a per-token row of ``dim`` elements in groups of
    ``group``: ``dim`` rounded up to a multiple of ``group`` (``dim`` itself
    when the group divides it)."""
    return -(-dim // group) * group


def pad_rows(x, group: int, xp=np):
    """(..., D) rows padded to ``padded_dim(D, group)`` by repeating each
    row's last element (so no group's range grows); ``x`` itself when the
    group divides D. ``xp``: the array namespace (numpy or mlx.core)."""
    D = x.shape[-1]
    pad = padded_dim(D, group) - D
    if not pad:
        return x
    tail = xp.broadcast_to(x[..., -1:], (*x.shape[:-1], pad))
    return xp.concatenate([x, tail], axis=-1)


def padded(layout: str, dim: int, group: int) -> bool:
    """Whether rows of ``dim`` elements in ``layout`` with ``group`` are
    stored padded (:func:`padded_dim`): per-token rows the group does not
    divide."""
    return layout == "token" and dim % group != 0


def fixed_group(dim: int, group: int) -> list[int]:
    """[group] if it divides ``dim``; the padded group if none does; else []."""
    if dim % group == 0:
        return [group]
    if any(dim % g == 0 for g in GROUP_SIZES):
        return []
    return [PAD_GROUP]


def token_groups(dim: int) -> list[int]:
    """Per-token group sizes a head size may use: those that divide it, else
    ``PAD_GROUP`` over the row padded to a multiple of it (80 -> 96)."""
    return [g for g in GROUP_SIZES if dim % g == 0] or [PAD_GROUP]
