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
4-hop chain's first agent is the 1-hop chain's). :func:`replay_cards` and
:func:`teacher_forced` are the cheap fidelity path: quantize hop by hop
along a reference transcript and score the final agent's next-token
distribution against the exact cache without generating.

The module knows nothing about GSM8K beyond :func:`gsm8k_agents`' wording;
it prints nothing and writes files only where ``save_cards`` asks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    make_prompt_cache,
    trim_prompt_cache,
)

from .capture import Prefill, fingerprint, prefill
from .card import CacheCard
from .codec import decode_layer
from .controllers import CONTROLLERS, HandoffPlan
from .errors import ConfigError
from .formats import QuantConfig
from .handoff import make_card
from .inject import inject
from .quantizer import quantize_cache

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
    """

    mode: str
    budget_bits: float | None = None
    config: QuantConfig | None = None

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
        rotation suffix (``"saliency+hadamard"``)."""
        mode, plus, rotation = name.partition("+")
        return cls(mode, budget_bits, QuantConfig(rotation=rotation) if plus else None)

    @property
    def name(self) -> str:
        """The mode, plus ``+<rotation>`` when the cards are rotated."""
        rotation = self.config.rotation if self.config is not None else "none"
        return self.mode if rotation == "none" else f"{self.mode}+{rotation}"

    @property
    def uses_cards(self) -> bool:
        return self.mode not in TEXT_MODES

    @property
    def label(self) -> str:
        return self.name if not self.uses_cards else f"{self.name}@{self.budget_bits}"


# ----------------------------------------------------------------------------
# GSM8K roles

_MIDDLE_ROLES = (
    ("solver", "Solve the problem step by step. Be brief."),
    ("checker", "Check the previous reasoning step by step and fix any mistake."),
    ("calculator", "Redo the arithmetic of the solution carefully."),
)
ANSWER_INSTRUCTION = (
    "Give only the final answer as a number, in the form '#### <number>'."
)


def gsm8k_agents(
    hops: int, *, middle_tokens: int = 48, answer_tokens: int = 32
) -> tuple[list[Agent], Agent]:
    """The documented GSM8K role sequence for a chain of ``hops`` handoffs.

    Middle agents cycle solver -> checker -> calculator -> solver ...; the
    answerer ends the chain. One hop: solver -> answerer.

    Returns:
        ``(middle_agents, answerer)`` with ``len(middle_agents) == hops``.
    """
    if hops < 1:
        raise ConfigError(f"hops must be >= 1 but got {hops}")
    middle = [
        Agent(*_MIDDLE_ROLES[k % len(_MIDDLE_ROLES)], max_tokens=middle_tokens)
        for k in range(hops)
    ]
    return middle, Agent("answerer", ANSWER_INSTRUCTION, max_tokens=answer_tokens)


# ----------------------------------------------------------------------------
# Chat turns as token pieces


