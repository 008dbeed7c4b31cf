"""How much of a card a receiver's prompt can reuse: one rule for every runtime.

A receiver's prompt should begin with the card's tokens. :func:`plan_reuse`
compares the two token lists and says how many cached tokens to keep and
which prompt tokens are left to prefill; the MLX receiver
(:func:`qkvshare_mlx.inject.align`) and the transformers one
(``qkvshare_converters.hf_cache.continue_hf``) both call it, then trim
their own cache to the kept tokens.

Pure numpy: the module knows token ids, nothing about caches or models.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, EmptyTokensError, PromptMismatchError

POLICIES = ("prefix", "strict")


def token_ids(tokens, what: str = "prompt_tokens") -> np.ndarray:
    """Token ids as a non-empty (n,) int64 array of ids >= 0.

    Raises:
        EmptyTokensError: no ids.
        ConfigError: a negative id.
    """
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise EmptyTokensError(f"{what}: expected at least one token id, got none")
    if ids.min() < 0:
        raise ConfigError(f"{what}: ids must be >= 0, got {int(ids.min())}")
    return ids


def plan_reuse(
    card_tokens, prompt_tokens, *, policy: str = "prefix"
) -> tuple[int, list[int]]:
    """The card tokens a prompt reuses and the prompt tokens still to feed.

    At least the prompt's last token is always left to feed, so the model
    produces logits for it: a prompt equal to the card's tokens reuses all
    but the last one.

    Args:
        card_tokens: the (T,) ids the card covers.
        prompt_tokens: the receiver's full prompt ids.
        policy: ``"strict"``: the prompt must start with every card token
            (PromptMismatchError names the first differing position);
            ``"prefix"``: reuse the longest common prefix.

    Returns:
        ``(n_reuse, remaining_tokens)``: card tokens to keep in the cache
        and the prompt tokens to prefill after them (never empty).
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {list(POLICIES)} but got {policy!r}")
    ref = np.asarray(card_tokens, dtype=np.int64).reshape(-1)
    prompt = token_ids(prompt_tokens)
    n = min(len(ref), len(prompt))
    diff = np.nonzero(ref[:n] != prompt[:n])[0]
    common = int(diff[0]) if diff.size else n
    if policy == "strict" and common < len(ref):
        if common < len(prompt):
            raise PromptMismatchError(
                f"prompt_tokens[{common}]: expected the card's token "
                f"{int(ref[common])} at position {common}, got {int(prompt[common])}"
            )
        raise PromptMismatchError(
            f"prompt_tokens: expected at least the card's {len(ref)} tokens, "
            f"got {len(prompt)}"
        )
    n_reuse = min(common, len(prompt) - 1)
    return n_reuse, prompt[n_reuse:].tolist()
