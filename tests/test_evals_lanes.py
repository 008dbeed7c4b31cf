"""Several chains decoded as one batch on a tiny random Llama."""

import pytest
from conftest import CHAIN_TASK, TinyChat, tiny_agents, tiny_chain
from mlx_lm.models.cache import make_prompt_cache

from qkvshare_mlx.agents import Handoff, generate
from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.evals.lanes import generate_lanes, run_chains
from qkvshare_mlx.formats import QuantConfig


def test_batched_lanes_match_single_chains(tiny):
    """run_chains decodes several handoffs as one batch; each lane's
    transcript equals its own unbatched run_chain (lanes diverge freely)."""
    middle, answerer = tiny_agents(3)
    handoffs = [
        Handoff("exact"),
        Handoff("reprefill"),
        Handoff("uniform", 32.0, QuantConfig(float_dtype="float32")),
        Handoff("uniform", 3.0),
    ]
    task = CHAIN_TASK
    runs = run_chains(
        tiny, None, TinyChat(), task, middle, answerer, handoffs, finals=(1, 3)
    )
    assert len(runs) == len(handoffs)
    first = tiny_chain(tiny, Handoff("exact"), hops=1).reply_ids(0)
    again = run_chains(
        tiny,
        None,
        TinyChat(),
        task,
        middle,
        answerer,
        handoffs,
        finals=(1, 3),
        first_reply=first,
    )
    for a, b in zip(runs, again):  # agent 0's reply given: same chains
        assert a.tokens == b.tokens and a.finals[3] == b.finals[3] | {
            "ttft_s": a.finals[3]["ttft_s"]
        }
    for handoff, run in zip(handoffs, runs):
        single = tiny_chain(tiny, handoff, finals=(1, 3))
        assert run.tokens == single.tokens, handoff.label
        assert run.replies == single.replies
        assert run.replies == single.replies
        for h in (1, 3):
            assert run.finals[h]["reply"] == single.finals[h]["reply"]
        if handoff.uses_cards:
            assert [c["effective_bits"] for c in run.hops] == [
                c["effective_bits"] for c in single.hops
            ]


def test_generate_lanes_trims_each_lane_to_its_transcript(tiny):
    prompts = [[1, 5, 9, 13], [1, 7], [1, 4, 4, 4, 4, 4, 8]]
    todo = [(make_prompt_cache(tiny), p, 0) for p in prompts]
    replies, caches, _ = generate_lanes(tiny, todo, max_tokens=5, eos={0})
    for p, reply, cache in zip(prompts, replies, caches):
        single, _ = generate(tiny, make_prompt_cache(tiny), p, 0, max_tokens=5, eos={0})
        assert reply == single
        assert cache[0].offset in (len(p) + len(reply) - 1, len(p) + len(reply))
    with pytest.raises(ConfigError):
        generate_lanes(tiny, [(make_prompt_cache(tiny), [1, 2], 2)], max_tokens=2)
