"""A handoff in two calls: the sender makes a card, the receiver continues.

:func:`make_card` prefills the sender's prompt (:mod:`.capture`), quantizes
the cache under a bit budget (:mod:`.quantizer`, widths chosen by a
controller from the probe statistics) and wraps it with the model's
fingerprint (:mod:`.card`). :func:`continue_from_card` injects a card
(:mod:`.inject`), aligns the receiver's prompt with it, prefills only what
is new and decodes greedily with mlx-lm.

Both functions return data: no printing, no files.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from .capture import prefill
from .card import CacheCard
from .dtypes import mx_name
from .errors import ConfigError, PromptMismatchError
from .fingerprint import fingerprint
from .formats import QuantConfig, QuantizedKV
from .inject import align, inject
from .models import model_dtype
from .quant.controllers import HandoffPlan
from .quant.mlx_backend import quantize_cache


def make_card(
    model,
    tokenizer,
    prompt_tokens,
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    plan: HandoffPlan | None = None,
    inherited: CacheCard | None = None,
    user: dict | None = None,
    model_config: dict | None = None,
    probe_queries: int = 32,
) -> CacheCard:
    """Prefill a prompt and pack its KV cache into a card.

    Args:
        model: the sender's mlx-lm model.
        tokenizer: its tokenizer (hashed into the fingerprint; may be None).
        prompt_tokens: the prompt ids the card will cover.
        controller, budget_bits, config, plan: see
            :func:`~qkvshare_mlx.quantizer.quantize_cache`.
        inherited: a card received earlier whose tokens begin the prompt: it
            is injected instead of re-prefilled and its segments are kept bit
            for bit (only the new tokens are quantized).
        user: free-form JSON metadata for the card.
        model_config: the model's config.json dict (default: ``model.args``).
        probe_queries: last positions whose attention drives saliency.

    Returns:
        A :class:`~qkvshare_mlx.card.CacheCard` at RoPE offset 0.
    """
    tokens = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1)
    fp = fingerprint(model_config if model_config is not None else model, tokenizer)
    cache, done, inherited_qkv = None, 0, None
    if inherited is not None:
        n = inherited.n_tokens
        if inherited.offset != 0:
            raise ConfigError(
                f"inherited card offset {inherited.offset}: expected 0 (a card "
                "made from the start of the conversation)"
            )
        if len(tokens) <= n or not np.array_equal(tokens[:n], inherited.tokens):
            raise PromptMismatchError(
                f"prompt_tokens: expected the inherited card's {n} tokens followed "
                f"by at least one new token ({len(tokens)} given)"
            )
        cache = inject(inherited, model, mode="dequantize", expect=fp)
        done, inherited_qkv = n, inherited.to_quantized()
    pre = prefill(model, tokens[done:], cache=cache, probe_queries=probe_queries)
    qkv: QuantizedKV = quantize_cache(
        pre.keys,
        pre.values,
        controller=controller,
        budget_bits=budget_bits,
        config=config or (inherited_qkv.config if inherited_qkv else None),
        stats=pre.stats,
        plan=plan,
        inherited=inherited_qkv,
    )
    dtype = mx_name(model_dtype(model))
    return CacheCard.from_quantized(qkv, tokens, fp, offset=0, dtype=dtype, user=user)


def continue_from_card(
    card: CacheCard,
    model,
    tokenizer,
    prompt_tokens,
    *,
    mode: str = "dequantize",
    max_tokens: int = 64,
    policy: str = "prefix",
) -> tuple[list[int], dict]:
    """Continue a conversation from a card with greedy decoding.

    Args:
        card: the sender's card.
        model, tokenizer: the receiver's mlx-lm model and tokenizer (the
            card is checked against both).
        prompt_tokens: the receiver's full prompt (the card's tokens first).
        mode: injection mode, see :func:`~qkvshare_mlx.inject.inject`.
        max_tokens: most tokens to generate (stops early at EOS).
        policy: alignment policy, see :func:`~qkvshare_mlx.inject.align`.

    Returns:
        ``(tokens, info)``: generated ids (EOS excluded) and timings:
        ``ttft_ms`` (inject + align + prefill of the rest + first token),
        ``inject_ms``, ``decode_tps``, ``n_reused``, ``n_prefilled``,
        ``cache_class``, ``cache_nbytes``, ``mode``, ``finish_reason``.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1 but got {max_tokens}")
    expect = fingerprint(model, tokenizer) if tokenizer is not None else None
    tic = time.perf_counter()
    cache = inject(card, model, mode=mode, expect=expect)
    inject_s = time.perf_counter() - tic
    n_reuse, rest = align(card, prompt_tokens, policy=policy, cache=cache)
    cache_class = type(cache[0]).__name__
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    out: list[int] = []
    finish = "length"
    ttft = t_first = None
    for n, (token, _) in enumerate(
        generate_step(mx.array(rest), model, prompt_cache=cache, max_tokens=max_tokens)
    ):
        token = int(token)
        if n == 0:
            t_first = time.perf_counter()
            ttft = t_first - tic
        if token in eos:
            finish = "stop"
            break
        out.append(token)
    decode_s = time.perf_counter() - t_first
    info = {
        "mode": mode,
        "cache_class": cache_class,
        "cache_nbytes": sum(c.nbytes for c in cache),
        "n_reused": n_reuse,
        "n_prefilled": len(rest),
        "inject_ms": 1000 * inject_s,
        "ttft_ms": 1000 * ttft,
        "decode_tps": (len(out) - 1) / decode_s if len(out) > 1 and decode_s else None,
        "finish_reason": finish,
    }
    return out, info


def greedy_tokens(model, prompt_tokens, *, max_tokens: int = 64, eos=()) -> list[int]:
    """Greedy continuation of a prompt without a card (the baseline)."""
    out = []
    for token, _ in generate_step(
        mx.array(np.asarray(prompt_tokens).reshape(-1)), model, max_tokens=max_tokens
    ):
        token = int(token)
        if token in eos:
            break
        out.append(token)
    return out
