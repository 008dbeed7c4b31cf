"""Agent chains on a tiny random Llama: handoff modes, hop stability, metrics."""

import argparse
import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LLAMA_CONFIG, build_tiny_llama_twins

from qkvshare_mlx import agents as A
from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig

# head_dim 32: the fixture's 16 is below the quantizer's smallest group
CONFIG = {**TINY_LLAMA_CONFIG, "head_dim": 32, "hidden_size": 128}


class TinyChat:
    """ChatFormat's interface over made-up token ids (the tiny model has no
    tokenizer): each turn is a fixed marker, then the instruction's ids."""

    eos = set()

    @staticmethod
    def _ids(text):
        return [3 + (ord(ch) % 90) for ch in text]

    def opening(self, task, instruction):
        return [1, *self._ids(task), 2, *self._ids(instruction), 2]

    def turn(self, instruction):
        return [2, *self._ids(instruction), 2]

    def text(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama_twins(seed=1, config=CONFIG).mlx_model


def _agents(hops, n=6):
    middle = [A.Agent(f"a{k}", f"step {k}", max_tokens=n) for k in range(hops)]
    return middle, A.Agent("answer", "answer now", max_tokens=n)


def _chain(model, handoff, hops=3, finals=None, **kw):
    middle, answerer = _agents(hops)
    return A.run_chain(
        model,
        None,
        TinyChat(),
        "a task of some length to make a context",
        middle,
        answerer,
        handoff,
        finals=finals,
        **kw,
    )


def test_exact_and_lossless_card_equal_reprefill(tiny):
    base = _chain(tiny, A.Handoff("reprefill"), finals=(1, 3))
    exact = _chain(tiny, A.Handoff("exact"), finals=(1, 3))
    lossless = A.Handoff("uniform", 32.0, QuantConfig(float_dtype="float32"))
    card = _chain(tiny, lossless, finals=(1, 3))
    for run in (exact, card):
        assert run.tokens == base.tokens
        assert run.replies == base.replies
        for h in (1, 3):
            assert run.finals[h]["reply"] == base.finals[h]["reply"]
            assert run.finals[h]["prompt"] == base.finals[h]["prompt"]
    # the transcript is built by appending: every agent's prompt extends the last
    for k in range(1, 3):
        end = base.replies[k - 1][1]
        assert base.finals[3]["prompt"][:end] == base.tokens[:end]
    assert [h["effective_bits"] for h in card.hops] == [32.0] * 3


def test_hop_stability_bit_exact_after_four_hops(tiny, tmp_path):
    run = _chain(tiny, A.Handoff("saliency", 3.0), hops=4, save_cards=tmp_path)
    assert len(run.cards) == 4
    for later in run.cards[1:]:
        assert A.inherited_bits_identical(run.cards[0], later)
    for prev, nxt in zip(run.cards, run.cards[1:]):
        assert A.inherited_bits_identical(prev, nxt)
        assert nxt.n_tokens > prev.n_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"hop{k}.qkv" for k in range(1, 5)
    ]


def test_bit_identity_check_detects_a_change(tiny):
    run = _chain(tiny, A.Handoff("uniform", 4.0), hops=2)
    first = run.cards[0]
    last = copy.deepcopy(run.cards[1])  # inherited segments share arrays
    codes = last.layers[0][0].values.codes
    codes[(0,) * codes.ndim] ^= 1  # flip one code bit of a hop-1 token
    assert not A.inherited_bits_identical(first, last)


def test_teacher_forced_replay(tiny):
    ref = _chain(tiny, A.Handoff("exact"), hops=4, finals=(1, 2, 4))
    pre = A.exact_prefill(tiny, ref.tokens, probe_until=ref.replies[0][1])
    logits = {h: A.reference_logits(tiny, pre, ref, h) for h in (1, 2, 4)}
    lossless = A.Handoff("uniform", 32.0, QuantConfig(float_dtype="float32"))
    exact = A.replay_cards(tiny, None, ref, lossless, (1, 2, 4), pre, logits)
    low = A.replay_cards(
        tiny, None, ref, A.Handoff("uniform", 3.0), (1, 2, 4), pre, logits
    )
    for h in (1, 2, 4):
        assert exact[h]["kl"] < 1e-6 and exact[h]["top1_agreement"] == 1.0
        assert low[h]["kl"] > exact[h]["kl"]
        assert low[h]["hop1_bits_identical"] in (True, None)
        assert abs(low[h]["effective_bits"] - 3.0) < 0.05
        # one logit row per answerer reply token, plus the one after it
        assert logits[h].shape[0] == len(ref.finals[h]["reply"]) + 1
    assert low[4]["hop1_bits_identical"] is True  # checked at the deepest hop


