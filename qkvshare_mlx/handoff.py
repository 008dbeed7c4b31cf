"""A handoff in two calls: the sender makes a card, the receiver continues.

:func:`make_card` prefills the sender's prompt (:mod:`.capture`), quantizes
the cache under a bit budget (:mod:`.quant`, widths chosen by a
controller from the probe statistics) and wraps it with the model's
fingerprint (:mod:`.card`). :func:`continue_from_card` injects a card
(:mod:`.inject`), aligns the receiver's prompt with it, prefills only what
is new and generates with mlx-lm (:mod:`.generation`).

Both functions return data: no printing, no files.
"""

from __future__ import annotations

import time

import numpy as np

from .align import token_ids
from .capture import prefill
from .card import CacheCard
from .chat import prompt_ids
from .dtypes import mx_name
from .errors import PromptMismatchError
from .fingerprint import fingerprint, layer_windows, weights_status
from .formats import QuantConfig, QuantizedKV
from .generation import GREEDY, Generation, SamplingOptions, check_max_tokens, generate
from .inject import align, inject
from .models import model_dtype
from .quant.controllers import HandoffPlan, with_sensitivity
from .quant.mlx_backend import quantize_cache
from .sensitivity import LayerSensitivity
from .weights import model_digest


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
    progress=None,
    allow_other_weights: bool = False,
    trim_windows: bool = True,
    sensitivity: LayerSensitivity | None = None,
) -> CacheCard:
    """Prefill a prompt and pack its KV cache into a card.

    Args:
        model: the sender's mlx-lm model.
        tokenizer: its tokenizer (hashed into the fingerprint; may be None).
        prompt_tokens: what the card will cover: token ids, or text (encoded
            by the tokenizer, as mlx-lm does).
        controller, budget_bits, config, plan: see
            :func:`~qkvshare_mlx.quant.pipeline.quantize`.
        inherited: a card received earlier whose tokens begin the prompt: it
            is injected instead of re-prefilled and its segments are kept bit
            for bit (only the new tokens are quantized).
        user: free-form JSON metadata for the card.
        model_config: the model's config.json dict (default: ``model.args``).
        probe_queries: last positions whose attention drives saliency.
        progress: ``progress(processed, total)`` during the prefill.
        allow_other_weights: accept an ``inherited`` card made with other
            weights of the same model (its segments are kept as they are; the
            new card names this model's weights).
        trim_windows: a sliding-window layer's rows hold only the last
            ``sliding_window`` tokens (all its later queries see); False:
            every layer holds every token.
        sensitivity: the model's measured layer sensitivity
            (:mod:`~qkvshare_mlx.sensitivity`): the allocator weighs each
            layer's key and value errors by it; None: every layer alike.

    Returns:
        A :class:`~qkvshare_mlx.card.CacheCard` at RoPE offset 0.
    """
    tokens = prompt_ids(tokenizer, prompt_tokens)
    fp = fingerprint(model_config if model_config is not None else model, tokenizer)
    fp["weights_sha256"] = model_digest(model)  # the weights that make the cache
    cache, done, inherited_qkv = None, 0, None
    if inherited is not None:
        n = inherited.n_tokens
        inherited.require_start(
            "an inherited card (made from the conversation's start)"
        )
        if len(tokens) <= n or not np.array_equal(tokens[:n], inherited.tokens):
            raise PromptMismatchError(
                f"prompt_tokens: expected the inherited card's {n} tokens followed "
                f"by at least one new token ({len(tokens)} given)"
            )
        cache = inject(
            inherited,
            model,
            mode="dequantize",
            layout="sender",  # every token in every layer, as a card holds
            expect=fp,
            allow_other_weights=allow_other_weights,
        )
        done, inherited_qkv = n, inherited.to_quantized()
    pre = prefill(
        model,
        tokens[done:],
        cache=cache,
        probe_queries=probe_queries,
        progress=progress,
    )
    qkv: QuantizedKV = quantize_cache(
        pre.keys,
        pre.values,
        controller=controller,
        budget_bits=budget_bits,
        config=config or (inherited_qkv.config if inherited_qkv else None),
        stats=with_sensitivity(pre.stats, sensitivity, len(pre.keys)),
        plan=plan,
        inherited=inherited_qkv,
        windows=layer_windows(fp) if trim_windows else None,
    )
    dtype = mx_name(model_dtype(model))
    return CacheCard.from_quantized(qkv, tokens, fp, offset=0, dtype=dtype, user=user)


def continue_from_card(
    card: CacheCard,
    model,
    tokenizer,
    prompt,
    *,
    mode: str = "dequantize",
    max_tokens: int = 64,
    policy: str = "prefix",
    sampling: SamplingOptions = GREEDY,
    logits_processors=None,
    prompt_progress_callback=None,
    on_text=None,
    allow_other_weights: bool = False,
) -> Generation:
    """Continue a conversation from a card, generating with mlx-lm.

    Args:
        card: the sender's card.
        model, tokenizer: the receiver's mlx-lm model and tokenizer (the
            card is checked against both; tokenizer may be None: ids only).
        prompt: the receiver's full prompt, the card's tokens first: token
            ids, or text (encoded by the tokenizer, as mlx-lm does).
        mode: injection mode, see :func:`~qkvshare_mlx.inject.inject`.
        max_tokens: most tokens to generate (stops early at EOS).
        policy: alignment policy, see :func:`~qkvshare_mlx.align.plan_reuse`.
        sampling, logits_processors, prompt_progress_callback, on_text: see
            :func:`~qkvshare_mlx.generation.generate`.
        allow_other_weights: accept a card made with other weights (e.g. a
            base model's card for its LoRA merge); ``info["weights"]`` says so.

    Returns:
        A :class:`~qkvshare_mlx.generation.Generation`: ``ttft_ms`` counts
        inject + align + prefill of the rest + first token; ``info`` holds
        ``mode``, ``cache_class``, ``cache_nbytes``, ``inject_ms`` and
        ``weights`` (how the card's weights digest compared with the model's:
        a ``qkvshare_mlx.fingerprint.WEIGHTS_*`` value).
    """
    check_max_tokens(max_tokens)
    ids = prompt_ids(tokenizer, prompt)
    expect = fingerprint(model, tokenizer) if tokenizer is not None else None
    tic = time.perf_counter()
    cache = inject(
        card, model, mode=mode, expect=expect, allow_other_weights=allow_other_weights
    )
    inject_s = time.perf_counter() - tic
    n_reuse, rest = align(card, ids, policy=policy, cache=cache)
    cache_class = type(cache[0]).__name__
    gen = generate(
        model,
        tokenizer,
        rest,
        prompt_cache=cache,
        max_tokens=max_tokens,
        sampling=sampling,
        logits_processors=logits_processors,
        prompt_progress_callback=prompt_progress_callback,
        on_text=on_text,
        started=tic,
    )
    gen.n_reused, gen.n_prefilled = n_reuse, len(rest)
    gen.info = {
        "mode": mode,
        "cache_class": cache_class,
        "cache_nbytes": sum(c.nbytes for c in cache),
        "inject_ms": 1000 * inject_s,
        "weights": weights_status(card.model, fingerprint(model)),
    }
    return gen


def greedy_tokens(model, prompt_tokens, *, max_tokens: int = 64, eos=()) -> list[int]:
    """Greedy continuation of a prompt without a card (the baseline)."""
    return generate(
        model, None, token_ids(prompt_tokens), max_tokens=max_tokens, eos=eos
    ).tokens
