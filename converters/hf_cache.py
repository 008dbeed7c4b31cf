"""CacheCards in Hugging Face transformers: card <-> ``DynamicCache``.

The transformers side of a handoff. A card is decoded with the numpy
reference codec into a ``transformers.DynamicCache`` that
``model.generate(..., past_key_values=cache)`` (``cache=`` in transformers 5)
and ``model(input_ids, ...)`` continue from; a ``DynamicCache`` is quantized
with the numpy quantizer into a card the MLX side reads.

This module needs torch, transformers and numpy, never MLX: from the core it
imports only modules that are numpy-only (card, formats, fingerprint, align,
chat, generation, errors, quant.numpy_backend). torch and transformers are
imported inside the functions, so importing ``qkvshare_converters`` stays
cheap.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from typing import Any

import numpy as np

from qkvshare_mlx.align import plan_reuse, token_ids
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.chat import prompt_ids
from qkvshare_mlx.dtypes import FLOAT_NAMES, to_torch
from qkvshare_mlx.errors import (
    CacheShapeError,
    ConfigError,
)
from qkvshare_mlx.fingerprint import (
    fingerprint,
    layer_windows,
    weights_status,
)
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.generation import (
    GREEDY,
    Generation,
    SamplingOptions,
    check_max_tokens,
)
from qkvshare_mlx.quant.controllers import HandoffPlan, TokenStats, with_sensitivity
from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np, quantize_cache_np


def _torch():
    """The torch module, imported once, with the install command if missing."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "the transformers bridge needs torch and transformers: "
            "pip install 'qkvshare-mlx[hf]'"
        ) from e
    return torch


# ----------------------------------------------------------------------------
# Small adapters over the transformers API (the ``cache`` keyword is new in 5.x).


