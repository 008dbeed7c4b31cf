"""How far one next-token distribution is from another.

Teacher-forced scores of a candidate's logits against a reference's, on
numpy float64 (MLX's CPU ``exp`` is several times slower than numpy's):
the layer sensitivity measurement (:mod:`.sensitivity`), the study's
metrics (``evals.metrics``) and the benches read them from here.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """(..., V) log-probabilities of (..., V) logits."""
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def per_position(ref, got) -> tuple[np.ndarray, np.ndarray]:
    """(N,) KL(ref || got) and (N,) bool top-1 agreement of (N, V) logits,
    position by position (any array numpy reads; computed in float64)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return kl, ref.argmax(-1) == got.argmax(-1)


def kl_top1(ref, got) -> tuple[float, float]:
    """Mean KL(ref || got) and top-1 agreement of (N, V) logits over the N
    positions (:func:`per_position`'s means)."""
    kl, match = per_position(ref, got)
    return float(kl.mean()), float(match.mean())
