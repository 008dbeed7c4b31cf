"""Agents in a chain, each handing its context to the next one.

An :class:`Agent` is a role and an instruction. A chain runs agents 0..N-1
(the "middle" agents) and then a final agent (the answerer); hop ``k`` is the
handoff from agent ``k`` to agent ``k+1``. Each agent appends one user turn
(its instruction; agent 0's turn also carries the task) and its own greedy
reply, through the chat template, so the token sequence an agent sees is a
prefix of the next agent's (:class:`ChatFormat` builds the turns as token
pieces, never by re-tokenizing earlier text).

A :class:`Handoff` says how the context travels:

- ``reprefill``: as text; the receiver prefills the whole transcript (baseline);
- ``exact``: the sender's full-precision cache, in memory, no card;
- a controller name (``uniform``, ``saliency``, ``topology``, ...) with a bit
  budget: a CacheCard. Agent ``k``'s card inherits agent ``k-1``'s (tokens
  quantized at an earlier hop keep their codes); ``topology`` gets
  ``HandoffPlan(hops_remaining=N-1-k)``.

:func:`run_chain` generates for real at every hop and can branch the
answerer after several hop counts from one chain (agents are shared: the
4-hop chain's first agent is the 1-hop chain's). Its steps
(:func:`receiver_cache`, :func:`add_reply`, :func:`hand_on`,
:func:`answerer_cache`) are public so that other drivers of the same chain
(the batched lanes of the GSM8K study) take the same steps.

The module knows nothing about any task or benchmark: the GSM8K study (its
roles, batched lanes, teacher-forced replay and report) lives in
``qkvshare_mlx.evals``, which this module never imports. It prints nothing
and writes files only where ``save_cards`` asks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import generation
from .capture import Prefill
from .card import CacheCard
from .chat import ChatFormat
from .dtypes import mx_name
from .errors import ConfigError
from .fingerprint import fingerprint, layer_windows
from .formats import ALL_BITS, CODE_BITS, QuantConfig, widths_from
from .handoff import make_card
from .inject import inject
from .models import model_dtype
from .quant.controllers import CONTROLLERS, HandoffPlan, with_sensitivity
from .quant.mlx_backend import quantize_cache
from .quant.numpy_backend import decode_layer
from .sensitivity import LayerSensitivity, shipped_profile

TEXT_MODES = ("reprefill", "exact")
_NO_PROBE = ("uniform", "sink-recent")


@dataclass(frozen=True)
class Agent:
    """One agent: a role name, the instruction it adds, its reply length."""

    role: str
    instruction: str
    max_tokens: int = 48


@dataclass(frozen=True)
class Handoff:
    """How context travels between agents.

    Attributes:
        mode: ``"reprefill"``, ``"exact"`` or a controller name.
        budget_bits: bit budget of the cards (controllers only).
        config: quantizer settings of the cards.
        pre_rope: quantize the keys before RoPE (``QuantConfig.key_rope``,
            read from the sending model when a card is made).
        sensitivity: the model's layer sensitivity (a
            :class:`~qkvshare_mlx.sensitivity.LayerSensitivity`), weighing
            each layer's errors; None: every layer alike.
        layer_weighted: weigh them by the profile shipped for the sending
            model's architecture (:func:`~qkvshare_mlx.sensitivity.shipped_profile`),
            found when a card is made (``sensitivity`` wins when both are set).
    """

    mode: str
    budget_bits: float | None = None
    config: QuantConfig | None = None
    pre_rope: bool = False
    sensitivity: LayerSensitivity | None = None
    layer_weighted: bool = False

    def __post_init__(self):
        if self.mode not in TEXT_MODES and self.mode not in CONTROLLERS:
            raise ConfigError(
                f"handoff mode must be one of {list(TEXT_MODES) + list(CONTROLLERS)}"
                f" but got {self.mode!r}"
            )
        if self.mode not in TEXT_MODES and self.budget_bits is None:
            raise ConfigError(f"handoff mode {self.mode!r} needs budget_bits")

    @classmethod
    def named(cls, name: str, budget_bits: float | None = None) -> Handoff:
        """A handoff from its :attr:`name`: a mode, optionally with a
        rotation suffix, ``+split`` (keys may take more bits than values),
        ``+prerope`` (keys quantized before RoPE), ``+min<b>`` (no token
        below ``b`` code bits) and ``+lw`` (layers weighted by the shipped
        sensitivity profile): ``"saliency+hadamard"``,
        ``"saliency+hadamard+split+prerope+min3+lw"``."""
        mode, *extras = name.split("+")
        mins = [e for e in extras if re.fullmatch(r"min\d", e)]
        flags = ("split", "prerope", "lw")
        rotations = [e for e in extras if e not in flags and e not in mins]
        if (
            len(rotations) > 1
            or len(mins) > 1
            or any(extras.count(f) > 1 for f in flags)
        ):
            raise ConfigError(
                f"handoff name {name!r}: expected "
                "mode[+rotation][+split][+prerope][+min<bits>][+lw]"
            )
        if not extras:
            return cls(mode, budget_bits)
        config = QuantConfig(
            rotation=rotations[0] if rotations else "none",
            split_kv="split" in extras,
            widths=widths_from(int(mins[0][3:])) if mins else ALL_BITS,
        )
        return cls(
            mode,
            budget_bits,
            config,
            pre_rope="prerope" in extras,
            layer_weighted="lw" in extras,
        )

    def card_sensitivity(self, model) -> LayerSensitivity | None:
        """:attr:`sensitivity`, or with :attr:`layer_weighted` the profile
        shipped for ``model``'s architecture."""
        if self.sensitivity is not None or not self.layer_weighted:
            return self.sensitivity
        prof = shipped_profile(model)
        if prof is None:
            raise ConfigError(
                "handoff +lw: no layer sensitivity profile ships for this "
                "model's architecture (make one with qkvshare calibrate)"
            )
        return prof

    def card_config(self, model) -> QuantConfig | None:
        """:attr:`config` for cards of ``model`` (its RoPE with :attr:`pre_rope`)."""
        if not self.pre_rope:
            return self.config
        from .rope import from_mlx_model  # ~1 ms a layer: no need to keep it

        return replace(self.config or QuantConfig(), key_rope=from_mlx_model(model))

    @property
    def name(self) -> str:
        """The mode, plus ``+<rotation>`` when the cards are rotated,
        ``+split`` when keys and values may differ in width, ``+prerope``
        for keys before RoPE, ``+min<b>`` when no token gets fewer than
        ``b`` code bits and ``+lw`` for layer-weighted errors (the shipped
        profile or a given :attr:`sensitivity`; :meth:`named` reads ``+lw``
        back as the shipped one)."""
        c = self.config
        out = self.mode
        if c is not None and c.rotation != "none":
            out += f"+{c.rotation}"
        if c is not None and c.split_kv:
            out += "+split"
        if self.pre_rope or (c is not None and c.key_rope is not None):
            out += "+prerope"
        low = None if c is None else min(c.widths)
        if low is not None and low in CODE_BITS and low > min(CODE_BITS):
            if tuple(c.widths) == widths_from(low):
                out += f"+min{low}"
        if self.layer_weighted or self.sensitivity is not None:
            out += "+lw"
        return out

    @property
    def uses_cards(self) -> bool:
        return self.mode not in TEXT_MODES

    @property
    def label(self) -> str:
        return self.name if not self.uses_cards else f"{self.name}@{self.budget_bits}"


