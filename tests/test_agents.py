"""Agent chains on a tiny random Llama: handoff modes, hop stability."""

import copy

import pytest
from conftest import tiny_chain

from qkvshare_mlx import agents as A
from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig


def test_exact_and_lossless_card_equal_reprefill(tiny):
    base = tiny_chain(tiny, A.Handoff("reprefill"), finals=(1, 3))
    exact = tiny_chain(tiny, A.Handoff("exact"), finals=(1, 3))
    lossless = A.Handoff("uniform", 32.0, QuantConfig(float_dtype="float32"))
    card = tiny_chain(tiny, lossless, finals=(1, 3))
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
    run = tiny_chain(tiny, A.Handoff("saliency", 3.0), hops=4, save_cards=tmp_path)
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
    run = tiny_chain(tiny, A.Handoff("uniform", 4.0), hops=2)
    first = run.cards[0]
    last = copy.deepcopy(run.cards[1])  # inherited segments share arrays
    codes = last.layers[0][0].values.codes
    codes[(0,) * codes.ndim] ^= 1  # flip one code bit of a hop-1 token
    assert not A.inherited_bits_identical(first, last)


def test_handoff_validates():
    with pytest.raises(ConfigError, match="handoff mode"):
        A.Handoff("bogus")
    with pytest.raises(ConfigError, match="budget_bits"):
        A.Handoff("uniform")


def test_handoff_names_carry_the_rotation():
    h = A.Handoff.named("saliency+hadamard", 3.0)
    assert h.mode == "saliency" and h.config.rotation == "hadamard"
    assert h.name == "saliency+hadamard" and h.label == "saliency+hadamard@3.0"
    assert A.Handoff.named("uniform", 4.0).name == "uniform"
    s = A.Handoff.named("saliency+hadamard+split", 4.5)
    assert s.config.split_kv and s.config.rotation == "hadamard"
    assert s.name == "saliency+hadamard+split"
    assert A.Handoff.named("uniform+split", 4.5).name == "uniform+split"
    m = A.Handoff.named("saliency+hadamard+split+prerope+min3", 4.5)
    assert m.config.widths == (3, 4, 5, 6, 8, 16)
    assert m.name == "saliency+hadamard+split+prerope+min3"
    assert A.Handoff.named(m.name, 4.5) == m
    assert A.Handoff.named("uniform+min2", 4.5).name == "uniform"  # the default
    for bad in (
        "saliency+spin",
        "bogus+hadamard",
        "saliency+hadamard+none",
        "saliency+min3+min4",
        "saliency+min7",
    ):
        with pytest.raises(ConfigError):
            A.Handoff.named(bad, 3.0)


def test_layer_weighted_handoff_names_and_profiles(tiny, monkeypatch):
    from qkvshare_mlx.sensitivity import LayerSensitivity

    h = A.Handoff.named("saliency+hadamard+split+prerope+min3+lw", 4.5)
    assert h.layer_weighted and h.name.endswith("+min3+lw")
    assert A.Handoff.named(h.name, 4.5) == h
    with pytest.raises(ConfigError, match="lw"):
        A.Handoff.named("saliency+lw+lw", 4.5)
    # no profile ships for the tiny test model's architecture
    with pytest.raises(ConfigError, match="no layer sensitivity profile ships"):
        h.card_sensitivity(tiny)
    prof = LayerSensitivity(((2.0, 1.0),) * len(tiny.layers))
    monkeypatch.setattr(A, "shipped_profile", lambda model: prof)
    assert h.card_sensitivity(tiny) is prof
    given = A.Handoff("saliency", 4.5, sensitivity=prof)
    assert given.name == "saliency+lw" and given.card_sensitivity(tiny) is prof
    assert A.Handoff("saliency", 4.5).card_sensitivity(tiny) is None
    # the cards are made with the profile: keys weighed 2x take bits from
    # the values (split K/V lets them differ), against the same chain unweighted
    plain = A.Handoff.named("saliency+hadamard+split+prerope+min3", 4.5)

    def key_share(card):
        qkv = card.to_quantized()
        bits = [
            sum(getattr(s, half).payload_bits() for layer in qkv.layers for s in layer)
            for half in ("keys", "values")
        ]
        return bits[0] / sum(bits)

    runs = [tiny_chain(tiny, x, hops=2) for x in (h, plain)]
    assert all(r.cards[-1].n_tokens > r.cards[0].n_tokens for r in runs)
    assert key_share(runs[0].cards[0]) > key_share(runs[1].cards[0])


def test_pre_rope_chain_keeps_hop1_codes(tiny):
    """Keys before RoPE along a chain: version-4 cards, one key_rope, the
    hop-1 codes identical in the last card, the name round-trips."""
    from qkvshare_mlx.rope import from_mlx_model

    h = A.Handoff.named("saliency+hadamard+split+prerope", 4.5)
    assert h.pre_rope and h.name == "saliency+hadamard+split+prerope"
    assert A.Handoff.named(h.name, 4.5) == h
    with pytest.raises(ConfigError, match="prerope"):
        A.Handoff.named("saliency+prerope+prerope", 4.5)
    assert A.Handoff.named("uniform+prerope", 4.5).card_config(tiny).key_rope
    # a config that already holds a KeyRope names it too
    held = A.Handoff("uniform", 4.5, QuantConfig(key_rope=from_mlx_model(tiny)))
    assert held.name == "uniform+prerope"
    run = tiny_chain(tiny, h, hops=3)
    want = from_mlx_model(tiny)
    assert all(c.version == 4 and c.qkv.config.key_rope == want for c in run.cards)
    assert A.inherited_bits_identical(run.cards[0], run.cards[-1])


def test_rotated_chain_keeps_hop1_codes(tiny):
    """A rotated handoff runs a whole chain; inherited codes stay identical."""
    run = tiny_chain(tiny, A.Handoff.named("saliency+hadamard", 4.0), hops=3)
    assert all(c.quant["config"]["rotation"] == "hadamard" for c in run.cards)
    assert A.inherited_bits_identical(run.cards[0], run.cards[-1])
