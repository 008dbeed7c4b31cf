"""Orthogonal rotations of the head dimension, applied before quantization.

A few channels of keys (and some of values) carry most of the magnitude;
with per-group scales those outliers waste the code range of the whole
group. Multiplying each token's (D,) vector by an orthogonal matrix R
spreads every outlier over all channels, so the groups quantize with less
error (QuaRot, arXiv:2404.00456, rotates the KV cache the same way). The
receiver undoes it after decoding, ``x = x_rot @ R.T``, so attention sees
the original basis: nothing in the model changes.

R is a randomized Hadamard matrix, ``R = diag(s) @ H_D / sqrt(D)`` (Sylvester
construction, D a power of two). The signs come from the concatenated digests
SHA-256("qkvshare-mlx/hadamard/<D>/0"), SHA-256(".../<D>/1"), ... (ASCII, D
in decimal, counter 0, 1, ... until there are D bits), read most significant
bit first: ``s[i] = -1`` where bit i is 1, else +1 (docs/cachecard-format.md,
section 5.1). So a card names its rotation with one word and every reader
rebuilds the same matrix. This module knows nothing
about MLX: it returns numpy matrices; callers multiply in their own library.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from .errors import ConfigError

ROTATIONS = ("none", "hadamard")


def fits(kind: str, dim: int) -> bool:
    """Whether a known rotation ``kind`` applies to head dim ``dim``
    ("hadamard": a power of two)."""
    return kind != "hadamard" or (dim >= 1 and not dim & (dim - 1))


def check_rotation(kind: str, *dims: int) -> None:
    """Raise ConfigError unless ``kind`` is known and fits every head dim."""
    if kind not in ROTATIONS:
        raise ConfigError(f"rotation must be one of {list(ROTATIONS)} but got {kind!r}")
    for d in dims:
        if not fits(kind, d):
            raise ConfigError(
                f"rotation 'hadamard' needs power-of-two head dims, got {d}"
            )


def _signs(dim: int) -> np.ndarray:
    bits = np.zeros(0, np.uint8)
    counter = 0
    while bits.size < dim:
        digest = hashlib.sha256(f"qkvshare-mlx/hadamard/{dim}/{counter}".encode())
        bits = np.concatenate(
            [bits, np.unpackbits(np.frombuffer(digest.digest(), np.uint8))]
        )
        counter += 1
    return np.where(bits[:dim] == 1, -1.0, 1.0)


@lru_cache(maxsize=16)
def rotation_signs(kind: str, dim: int) -> np.ndarray | None:
    """The (D,) float32 signs ``s`` of a rotation (None for "none"): ``R`` is
    ``diag(s) @ H / sqrt(D)``, so ``x @ R`` is the fast Walsh-Hadamard
    transform of ``x * s`` scaled by ``1/sqrt(D)`` (``mx.hadamard_transform``,
    Sylvester order) and ``y @ R.T`` that transform of ``y``, times ``s``.
    Read-only."""
    check_rotation(kind, dim)
    if kind == "none":
        return None
    s = _signs(dim).astype(np.float32)
    s.setflags(write=False)
    return s


@lru_cache(maxsize=16)
def rotation_matrix(kind: str, dim: int) -> np.ndarray | None:
    """The (D, D) float32 orthogonal matrix of a rotation (None for "none").

    Rows are stored rotated as ``x @ R``; ``x_rot @ R.T`` undoes it.
    The returned array is read-only (shared by the cache).
    """
    check_rotation(kind, dim)
    if kind == "none":
        return None
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    r = (_signs(dim)[:, None] * h / np.sqrt(dim)).astype(np.float32)
    r.setflags(write=False)
    return r
