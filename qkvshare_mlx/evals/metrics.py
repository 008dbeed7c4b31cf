"""Scores of a candidate against the exact reference.

Teacher-forced next-token distributions (KL, top-1 agreement) and generated
token sequences (first divergence). Pure functions over arrays and lists:
the module knows nothing about models, cards or GSM8K (answer matching is
``gsm8k.numeric_match``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def compare_logits(ref: mx.array, got: mx.array) -> dict:
    """Mean KL(ref || got) and top-1 agreement over positions."""
    # numpy: MLX's CPU exp is several times slower than numpy's here
    ref = np.asarray(ref.astype(mx.float32), dtype=np.float64)
    got = np.asarray(got.astype(mx.float32), dtype=np.float64)
    lp = ref - _logsumexp(ref)
    lq = got - _logsumexp(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1).mean()
    top1 = (ref.argmax(-1) == got.argmax(-1)).mean()
    return {"kl": float(kl), "top1_agreement": float(top1)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def first_divergence(reference, candidate) -> int | None:
    """Index of the first differing token; None when the sequences are equal.

    A sequence that is a strict prefix of the other diverges at its length.
    """
    n = min(len(reference), len(candidate))
    for i in range(n):
        if reference[i] != candidate[i]:
            return i
    return None if len(reference) == len(candidate) else n