# ----------------------------------------------------------------------------
# Generation with a cache


def kv_cache(keys, values, n: int | None = None) -> list[KVCache]:
    """mlx-lm caches holding the first ``n`` tokens of (B, H, T, D) K/V."""
    out = []
    for k, v in zip(keys, values):
        c = KVCache()
        c.state = (k[..., :n, :], v[..., :n, :], k[..., :n, :].shape[2])
        out.append(c)
    return out


def generate(
    model, cache: list, tokens: list[int], rest_from: int, *, max_tokens: int, eos=()
) -> tuple[list[int], float]:
    """Greedy continuation of ``tokens`` whose first ``rest_from`` are cached.

    :func:`qkvshare_mlx.generation.generate` (mlx-lm's ``generate_step``);
    the cache is left holding exactly ``tokens`` plus the generated ids.

    Returns:
        ``(generated ids without EOS, time to first token in seconds)``.
    """
    gen = generation.generate(
        model,
        None,
        tokens[rest_from:],
        prompt_cache=cache,
        max_tokens=max_tokens,
        eos=eos,
    )
    return gen.tokens, gen.ttft_ms / 1000


# ----------------------------------------------------------------------------
# Cards along a chain


def hop_card(
    model,
    tokenizer,
    tokens,
    handoff: Handoff,
    *,
    inherited=None,
    plan=None,
    pre: Prefill | None = None,
    user=None,
) -> CacheCard:
    """A card over ``tokens`` (inheriting ``inherited``'s segments).

    ``pre`` is an exact prefill of ``tokens`` to reuse at the first hop
    (saves re-prefilling the shared opening for every configuration).
    """
    if inherited is None and pre is not None:
        n = len(tokens)
        fp = fingerprint(model, tokenizer)
        qkv = quantize_cache(
            [k[..., :n, :] for k in pre.keys],
            [v[..., :n, :] for v in pre.values],
            controller=handoff.mode,
            budget_bits=handoff.budget_bits,
            config=handoff.card_config(model),
            stats=with_sensitivity(
                pre.stats, handoff.card_sensitivity(model), n_layers=len(pre.keys)
            ),
            plan=plan,
            windows=layer_windows(fp),  # as make_card trims
        )
        dtype = mx_name(model_dtype(model))  # as make_card records it
        return CacheCard.from_quantized(qkv, tokens, fp, dtype=dtype, user=user)
    return make_card(
        model,
        tokenizer,
        tokens,
        controller=handoff.mode,
        budget_bits=handoff.budget_bits,
        config=handoff.card_config(model),
        plan=plan,
        inherited=inherited,
        user=user,
        # controllers that ignore attention skip the probe
        probe_queries=0 if handoff.mode in _NO_PROBE else 32,
        sensitivity=handoff.card_sensitivity(model),
    )


