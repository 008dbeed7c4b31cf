"""The high-level handoff API (handoff): make_card, continue_from_card."""

import numpy as np
import pytest
from conftest import prefill_card as card_of

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import PromptMismatchError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.handoff import continue_from_card, greedy_tokens, make_card

FLOAT32 = QuantConfig(float_dtype="float32")


@pytest.fixture(scope="module")
def model(tiny_mlx):
    return tiny_mlx


@pytest.mark.parametrize("mode", ["dequantize", "compressed"])
def test_float32_card_continues_like_no_handoff(model, ids, mode):
    card, _ = card_of(model, ids)
    prompt = list(ids) + [5, 6, 7]
    want = greedy_tokens(model, prompt, max_tokens=32)
    gen = continue_from_card(card, model, None, prompt, mode=mode, max_tokens=32)
    assert gen.tokens == want and len(gen.tokens) == 32
    assert gen.n_reused == len(ids) and gen.n_prefilled == 3
    assert gen.finish_reason == "length" and gen.ttft_ms > 0
    assert gen.info["cache_class"] == (
        "KVCache" if mode == "dequantize" else "MixedQuantizedKVCache"
    )


def test_make_card_inherits_segments_bit_for_bit(model, ids):
    first = make_card(model, None, ids[:64], controller="saliency", budget_bits=4.5)
    assert first.n_tokens == 64 and first.quant["controller"] == "saliency"
    second = make_card(
        model, None, ids[:100], controller="saliency", budget_bits=3.5, inherited=first
    )
    assert second.n_tokens == 100
    for la, lb in zip(first.layers, second.layers, strict=True):
        for sa, sb in zip(la, lb[: len(la)], strict=True):
            np.testing.assert_array_equal(sa.index, sb.index)
            for ea, eb in ((sa.keys, sb.keys), (sa.values, sb.values)):
                for name, arr in ea.arrays().items():
                    np.testing.assert_array_equal(arr, eb.arrays()[name])
    with pytest.raises(PromptMismatchError):
        make_card(model, None, ids[1:100], inherited=first)


def test_head_dim_80_takes_lossless_and_padded_quantized_cards():
    from conftest import TINY_LLAMA_CONFIG, tiny_llama

    from qkvshare_mlx.errors import ConfigError
    from qkvshare_mlx.formats import QuantConfig

    model = tiny_llama({**TINY_LLAMA_CONFIG, "head_dim": 80}).mlx_model
    toks = list(range(1, 41))
    lossless = QuantConfig(float_dtype="float32")
    card = make_card(
        model, None, toks, controller="uniform", budget_bits=32, config=lossless
    )
    prompt = toks + [7, 8]
    got = continue_from_card(card, model, None, prompt, max_tokens=12)
    assert got.tokens == greedy_tokens(model, prompt, max_tokens=12)
    # quantized: per-token rows padded to 96 in groups of 32 (version 3)
    card = make_card(model, None, toks, budget_bits=4.5)
    assert card.version == 3 and card.effective_bits <= 4.52
    assert any(s.values.dim == 80 for layer in card.layers for s in layer)
    back = CacheCard.from_bytes(card.to_bytes())
    assert continue_from_card(back, model, None, prompt, max_tokens=4).tokens
    # a configured group another size would divide is not padded
    fixed = QuantConfig(group_size=64, key_group=64, adaptive_groups=False)
    model96 = tiny_llama({**TINY_LLAMA_CONFIG, "head_dim": 96}).mlx_model
    with pytest.raises(ConfigError, match=r"head dims \(96, 96\).*only lossless"):
        make_card(model96, None, toks, budget_bits=4.5, config=fixed)