def _cache_kwarg(model) -> str:
    """Name of the keyword that passes a cache to ``model.forward``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _forward(model, input_ids, cache, **kwargs):
    torch = _torch()

    with torch.no_grad():
        return model(
            input_ids, use_cache=True, **{_cache_kwarg(model): cache}, **kwargs
        )


def _torch_dtype(dtype, model):
    if dtype is None:
        torch = _torch()

        return getattr(model, "dtype", None) or torch.float32
    return to_torch(dtype)


# ----------------------------------------------------------------------------
# Card -> DynamicCache


def card_to_dynamic_cache(
    card: CacheCard,
    model=None,
    *,
    dtype=None,
    device=None,
    allow_other_weights: bool = False,
):
    """Decode a card into a ``transformers.DynamicCache``.

    Args:
        card: the card to inject.
        model: the receiving model; when given, the card is checked against
            its fingerprint and the cache gets the model's dtype, device and
            layer types (``DynamicCache(config=model.config)``).
        dtype: torch dtype (or its name) of the cache; default the model's,
            else float32.
        device: torch device; default the model's, else CPU.
        allow_other_weights: accept a card made with other weights (e.g. a
            base model's card for its LoRA merge).

    Returns:
        A ``DynamicCache`` of ``card.n_tokens`` tokens per layer, (B, H, T, D).
        A layer the card holds from ``held_from > 0`` (a sliding window's
        tokens) gets zero rows before it: with ``model``, its sliding layer
        keeps only its window; without, the model's window masks them.

    Raises:
        ModelMismatchError: the card was made for another model.
        CardError: the card starts at a RoPE offset other than 0 (a
            ``DynamicCache`` always starts at position 0).
    """
    from transformers import DynamicCache

    if model is not None:
        card.check_model(fingerprint(model), allow_other_weights=allow_other_weights)
    card.require_start("a DynamicCache")
    dtype = _torch_dtype(dtype, model)
    if device is None:
        device = getattr(model, "device", None) or "cpu"
    keys, values = dequantize_cache_np(card.to_quantized())
    cache = DynamicCache(config=model.config) if model is not None else DynamicCache()
    for li, (k, v) in enumerate(zip(keys, values)):
        cache.update(_to_torch(k, dtype, device), _to_torch(v, dtype, device), li)
    return cache


def _to_torch(x: np.ndarray, dtype, device):
    torch = _torch()

    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------
# DynamicCache -> card


def cache_arrays(cache) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer (B, H, T, D) float32 numpy keys and values of a transformers cache."""
    keys, values = [], []
    for li, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.ndim != 4:
            raise CacheShapeError(
                f"layer {li}: expected (B, H, T, D) key/value tensors, got "
                f"{type(layer).__name__} without them"
            )
        keys.append(k.detach().to("cpu").float().numpy())
        values.append(v.detach().to("cpu").float().numpy())
    return keys, values


def key_norm_stats(keys: list[np.ndarray]) -> TokenStats:
    """TokenStats with only key norms: (L, T) L2 norm per token, summed over (B, H)."""
    norms = np.stack([np.linalg.norm(k, axis=-1).sum(axis=(0, 1)) for k in keys])
    return TokenStats(key_norms=norms.astype(np.float64))


def dynamic_cache_to_card(
    cache,
    tokens,
    model,
    tokenizer=None,
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    user: dict | None = None,
    trim_windows: bool = True,
    sensitivity=None,
) -> CacheCard:
    """Quantize a transformers cache into a card (numpy quantizer, no MLX).

    Args:
        cache: a ``DynamicCache`` covering ``tokens`` (e.g. from
            :func:`hf_prefill`).
        tokens: (T,) token ids the cache covers.
        model: the model that made the cache (for the fingerprint and dtype).
        tokenizer: optional, adds the tokenizer hash to the fingerprint.
        controller, budget_bits, config, stats, plan: as in
            ``quant.numpy_backend.quantize_cache_np``. Without ``stats`` the key
            norms of the cache are used (enough for ``saliency-keynorm``;
            ``saliency`` needs the attention from :func:`hf_prefill`).
        user: free-form JSON metadata stored in the card.
        trim_windows: a sliding-window layer's rows hold only the last
            ``sliding_window`` tokens; False: every layer holds every token.
        sensitivity: a ``qkvshare_mlx.sensitivity.LayerSensitivity`` of the
            model: the allocator weighs each layer's key and value errors
            by it (``TokenStats.layer_weights``); None: every layer alike.

    Raises:
        CacheShapeError: the cache does not cover ``tokens`` or has
            non-finite values.
        ConfigError: bad controller, budget, statistics, or a profile of
            another layer count.
    """
    keys, values = cache_arrays(cache)
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if keys[0].shape[2] != ids.shape[0]:
        raise CacheShapeError(
            f"tokens: cache holds {keys[0].shape[2]} tokens, got {ids.shape[0]} ids"
        )
    if stats is None:
        stats = key_norm_stats(keys)
    stats = with_sensitivity(stats, sensitivity, len(keys))
    fp = fingerprint(model, tokenizer)
    qkv = quantize_cache_np(
        keys,
        values,
        controller=controller,
        budget_bits=budget_bits,
        config=config,
        stats=stats,
        plan=plan,
        windows=layer_windows(fp, len(keys)) if trim_windows else None,
    )
    dtype = str(getattr(model, "dtype", "float32")).removeprefix("torch.")
    return CacheCard.from_quantized(
        qkv,
        ids,
        fp,
        dtype=dtype if dtype in FLOAT_NAMES else "float32",
        runtime="transformers",
        user=user,
    )


def key_rope_of(model):
    """Per layer, the RoPE a transformers model applies to its keys, as a
    :class:`qkvshare_mlx.rope.KeyRope` for ``QuantConfig(key_rope=...)``
    (pre-RoPE cards from this runtime).

    Probed through the model's own ``model.model.rotary_emb`` (per layer
    type where it takes one, Gemma 3) and its module's
    ``apply_rotary_pos_emb``, as :func:`qkvshare_mlx.rope.from_mlx_model`
    probes mlx-lm's.

    Raises:
        ConfigError: no rotary embedding, or one that is not a RoPE of
            channel pairs.
    """
    torch = _torch()
    from qkvshare_mlx.rope import probe_layers

    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    attns = _attention_modules(model) or [
        getattr(layer, "self_attn", None) for layer in getattr(inner, "layers", [])
    ]
    head_dim = fingerprint(model).get("head_dim")
    if rotary is None or not attns or None in attns or not head_dim:
        raise ConfigError(
            "pre-RoPE keys need model.model.rotary_emb and attention layers"
        )
    types = getattr(model.config, "layer_types", None)
    typed = "layer_type" in inspect.signature(rotary.forward).parameters

    def rope_at(x, p, li, attn):
        pos = torch.tensor([[p]])
        extra = (types[li],) if typed and types else ()
        cos, sin = rotary(torch.zeros(1, 1, head_dim), pos, *extra)
        q = torch.from_numpy(np.ascontiguousarray(x))[None, :, None, :]
        with torch.no_grad():
            return _apply_rope(attn, q, cos, sin)[0, :, 0, :].float().numpy()

    ropes = [functools.partial(rope_at, li=li, attn=a) for li, a in enumerate(attns)]
    return probe_layers(ropes, head_dim)


# ----------------------------------------------------------------------------
# Prefill with probe attention


def _rotate_half(x):
    torch = _torch()

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(attn, q, cos, sin):
    # The model's own rotary function when its module defines one (all
    # Llama-family files do), else the Llama formula.
    module = sys.modules.get(type(attn).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is not None:
        return apply(q, q, cos, sin)[0]
    # a partial rotary factor rotates the first cos.shape[-1] channels only
    torch = _torch()

    cos, sin, rot = cos.unsqueeze(1), sin.unsqueeze(1), cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    return torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)


def _query_projection(attn) -> tuple[Any, int | None] | None:
    """(projection, query columns) of an attention module: its ``q_proj``
    (every column, None), or a fused ``qkv_proj`` and the width of its
    query columns (Phi-3: queries first, then keys, values; the slice its
    own forward takes), else None."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj, None
    config = getattr(attn, "config", None)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None)
    width = getattr(getattr(attn, "qkv_proj", None), "out_features", None)
    # Phi-3's stacking [q | k | v] has this width; fused projections of
    # other layouts do not (Zaya's custom module; MiniMax's linear attention,
    # 3 x n_heads wide, with fewer KV heads than query heads)
    if n_heads and head_dim and width == (n_heads + 2 * n_kv) * head_dim:
        return attn.qkv_proj, n_heads * head_dim
    return None


def _probe_attention(attn, hidden, cos, sin, keys):
    """Attention mass (T,) that the probe queries put on each cached key, and
    the queries' (H_kv, D, D) mean ``q q^T`` per KV head (as
    ``qkvshare_mlx.capture.query_moments``).

    Args:
        attn: the layer's attention module (``q_proj`` or a fused
            ``qkv_proj``, ``head_dim``, ``scaling``).
        hidden: (B, P, hidden) inputs of the last P positions.
        cos, sin: (B, P, rotary dim) rotary embeddings of those positions
            (rotary dim < head_dim with a partial rotary factor).
        keys: (B, H_kv, T, D) the layer's cached (rotated) keys.
    """
    torch = _torch()

    B, P, _ = hidden.shape
    head_dim = keys.shape[-1]
    projection, width = _query_projection(attn)
    q = projection(hidden)[..., :width].reshape(B, P, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head query norm
        q = attn.q_norm(q)
    q = _apply_rope(attn, q.transpose(1, 2), cos, sin)  # (B, H_q, P, D)
    H_kv, T = keys.shape[1], keys.shape[2]
    q = q.reshape(B, H_kv, -1, P, head_dim).float()
    scale = getattr(attn, "scaling", head_dim**-0.5)
    scores = torch.einsum("bgrpd,bgtd->bgrpt", q, keys.float()) * scale
    # query j sits at position T - P + j and sees keys 0..T - P + j
    qpos = torch.arange(T - P, T).view(P, 1)
    scores = scores.masked_fill(torch.arange(T).view(1, T) > qpos, float("-inf"))
    n = q.shape[0] * q.shape[2] * P
    moments = torch.einsum("bgrpd,bgrpe->gde", q, q) / n
    return scores.softmax(dim=-1).sum(dim=(0, 1, 2, 3)), moments


def _attention_modules(model) -> list | None:
    """Each layer's attention module when all have a query projection
    (``q_proj``, or a fused ``qkv_proj``), else None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not all(_query_projection(a) is not None for a in attns):
        return None
    return attns