def inherited_bits_identical(first: CacheCard, later: CacheCard) -> bool:
    """Whether ``later`` holds ``first``'s tokens with bit-identical K/V."""
    n = first.n_tokens
    if later.n_tokens < n or not np.array_equal(later.tokens[:n], first.tokens):
        return False
    for a, b in zip(first.layers, later.layers):
        ka, va = decode_layer(a, n)
        kb, vb = decode_layer(b, later.n_tokens)
        if not (np.array_equal(ka, kb[:, :, :n]) and np.array_equal(va, vb[:, :, :n])):
            return False
    return True


def card_info(card: CacheCard) -> dict:
    """A card's row in :attr:`ChainRun.hops`: tokens, effective bits, bytes."""
    return {
        "tokens": card.n_tokens,
        "effective_bits": card.effective_bits,
        "payload_bytes": card.payload_bytes,
        "fp16_bytes": card.fp16_bytes,
    }


# ----------------------------------------------------------------------------
# The chain


@dataclass
class ChainRun:
    """What a chain produced.

    Attributes:
        tokens: the middle agents' transcript ids (every turn and reply).
        replies: per middle agent, ``(start, end)`` of its reply in ``tokens``.
        finals: per hop count ``h``: the answerer's ``prompt`` ids (the
            transcript through agent ``h-1``'s reply plus the answer turn),
            its ``reply`` ids, ``text`` and ``ttft_s``.
        hops: per handoff, card info (tokens, effective bits, bytes) and the
            receiver's ``ttft_s``.
        cards: the cards handed on (card modes only).
        wall_s: total seconds.
    """

    tokens: list[int]
    replies: list[tuple[int, int]] = field(default_factory=list)
    finals: dict = field(default_factory=dict)
    hops: list[dict] = field(default_factory=list)
    cards: list = field(default_factory=list)
    wall_s: float = 0.0

    def reply_ids(self, k: int) -> list[int]:
        s, e = self.replies[k]
        return self.tokens[s:e]


def run_chain(
    model,
    tokenizer,
    chat: ChatFormat,
    task: str,
    agents: list[Agent],
    answerer: Agent,
    handoff: Handoff,
    *,
    finals=None,
    save_cards: str | Path | None = None,
    first_reply: list[int] | None = None,
) -> ChainRun:
    """Run middle agents then the answerer after each hop count in ``finals``.

    Args:
        model, tokenizer: the mlx-lm model shared by the agents (the
            tokenizer only fingerprints cards; may be None).
        chat: builds the turns.
        task: the problem text given to agent 0.
        agents: the middle agents (N = len(agents) handoffs at most).
        answerer: the final agent.
        handoff: how context travels.
        finals: hop counts after which the answerer runs (default ``(N,)``);
            each must be in 1..N. ``topology`` plans for N hops.
        save_cards: a folder to write each hop's card to (``hop<k>.qkv``).
        first_reply: agent 0's reply if already known (it does not depend
            on the handoff: nothing has been handed over yet).

    Returns:
        A :class:`ChainRun`.
    """
    tic = time.perf_counter()
    n_hops = len(agents)
    finals = tuple(finals or (n_hops,))
    if not agents or any(not 1 <= h <= n_hops for h in finals):
        raise ConfigError(f"finals must be in 1..{len(agents)} but got {finals}")
    eos = chat.eos
    run = ChainRun(tokens=chat.opening(task, agents[0].instruction))
    cache, card = None, None  # exact: the running full-precision cache
    for k, agent in enumerate(agents):
        # 1. agent k's prompt (its user turn) and the context it received
        if k > 0:
            run.tokens = run.tokens + chat.turn(agent.instruction)
        toks = run.tokens
        cache, cached = receiver_cache(model, handoff, k, cache, card)
        # 2. its reply (agent 0's does not depend on the handoff)
        if k == 0 and first_reply is not None:
            reply, ttft = list(first_reply), None
            if handoff.mode == "exact":
                model(mx.array(toks + reply)[None], cache=cache)
        else:
            reply, ttft = generate(
                model, cache, toks, cached, max_tokens=agent.max_tokens, eos=eos
            )
        add_reply(run, reply, ttft, k)
        # 3. hand on: agent k's card (its tokens quantized, earlier codes kept)
        card = hand_on(model, tokenizer, run, handoff, card, k, n_hops, save_cards)
        # 4. the answerer, if the chain ends here for some hop count
        if k + 1 in finals:
            run.finals[k + 1] = _answer(
                model, chat, run.tokens, answerer, handoff, cache=cache, card=card
            )
        if k + 1 == max(finals):
            break
    run.wall_s = time.perf_counter() - tic
    return run


