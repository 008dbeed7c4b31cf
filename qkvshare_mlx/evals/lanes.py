"""Several agent chains in lockstep, their replies decoded as one batch.

:func:`run_chains` runs :func:`qkvshare_mlx.agents.run_chain`'s steps for
several handoffs at once (one lane each), so the weights are read once per
decoded token for every configuration of a problem. The module knows how to
batch greedy decoding with mlx-lm's ``BatchKVCache``; what a chain is and how
context is handed on is ``qkvshare_mlx.agents``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, trim_prompt_cache

from ..agents import (
    Agent,
    ChainRun,
    Handoff,
    add_reply,
    answerer_cache,
    hand_on,
    receiver_cache,
)
from ..card import CacheCard
from ..chat import ChatFormat
from ..errors import ConfigError


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
    """``agents.run_chain`` for several handoffs at once, decoded as one batch.

    Every handoff gets its own chain (lane) over the same agents and task;
    at each agent the lanes' replies are generated together by
    :func:`generate_lanes` (lanes whose transcripts diverged simply carry
    different caches). Cards, inheritance and ``topology`` plans are as in
    ``run_chain``. Batched greedy decoding can differ from batch-1
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
            ln.cache, ln.cached = receiver_cache(
                model, ln.handoff, k, ln.cache, ln.card
            )
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
            add_reply(ln.run, reply, ttft, k)
            ln.card = hand_on(
                model, tokenizer, ln.run, ln.handoff, ln.card, k, n_hops, None
            )
        if k + 1 in finals:
            todo = []
            for ln in lanes:
                prompt = ln.run.tokens + chat.turn(answerer.instruction)
                cache, n = answerer_cache(
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