class ChatFormat:
    """Builds a conversation's token ids one turn at a time.

    The chat template is rendered once around placeholder strings to learn
    the text before and after a user turn; turns are then tokenized alone
    and concatenated, and the assistant's own token ids are kept as they
    were generated. So each agent's prompt is exactly the previous prompt
    plus new ids (no re-tokenization drift).

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` or HF tokenizer with a chat
            template.
        shots: few-shot ``(question, answer)`` pairs shown before the task.
    """

    _U, _A = "\x00USER\x00", "\x00ASSISTANT\x00"

    def __init__(self, tokenizer, shots=()):
        self.tokenizer = tokenizer
        self.shots = list(shots)
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
        if not self.eos and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos = {tokenizer.eos_token_id}
        render = self._render
        one = render([("user", self._U)], True)
        two = render(
            [("user", self._U), ("assistant", self._A), ("user", self._U)], True
        )
        if not two.startswith(one.split(self._U)[0]) or two.count(self._U) != 2:
            raise ConfigError("chat template: expected a prefix-stable template")
        after_answer = two.split(self._A, 1)[1]
        self._between, self._after_user = after_answer.split(self._U)
        if not one.endswith(self._after_user):
            raise ConfigError(
                "chat template: expected the same generation prompt after every "
                f"user turn, got {self._after_user!r} and {one!r}"
            )

    def _render(self, turns, generation_prompt):
        messages = [{"role": r, "content": c} for r, c in turns]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def opening(self, task: str, instruction: str) -> list[int]:
        """Few-shot turns, then the task and the first agent's instruction."""
        turns = []
        for q, a in self.shots:
            turns += [("user", q), ("assistant", a)]
        turns.append(("user", f"{task}\n\n{instruction}"))
        return self._ids(self._render(turns, True))

    def turn(self, instruction: str) -> list[int]:
        """Close the previous assistant reply and open a user turn."""
        return self._ids(self._between + instruction + self._after_user)

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


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

    The cache is left holding exactly ``tokens`` plus the generated ids
    (mlx-lm computes one token ahead; the extra is trimmed).

    Returns:
        ``(generated ids without EOS, time to first token in seconds)``.
    """
    tic = time.perf_counter()
    out, ttft = [], None
    for token, _ in generate_step(
        mx.array(tokens[rest_from:]), model, prompt_cache=cache, max_tokens=max_tokens
    ):
        token = int(token)
        if ttft is None:
            ttft = time.perf_counter() - tic
        if token in eos:
            break
        out.append(token)
    keep = len(tokens) + len(out)
    if cache[0].offset > keep:
        trim_prompt_cache(cache, cache[0].offset - keep)
    return out, ttft


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
        qkv = quantize_cache(
            [k[..., :n, :] for k in pre.keys],
            [v[..., :n, :] for v in pre.values],
            controller=handoff.mode,
            budget_bits=handoff.budget_bits,
            config=handoff.config,
            stats=pre.stats,
            plan=plan,
        )
        return CacheCard.from_quantized(
            qkv, tokens, fingerprint(model, tokenizer), user=user
        )
    return make_card(
        model,
        tokenizer,
        tokens,
        controller=handoff.mode,
        budget_bits=handoff.budget_bits,
        config=handoff.config,
        plan=plan,
        inherited=inherited,
        user=user,
        # controllers that ignore attention skip the probe
        probe_queries=0 if handoff.mode in _NO_PROBE else 32,
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


def _card_info(card: CacheCard) -> dict:
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
        cache, cached = _received(model, handoff, k, cache, card)
        # 2. its reply (agent 0's does not depend on the handoff)
        if k == 0 and first_reply is not None:
            reply, ttft = list(first_reply), None
            if handoff.mode == "exact":
                model(mx.array(toks + reply)[None], cache=cache)
        else:
            reply, ttft = generate(
                model, cache, toks, cached, max_tokens=agent.max_tokens, eos=eos
            )
        _add_reply(run, reply, ttft, k)
        # 3. hand on: agent k's card (its tokens quantized, earlier codes kept)
        card = _hand_on(model, tokenizer, run, handoff, card, k, n_hops, save_cards)
        # 4. the answerer, if the chain ends here for some hop count
        if k + 1 in finals:
            run.finals[k + 1] = _answer(
                model, chat, run.tokens, answerer, handoff, cache=cache, card=card
            )
        if k + 1 == max(finals):
            break
    run.wall_s = time.perf_counter() - tic
    return run


def _received(model, handoff: Handoff, k: int, cache, card):
    """``(cache, cached)`` agent ``k`` starts from: the running exact cache
    (all its tokens valid), the injected card k-1, or nothing (re-prefill)."""
    if handoff.mode == "exact" and k > 0:
        return cache, cache[0].offset
    if handoff.uses_cards and k > 0:
        return inject(card, model, mode="dequantize"), card.n_tokens
    return make_prompt_cache(model), 0


def _add_reply(run: ChainRun, reply: list[int], ttft, k: int) -> None:
    """Append agent ``k``'s reply to the transcript (its TTFT to hop k's row)."""
    if k > 0:
        run.hops[-1]["receiver_ttft_s"] = ttft
    run.replies.append((len(run.tokens), len(run.tokens) + len(reply)))
    run.tokens = run.tokens + list(reply)


def _hand_on(model, tokenizer, run, handoff, card, k, n_hops, save_cards):
    """Agent ``k``'s card (its tokens quantized, ``card``'s codes kept), or
    just the hop's row for text handoffs; returns the card handed on."""
    if not handoff.uses_cards:
        run.hops.append({"hop": k + 1, "tokens": len(run.tokens)})
        return card
    plan = HandoffPlan(hops_remaining=n_hops - 1 - k)
    card = hop_card(model, tokenizer, run.tokens, handoff, inherited=card, plan=plan)
    run.cards.append(card)
    run.hops.append({"hop": k + 1, **_card_info(card)})
    if save_cards is not None:
        Path(save_cards).mkdir(parents=True, exist_ok=True)
        card.save(Path(save_cards) / f"hop{k + 1}.qkv")
    return card