def hf_prefill(model, tokens, *, probe_queries: int = 32):
    """Prefill ``tokens`` and measure what the last queries attend to.

    The attention of the last ``probe_queries`` positions is recomputed from
    their inputs (captured with a forward pre-hook on each layer's
    ``self_attn``, the standard torch hook mechanism) and the cached keys,
    so the model runs with its fast attention kernel. The queries come from
    each ``model.model.layers[i].self_attn``'s ``q_proj``, or from the query
    columns of a fused ``qkv_proj`` (Phi-3), rotated with the layer's
    ``position_embeddings`` (partial rotary factors included); models whose
    layers have neither get key norms only (``attention`` None, enough for
    the ``saliency-keynorm`` controller).

    Args:
        model: a transformers causal LM.
        tokens: (T,) token ids.
        probe_queries: how many final positions act as probe queries
            (0: key norms only).

    Returns:
        ``(cache, stats, last_logits)``: the ``DynamicCache``, TokenStats with
        ``attention`` (L, T) (summed over heads and probe queries) and
        ``key_norms`` (L, T), and the (B, V) float32 logits of the last token.
    """
    torch = _torch()
    from transformers import DynamicCache

    ids = token_ids(tokens, "tokens")
    P = min(int(probe_queries), ids.shape[0])
    attns = _attention_modules(model) if P > 0 else None
    captured: dict[int, tuple[Any, Any, Any] | None] = {}

    def make_hook(li):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rope = kwargs.get("position_embeddings")
            if hidden is None or rope is None:
                captured[li] = None
                return
            cos, sin = rope
            captured[li] = (hidden[:, -P:], cos[:, -P:], sin[:, -P:])

        return hook

    handles = [
        attn.register_forward_pre_hook(make_hook(li), with_kwargs=True)
        for li, attn in enumerate(attns or [])
    ]
    try:
        extra = {}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            extra["logits_to_keep"] = 1
        input_ids = torch.from_numpy(ids).view(1, -1).to(model.device)
        # a cache without the config's layer types keeps every token in every
        # layer (a sliding layer's own would keep its window); the model's
        # masks still apply the window, so the forward pass is the same
        out = _forward(model, input_ids, DynamicCache(), **extra)
    finally:
        for h in handles:
            h.remove()
    cache = _output_cache(out)
    keys = [layer.keys for layer in cache.layers]
    attention = moments = None
    with torch.no_grad():
        if attns and all(captured.get(li) for li in range(len(attns))):
            probes = [
                _probe_attention(attn, *captured[li], keys[li])
                for li, attn in enumerate(attns)
            ]
            attention = torch.stack([mass for mass, _ in probes])
            moments = torch.stack([m for _, m in probes])
        norms = torch.stack([k.float().norm(dim=-1).sum(dim=(0, 1)) for k in keys])
    stats = TokenStats(
        attention=None if attention is None else attention.cpu().double().numpy(),
        key_norms=norms.cpu().double().numpy(),
        query_moments=None if moments is None else moments.cpu().double().numpy(),
    )
    return cache, stats, out.logits[:, -1].float()