def receiver_cache(model, handoff: Handoff, k: int, cache, card):
    """The context agent ``k`` starts from.

    Args:
        handoff: how context travels.
        k: the agent's index in the chain.
        cache: the running exact cache (``exact`` handoffs).
        card: card ``k-1`` (card handoffs).

    Returns:
        ``(cache, cached)``: the running exact cache (all its tokens valid),
        the injected card, or an empty cache (re-prefill), and how many
        tokens it holds.
    """
    if handoff.mode == "exact" and k > 0:
        return cache, cache[0].offset
    if handoff.uses_cards and k > 0:
        return inject(card, model, mode="dequantize"), card.n_tokens
    return make_prompt_cache(model), 0


def add_reply(run: ChainRun, reply: list[int], ttft, k: int) -> None:
    """Append agent ``k``'s reply to ``run``'s transcript.

    The reply's time to first token goes to hop ``k``'s row (the handoff
    agent ``k`` received).
    """
    if k > 0:
        run.hops[-1]["receiver_ttft_s"] = ttft
    run.replies.append((len(run.tokens), len(run.tokens) + len(reply)))
    run.tokens = run.tokens + list(reply)


def hand_on(model, tokenizer, run, handoff, card, k, n_hops, save_cards):
    """Hand agent ``k``'s context on: append hop ``k+1``'s row to ``run``.

    For card handoffs, the card over ``run.tokens`` (``card``'s codes kept,
    ``topology`` planned for the ``n_hops - 1 - k`` hops left) is made,
    appended to ``run.cards`` and written to ``save_cards`` if given.

    Returns:
        The card handed on (``card`` unchanged for text handoffs).
    """
    if not handoff.uses_cards:
        run.hops.append({"hop": k + 1, "tokens": len(run.tokens)})
        return card
    plan = HandoffPlan(hops_remaining=n_hops - 1 - k)
    card = hop_card(model, tokenizer, run.tokens, handoff, inherited=card, plan=plan)
    run.cards.append(card)
    run.hops.append({"hop": k + 1, **card_info(card)})
    if save_cards is not None:
        Path(save_cards).mkdir(parents=True, exist_ok=True)
        card.save(Path(save_cards) / f"hop{k + 1}.qkv")
    return card


def _answer(model, chat, tokens, answerer, handoff, *, cache, card) -> dict:
    """The answerer's reply after the sender's turn (the chain is not changed)."""
    prompt = tokens + chat.turn(answerer.instruction)
    n = cache[0].offset if handoff.mode == "exact" else 0
    cache, cached = answerer_cache(model, handoff, cache, n, card)
    reply, ttft = generate(
        model, cache, prompt, cached, max_tokens=answerer.max_tokens, eos=chat.eos
    )
    return {"prompt": prompt, "reply": reply, "text": chat.text(reply), "ttft_s": ttft}


def answerer_cache(model, handoff: Handoff, cache, cached: int, card):
    """The context the answerer starts from.

    Returns:
        ``(cache, cached)``: a fork of the running exact cache's first
        ``cached`` tokens (the chain may continue after this answer), the
        injected card, or an empty cache (re-prefill), and how many tokens
        it holds.
    """
    if handoff.mode == "exact":
        return kv_cache(
            [c.keys for c in cache], [c.values for c in cache], cached
        ), cached
    if handoff.uses_cards:
        return inject(card, model, mode="dequantize"), card.n_tokens
    return make_prompt_cache(model), 0