def _answer(model, chat, tokens, answerer, handoff, *, cache, card) -> dict:
    """The answerer's reply after the sender's turn (the chain is not changed)."""
    prompt = tokens + chat.turn(answerer.instruction)
    n = cache[0].offset if handoff.mode == "exact" else 0
    cache, cached = _answerer_cache(model, handoff, cache, n, card)
    reply, ttft = generate(
        model, cache, prompt, cached, max_tokens=answerer.max_tokens, eos=chat.eos
    )
    return {"prompt": prompt, "reply": reply, "text": chat.text(reply), "ttft_s": ttft}


def _answerer_cache(model, handoff: Handoff, cache, cached: int, card):
    """``(cache, cached)`` the answerer starts from: a fork of the running
    exact cache's first ``cached`` tokens (the chain may continue after this
    answer), the injected card, or nothing (re-prefill)."""
    if handoff.mode == "exact":
        return kv_cache(
            [c.keys for c in cache], [c.values for c in cache], cached
        ), cached
    if handoff.uses_cards:
        return inject(card, model, mode="dequantize"), card.n_tokens
    return make_prompt_cache(model), 0


# ----------------------------------------------------------------------------
# Several chains in lockstep, decoded as one batch


@dataclass
class _Lane:
    handoff: Handoff
    run: ChainRun
    cache: list | None = None  # exact lanes: the running full-precision cache
    cached: int = 0
    card: CacheCard | None = None


def generate_lanes(
    model, lanes: list[tuple[list, list[int], int]], *, max_tokens: int, eos=()
) -> tuple[list[list[int]], list[list], float]:
    """Greedy continuations of several prompts, decoded as one batch.

    Each lane is ``(cache, tokens, cached)``: an mlx-lm prompt cache holding
    the first ``cached`` of ``tokens``. Each lane's uncached tokens but the
    last are prefilled on their own (batch 1); then the caches are merged
    into mlx-lm ``BatchKVCache`` s (left padding) and all lanes decode
    together: the weights are read once per step for every lane.

    Returns:
        ``(replies, caches, ttft_s)``: per lane the generated ids (EOS
        excluded) and an mlx-lm ``KVCache`` list holding a prefix of
        ``tokens + reply`` (its ``offset`` says how much); the time to the
        first token of the whole batch.
    """
    tic = time.perf_counter()
    last = []
    for cache, tokens, cached in lanes:
        if not 0 <= cached < len(tokens):
            raise ConfigError(
                f"lane: expected 0 <= cached < len(tokens), got {cached} and "
                f"{len(tokens)}"
            )
        if len(tokens) - cached > 1:
            model(mx.array(tokens[cached:-1])[None], cache=cache)
        last.append(tokens[-1])
    batch = [
        BatchKVCache.merge([lane[0][i] for lane in lanes])
        for i in range(len(lanes[0][0]))
    ]
    y = mx.array(last)[:, None]
    out = [[] for _ in lanes]
    live = [True] * len(lanes)
    ttft = None
    for _ in range(max_tokens):
        logits = model(y, cache=batch)[:, -1, :]
        nxt = mx.argmax(logits, axis=-1)
        ids = nxt.tolist()
        if ttft is None:
            ttft = time.perf_counter() - tic
        for b, t in enumerate(ids):
            if live[b]:
                if t in eos:
                    live[b] = False
                else:
                    out[b].append(t)
        if not any(live):
            break
        y = nxt[:, None].astype(mx.int32)
    caches = []
    for b, (_, tokens, _) in enumerate(lanes):
        lane_cache = [c.extract(b) for c in batch]
        keep = len(tokens) + len(out[b])
        if lane_cache[0].offset > keep:  # fed past this lane's EOS
            trim_prompt_cache(lane_cache, lane_cache[0].offset - keep)
        caches.append(lane_cache)
    return out, caches, ttft