# ----------------------------------------------------------------------------
# Greedy continuation from a card


def _eos_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}


def _hf_generate(
    model,
    cache,
    prompt: np.ndarray,
    *,
    max_tokens: int,
    eos,
    sampling: SamplingOptions = GREEDY,
    tokenizer=None,
    on_text=None,
    started: float | None = None,
) -> Generation:
    """transformers' own ``model.generate`` after ``cache`` (None: empty), the
    cache holding a prefix of ``prompt``; tokens streamed through a streamer
    (TTFT, tokens/s, ``on_text`` with the tokenizer's text)."""
    torch = _torch()
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    check_max_tokens(max_tokens)
    tic = time.perf_counter() if started is None else started
    gen = Generation(tokens=[])
    times = []

    class _Collect(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # transformers first puts the prompt
                self.prompt_seen = True
                return
            times.append(time.perf_counter())
            token = int(value.reshape(-1)[0])
            gen.tokens.append(token)
            if on_text is not None and tokenizer is not None:
                on_text(tokenizer.decode([token]))

        def end(self):
            pass

    eos = sorted(eos)
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=not sampling.greedy,
        temperature=sampling.temp if not sampling.greedy else None,
        top_p=sampling.top_p or None,
        min_p=sampling.min_p or None,
        top_k=sampling.top_k or None,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    ids = torch.from_numpy(np.ascontiguousarray(prompt)).view(1, -1).to(model.device)
    kwargs = {} if cache is None else {_cache_kwarg(model): cache}
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=_Collect(),
            **kwargs,
        )
    if gen.tokens and gen.tokens[-1] in eos:
        gen.tokens.pop()
        gen.finish_reason = "stop"
    if times:
        gen.ttft_ms = 1000 * (times[0] - tic)
        if len(times) > 1:
            gen.generation_tps = (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    if tokenizer is not None:
        gen.text = tokenizer.decode(gen.tokens)
    return gen


def hf_greedy_tokens(
    model, prompt_tokens, *, max_tokens: int = 64, eos=()
) -> list[int]:
    """Greedy continuation of a prompt without a card (the transformers baseline).

    Args:
        model: a transformers causal LM.
        prompt_tokens: (T,) token ids, prefilled from scratch.
        max_tokens: most tokens to generate.
        eos: token ids that stop decoding (not included in the result).
    """
    prompt = token_ids(prompt_tokens)
    return _hf_generate(model, None, prompt, max_tokens=max_tokens, eos=set(eos)).tokens


def continue_hf(
    card: CacheCard,
    model,
    tokenizer,
    prompt,
    *,
    max_tokens: int = 64,
    policy: str = "prefix",
    sampling: SamplingOptions = GREEDY,
    on_text=None,
    allow_other_weights: bool = False,
) -> Generation:
    """Generate after ``prompt`` with the card as the prefix cache (transformers).

    The prompt is aligned with the card's tokens by the rule the MLX receiver
    uses (:func:`qkvshare_mlx.align.plan_reuse`): the cache is cropped to the
    reused tokens and ``model.generate`` feeds the rest. When the prompt *is*
    the card's tokens, the last token is re-fed, to get the logits that pick
    the first new token.

    Args:
        card: the card (checked against the model and tokenizer).
        model: the receiving transformers causal LM.
        tokenizer: its tokenizer (fingerprint, EOS id, text), or None: no
            tokenizer check and no early stop.
        prompt: the receiver's full prompt ids (or text, with a tokenizer).
        max_tokens: most tokens to generate.
        policy: ``"prefix"`` (reuse the common prefix) or ``"strict"`` (the
            prompt must start with every card token).
        sampling: greedy by default; temperature, top-p, min-p, top-k, seed.
        on_text: called with each new token's text (streaming).
        allow_other_weights: accept a card made with other weights;
            ``info["weights"]`` says how they compared.

    Returns:
        A :class:`~qkvshare_mlx.generation.Generation` (the same type the
        MLX receiver returns).

    Raises:
        PromptMismatchError: (strict) the prompt does not start with the
            card's tokens.
        ModelMismatchError: the card was made for another model or tokenizer.
    """
    ids = prompt_ids(tokenizer, prompt)
    tic = time.perf_counter()
    n_reuse, rest = plan_reuse(card.tokens, ids, policy=policy)
    if tokenizer is not None:
        card.check_model(
            fingerprint(model, tokenizer), allow_other_weights=allow_other_weights
        )
    cache = card_to_dynamic_cache(card, model, allow_other_weights=allow_other_weights)
    if n_reuse < card.n_tokens:
        cache.crop(n_reuse - card.n_tokens)  # transformers 5: tokens to drop, < 0
    inject_ms = 1000 * (time.perf_counter() - tic)
    gen = _hf_generate(
        model,
        cache,
        ids[: n_reuse + len(rest)],
        max_tokens=max_tokens,
        eos=_eos_ids(tokenizer),
        sampling=sampling,
        tokenizer=tokenizer,
        on_text=on_text,
        started=tic,
    )
    gen.n_reused, gen.n_prefilled = n_reuse, len(rest)
    gen.info = {
        "mode": "dequantize",
        "cache_class": type(cache).__name__,
        "inject_ms": inject_ms,
        "weights": weights_status(card.model, fingerprint(model)),
    }
    return gen


__all__ = [
    "cache_arrays",
    "card_to_dynamic_cache",
    "continue_hf",
    "dynamic_cache_to_card",
    "hf_greedy_tokens",
    "hf_prefill",
    "key_norm_stats",
]