def test_first_divergence_and_numeric_match():
    assert A.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert A.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert A.first_divergence([1, 2, 3], [1, 2]) == 2
    assert A.first_divergence([], [4]) == 0
    assert A.numeric_match("18", "18.0")
    assert A.numeric_match("-3", "-3")
    assert not A.numeric_match("18", "81")
    assert not A.numeric_match(None, "1")


def test_handoff_and_roles_validate():
    with pytest.raises(ConfigError, match="handoff mode"):
        A.Handoff("bogus")
    with pytest.raises(ConfigError, match="budget_bits"):
        A.Handoff("uniform")
    middle, answerer = A.gsm8k_agents(4)
    assert [a.role for a in middle] == ["solver", "checker", "calculator", "solver"]
    assert "####" in answerer.instruction
    with pytest.raises(ConfigError):
        A.gsm8k_agents(0)


def _bench():
    from qkvshare_mlx.cli import eval as evaluation

    return evaluation


def test_bench_state_resumes(tmp_path):
    bench = _bench()
    path = tmp_path / "state.jsonl"
    state = bench.State(path)
    rows = [
        {
            "kind": "tf",
            "problem": 0,
            "mode": "uniform",
            "budget_bits": 3,
            "hops": 1,
            "kl": 0.5,
        },
        {
            "kind": "gen",
            "problem": 0,
            "mode": "exact",
            "budget_bits": None,
            "hops": 4,
            "correct": True,
        },
    ]
    for r in rows:
        state.add(r)
    with open(path, "a") as f:  # a line cut short by a kill
        f.write(json.dumps(rows[0])[:20])
    again = bench.State(path)
    assert ("tf", 0, "uniform", 3.0, 1) in again  # budgets compare as floats
    assert ("gen", 0, "exact", None, 4) in again
    assert ("tf", 1, "uniform", 3.0, 1) not in again
    assert len(again.rows) == 2
    # only problems with a complete grid are aggregated
    part = [{"problem": 0}, {"problem": 0}, {"problem": 1}]
    assert [r["problem"] for r in bench.complete(part, 2)] == [0, 0]


def test_bench_state_gzip_resumes(tmp_path):
    """A .gz state: one member per row; a member cut by a kill is dropped and
    the next row appended after it reads back; damage mid-file is refused."""
    bench = _bench()
    path = tmp_path / "state.jsonl.gz"
    row = {"kind": "tf", "problem": 0, "mode": "uniform", "budget_bits": 3, "hops": 1}
    bench.State(path).add(row)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a member cut short by a kill
        f.write(gzip.compress(json.dumps({**row, "problem": 1}).encode())[:15])
    again = bench.State(path)
    assert list(again.rows) == [("tf", 0, "uniform", 3.0, 1)]
    assert path.read_bytes() == whole
    again.add({**row, "problem": 2})
    assert ("tf", 2, "uniform", 3.0, 1) in bench.State(path)
    assert gzip.decompress(path.read_bytes()).decode().count("\n") == 2
    broken = bytearray(path.read_bytes())
    broken[12] ^= 0xFF  # inside the first member's deflate data
    path.write_bytes(bytes(broken))
    with pytest.raises(ConfigError, match="corrupt at byte 0"):
        bench.State(path)
    assert path.read_bytes() == bytes(broken)


def test_bench_state_gzip_many_members(tmp_path):
    """Many appended members straddle the reader's chunk boundaries and all
    read back; a cut tail is still dropped at its member boundary."""
    bench = _bench()
    path = tmp_path / "state.jsonl.gz"
    row = {"kind": "tf", "problem": 0, "mode": "uniform", "budget_bits": 3, "hops": 1}
    state = bench.State(path)
    for i in range(400):
        state.add({**row, "problem": i, "pad": "x" * (i % 37)})
    assert path.stat().st_size > 3 * bench._GZIP_CHUNK
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(gzip.compress(json.dumps({**row, "problem": 400}).encode())[:-4])
    again = bench.State(path)
    assert sorted(k[1] for k in again.rows) == list(range(400))
    assert again.rows[("tf", 399, "uniform", 3.0, 1)]["pad"] == "x" * (399 % 37)
    assert path.read_bytes() == whole


def test_ref_rows_round_trip():
    bench = _bench()
    run = A.ChainRun(tokens=[1, 2, 3, 4], replies=[(2, 4)])
    run.finals = {
        1: {"prompt": [1, 2, 3, 4, 5], "reply": [6], "text": "6", "ttft_s": 0.1}
    }
    back = bench.row_to_ref(json.loads(json.dumps(bench.ref_to_row(0, run, 1))))
    assert back.tokens == run.tokens and back.replies == run.replies
    assert back.finals[1]["reply"] == [6] and back.reply_ids(0) == [3, 4]
    assert np.isclose(back.finals[1]["ttft_s"], 0.1)


