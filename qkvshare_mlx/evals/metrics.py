"""Scores of a candidate against the exact reference.

Teacher-forced next-token distributions (KL, top-1 agreement) and generated
token sequences (first divergence). Pure functions over arrays and lists:
the module knows nothing about models, cards or GSM8K (answer matching is
``gsm8k.numeric_match``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..divergence import kl_top1


def compare_logits(ref: mx.array, got: mx.array) -> dict:
    """Mean KL(ref || got) and top-1 agreement over positions."""
    kl, top1 = kl_top1(
        np.asarray(ref.astype(mx.float32)), np.asarray(got.astype(mx.float32))
    )
    return {"kl": kl, "top1_agreement": top1}


def first_divergence(reference, candidate) -> int | None:
    """Index of the first differing token; None when the sequences are equal.

    A sequence that is a strict prefix of the other diverges at its length.
    """
    n = min(len(reference), len(candidate))
    for i in range(n):
        if reference[i] != candidate[i]:
            return i
    return None if len(reference) == len(candidate) else n
