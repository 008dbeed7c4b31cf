"""Teacher-forced replay of cards along an exact chain on a tiny random Llama."""

from conftest import tiny_chain

from qkvshare_mlx.agents import Handoff
from qkvshare_mlx.evals.replay import exact_prefill, reference_logits, replay_cards
from qkvshare_mlx.formats import QuantConfig


def test_teacher_forced_replay(tiny):
    ref = tiny_chain(tiny, Handoff("exact"), hops=4, finals=(1, 2, 4))
    pre = exact_prefill(tiny, ref.tokens, probe_until=ref.replies[0][1])
    logits = {h: reference_logits(tiny, pre, ref, h) for h in (1, 2, 4)}
    lossless = Handoff("uniform", 32.0, QuantConfig(float_dtype="float32"))
    exact = replay_cards(tiny, None, ref, lossless, (1, 2, 4), pre, logits)
    low = replay_cards(tiny, None, ref, Handoff("uniform", 3.0), (1, 2, 4), pre, logits)
    for h in (1, 2, 4):
        assert exact[h]["kl"] < 1e-6 and exact[h]["top1_agreement"] == 1.0
        assert low[h]["kl"] > exact[h]["kl"]
        assert low[h]["hop1_bits_identical"] in (True, None)
        assert abs(low[h]["effective_bits"] - 3.0) < 0.05
        # one logit row per answerer reply token, plus the one after it
        assert logits[h].shape[0] == len(ref.finals[h]["reply"]) + 1
    assert low[4]["hop1_bits_identical"] is True  # checked at the deepest hop