def test_batched_lanes_match_single_chains(tiny):
    """run_chains decodes several handoffs as one batch; each lane's
    transcript equals its own unbatched run_chain (lanes diverge freely)."""
    middle, answerer = _agents(3)
    handoffs = [
        A.Handoff("exact"),
        A.Handoff("reprefill"),
        A.Handoff("uniform", 32.0, QuantConfig(float_dtype="float32")),
        A.Handoff("uniform", 3.0),
    ]
    task = "a task of some length to make a context"
    runs = A.run_chains(
        tiny, None, TinyChat(), task, middle, answerer, handoffs, finals=(1, 3)
    )
    assert len(runs) == len(handoffs)
    first = _chain(tiny, A.Handoff("exact"), hops=1).reply_ids(0)
    again = A.run_chains(
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
        single = _chain(tiny, handoff, finals=(1, 3))
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
    todo = [(A.make_prompt_cache(tiny), p, 0) for p in prompts]
    replies, caches, _ = A.generate_lanes(tiny, todo, max_tokens=5, eos={0})
    for p, reply, cache in zip(prompts, replies, caches):
        single, _ = A.generate(
            tiny, A.make_prompt_cache(tiny), p, 0, max_tokens=5, eos={0}
        )
        assert reply == single
        assert cache[0].offset in (len(p) + len(reply) - 1, len(p) + len(reply))
    with pytest.raises(ConfigError):
        A.generate_lanes(tiny, [(A.make_prompt_cache(tiny), [1, 2], 2)], max_tokens=2)


def test_bench_report_averages_complete_problems(tmp_path):
    """report(): rows average only problems whose grid is complete; the
    table, the JSON and both plots are written."""
    bench = _bench()
    state = bench.State(tmp_path / "state.jsonl")
    state.add(
        {
            "kind": "meta",
            "problem": -1,
            "mode": "command",
            "budget_bits": None,
            "hops": 0,
            "command": "cmd",
        }
    )
    kls = {0: 0.2, 1: 0.4, 2: 9.0}  # problem 2 stays partial
    for i, kl in kls.items():
        for c in ("uniform", "saliency"):
            for h in (1, 2):
                if i == 2 and h == 2:
                    continue
                state.add(
                    {
                        "kind": "tf",
                        "problem": i,
                        "mode": c,
                        "budget_bits": 3.0,
                        "hops": h,
                        "kl": kl * h + (c == "saliency"),
                        "top1_agreement": 1.0 - kl,
                        "tokens": 10 * h,
                        "effective_bits": 3.0,
                        "payload_bytes": 100,
                        "fp16_bytes": 500,
                        "hop1_bits_identical": (h > 1) or None,
                        "seconds": 1.0,
                    }
                )
    args = argparse.Namespace(
        hops=[1, 2],
        budgets=[3.0],
        controllers=["uniform", "saliency"],
        gen_hops=[],
        gen_controllers=[],
        json=str(tmp_path / "out.json"),
        quick=False,
    )
    res = bench.report(state, args, {"model": "m", "dtype": "float32", "machine": "x"})
    rows = {(r["controller"], r["hops"]): r for r in res["rows"]}
    assert set(rows) == {(c, h) for c in ("uniform", "saliency") for h in (1, 2)}
    assert all(r["problems"] == 2 for r in rows.values())
    assert np.isclose(rows["uniform", 2]["kl"], (0.4 + 0.8) / 2)
    assert np.isclose(rows["saliency", 1]["kl"], (1.2 + 1.4) / 2)
    assert np.isclose(rows["uniform", 1]["top1_agreement"], 0.7)
    assert rows["uniform", 2]["hop1_bits_identical"] is True
    assert rows["uniform", 1]["hop1_bits_identical"] is None
    assert res["tf_problems"] == 2 and res["commands"] == ["cmd"]
    md = (tmp_path / "out.md").read_text()
    assert "| uniform | 3.0 | 2 | 3.000 | 0.6000 |" in md
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == res["rows"]
    for p in res["plots"]:
        assert Path(p).stat().st_size > 1000


def test_handoff_names_carry_the_rotation():
    h = A.Handoff.named("saliency+hadamard", 3.0)
    assert h.mode == "saliency" and h.config.rotation == "hadamard"
    assert h.name == "saliency+hadamard" and h.label == "saliency+hadamard@3.0"
    assert A.Handoff.named("uniform", 4.0).name == "uniform"
    for bad in ("saliency+spin", "bogus+hadamard"):
        with pytest.raises(ConfigError):
            A.Handoff.named(bad, 3.0)


def test_rotated_chain_keeps_hop1_codes(tiny):
    """A rotated handoff runs a whole chain; inherited codes stay identical."""
    run = _chain(tiny, A.Handoff.named("saliency+hadamard", 4.0), hops=3)
    assert all(c.quant["config"]["rotation"] == "hadamard" for c in run.cards)
    assert A.inherited_bits_identical(run.cards[0], run.cards[-1])
