"""Teacher-forced fidelity of cards along a reference transcript.

The cheap path of the study: no generation. Cards are made hop by hop from
the exact chain's transcript, each inheriting the previous one, and the
answerer's reference prompt and reply are fed through each card's cache; the
next-token distributions are scored against the exact cache's
(:func:`qkvshare_mlx.evals.metrics.compare_logits`). The module knows how to
replay and score one handoff; which handoffs, problems and hop counts make
the study's grid is ``phases``.
"""

from __future__ import annotations

import time

import mlx.core as mx

from ..agents import (
    ChainRun,
    Handoff,
    card_info,
    hop_card,
    inherited_bits_identical,
    kv_cache,
)
from ..capture import Prefill, prefill
from ..inject import inject
from ..quant.controllers import HandoffPlan
from .metrics import compare_logits


def exact_prefill(model, tokens, *, probe_until: int | None = None) -> Prefill:
    """Exact prefill of a transcript; probe statistics at ``probe_until``.

    The statistics (attention of the last 32 positions) are those a sender
    at ``probe_until`` tokens would have measured, so the first hop's card
    can be cut from this one prefill.
    """
    n = probe_until or len(tokens)
    pre = prefill(model, tokens[:n], probe_queries=32)
    if n < len(tokens):
        model(mx.array(tokens[n:])[None], cache=pre.cache)
        keys = [c.keys[..., : c.offset, :] for c in pre.cache]
        values = [c.values[..., : c.offset, :] for c in pre.cache]
        mx.eval(keys, values)
        pre = Prefill(pre.cache, keys, values, pre.logits, pre.stats, pre.tokens, 32)
    return pre


def forced_logits(
    model, cache: list, prompt: list[int], cached: int, reply: list[int]
) -> mx.array:
    """(len(reply)+1, V) float32 logits predicting each reply token and the next."""
    feed = prompt[cached:] + reply
    logits = model(mx.array(feed)[None], cache=cache)[0].astype(mx.float32)
    return logits[len(prompt) - cached - 1 :]


def reference_logits(model, pre: Prefill, ref: ChainRun, h: int) -> mx.array:
    """Exact teacher-forced logits of the answerer after ``h`` hops."""
    end = ref.replies[h - 1][1]
    final = ref.finals[h]
    cache = kv_cache(pre.keys, pre.values, end)
    return forced_logits(model, cache, final["prompt"], end, final["reply"])


def replay_cards(
    model,
    tokenizer,
    ref: ChainRun,
    handoff: Handoff,
    finals,
    pre: Prefill,
    ref_logits: dict,
    *,
    n_hops: int | None = None,
):
    """Quantize hop by hop along ``ref`` and teacher-force the answerer.

    Cards are made from the reference transcript (no generation), each
    inheriting the previous one; at hop count ``h`` the answerer's prompt
    and reply from ``ref`` are fed through the card's cache.

    Args:
        ref: the exact chain (its finals hold the answerer turns).
        handoff: a card handoff.
        finals: hop counts to score (each in ``ref.finals``).
        pre: :func:`exact_prefill` of ``ref.tokens`` probed at agent 0's end.
        ref_logits: ``{h: reference_logits(...)}``.
        n_hops: the chain length the ``topology`` plan assumes (default
            ``max(finals)``).

    Returns:
        ``{h: {kl, top1_agreement, effective_bits, payload_bytes, fp16_bytes,
        tokens, hop1_bits_identical, seconds}}``.
    """
    n_hops = n_hops or max(finals)
    out, card, first = {}, None, None
    tic = time.perf_counter()
    for k in range(max(finals)):
        end = ref.replies[k][1]
        plan = HandoffPlan(hops_remaining=n_hops - 1 - k)
        card = hop_card(
            model,
            tokenizer,
            ref.tokens[:end],
            handoff,
            inherited=card,
            plan=plan,
            pre=pre if k == 0 else None,
        )
        first = first or card
        h = k + 1
        if h in finals:
            final = ref.finals[h]
            cache = inject(card, model, mode="dequantize")
            got = forced_logits(
                model, cache, final["prompt"], card.n_tokens, final["reply"]
            )
            m = compare_logits(ref_logits[h], got)
            m.update(card_info(card))
            # checked at the deepest hop only (decoding every card is slow)
            m["hop1_bits_identical"] = (
                inherited_bits_identical(first, card) if h == max(finals) else None
            )
            m["seconds"] = time.perf_counter() - tic
            out[h] = m
    return out