def run_chains(
    model,
    tokenizer,
    chat: ChatFormat,
    task: str,
    agents: list[Agent],
    answerer: Agent,
    handoffs: list[Handoff],
    *,
    finals=None,
    first_reply: list[int] | None = None,
) -> list[ChainRun]:
    """:func:`run_chain` for several handoffs at once, decoded as one batch.

    Every handoff gets its own chain (lane) over the same agents and task;
    at each agent the lanes' replies are generated together by
    :func:`generate_lanes` (lanes whose transcripts diverged simply carry
    different caches). Cards, inheritance and ``topology`` plans are as in
    :func:`run_chain`. Batched greedy decoding can differ from batch-1
    decoding by float rounding; include an ``exact`` lane to measure that
    against an unbatched reference.

    Returns:
        One :class:`ChainRun` per handoff; ``ttft_s`` values are the batch's.
    """
    tic = time.perf_counter()
    n_hops = len(agents)
    finals = tuple(finals or (n_hops,))
    if not agents or not handoffs or any(not 1 <= h <= n_hops for h in finals):
        raise ConfigError(
            f"need agents, handoffs and finals in 1..{len(agents)}; got "
            f"{len(agents)} agents, {len(handoffs)} handoffs, finals {finals}"
        )
    opening = chat.opening(task, agents[0].instruction)
    lanes = [_Lane(h, ChainRun(tokens=list(opening))) for h in handoffs]
    for k, agent in enumerate(agents):
        for ln in lanes:
            if k > 0:
                ln.run.tokens = ln.run.tokens + chat.turn(agent.instruction)
            ln.cache, ln.cached = _received(model, ln.handoff, k, ln.cache, ln.card)
        if k == 0 and first_reply is not None:
            replies, ttft = [list(first_reply)] * len(lanes), None
            for ln in lanes:
                if ln.handoff.mode == "exact":
                    ln.cached = len(ln.run.tokens) + len(first_reply)
                    model(mx.array(ln.run.tokens + first_reply)[None], cache=ln.cache)
        else:
            todo = [(ln.cache, ln.run.tokens, ln.cached) for ln in lanes]
            replies, caches, ttft = generate_lanes(
                model, todo, max_tokens=agent.max_tokens, eos=chat.eos
            )
            for ln, c in zip(lanes, caches):
                ln.cache, ln.cached = c, c[0].offset
        for ln, reply in zip(lanes, replies):
            _add_reply(ln.run, reply, ttft, k)
            ln.card = _hand_on(
                model, tokenizer, ln.run, ln.handoff, ln.card, k, n_hops, None
            )
        if k + 1 in finals:
            todo = []
            for ln in lanes:
                prompt = ln.run.tokens + chat.turn(answerer.instruction)
                cache, n = _answerer_cache(
                    model, ln.handoff, ln.cache, ln.cached, ln.card
                )
                todo.append((cache, prompt, n))
            replies, _, ttft = generate_lanes(
                model, todo, max_tokens=answerer.max_tokens, eos=chat.eos
            )
            for ln, (_, prompt, _), reply in zip(lanes, todo, replies):
                ln.run.finals[k + 1] = {
                    "prompt": prompt,
                    "reply": reply,
                    "text": chat.text(reply),
                    "ttft_s": ttft,
                }
        if k + 1 == max(finals):
            break
    wall = time.perf_counter() - tic
    for ln in lanes:
        ln.run.wall_s = wall
    return [ln.run for ln in lanes]


# ----------------------------------------------------------------------------
# Teacher-forced fidelity along a reference transcript


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
            m.update(_card_info(card))
            # checked at the deepest hop only (decoding every card is slow)
            m["hop1_bits_identical"] = (
                inherited_bits_identical(first, card) if h == max(finals) else None
            )
            m["seconds"] = time.perf_counter() - tic
            out[h] = m
    return out


# ----------------------------------------------------------------------------
# Generation metrics


def first_divergence(reference, candidate) -> int | None:
    """Index of the first differing token; None when the sequences are equal.

    A sequence that is a strict prefix of the other diverges at its length.
    """
    n = min(len(reference), len(candidate))
    for i in range(n):
        if reference[i] != candidate[i]:
            return i
    return None if len(reference) == len(candidate) else n


def numeric_match(predicted: str | None, gold: str | None) -> bool:
    """GSM8K exact match on normalized numbers ("18" == "18.0")."""
    if predicted is None or gold is None:
        return False
    try:
        return float(predicted) == float(gold)
    except ValueError:
        return predicted == gold


def time_to_first_token(model, prompt: list[int], card: CacheCard | None = None):
    """Seconds from receiving the context to the first generated token.

    With a card: inject it, prefill the prompt tokens after it, sample one
    token. Without: prefill the whole prompt (the re-prefill baseline).

    Returns:
        ``(seconds, first token id)``.
    """
    tic = time.perf_counter()
    if card is None:
        cache, cached = make_prompt_cache(model), 0
    else:
        cache, cached = inject(card, model, mode="dequantize"), card.n_tokens
    token, _ = next(
        generate_step(
            mx.array(prompt[cached:]), model, prompt_cache=cache, max_tokens=1
        )
    )
    token = int(token)
    return time.perf_counter() - tic, token
