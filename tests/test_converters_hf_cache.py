"""The transformers side of a handoff, without MLX: cards <-> DynamicCache.

A tiny random-weight Llama in transformers only (conftest's ``tiny_hf``:
head_dim 64, so every group size of the format menu fits). Cross-runtime
checks with the MLX twin live in test_cross_runtime.py.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import WIDE_HEAD_CONFIG, element_steps, tiny_llama
from transformers import DynamicCache

from qkvshare_converters.hf_cache import (
    card_to_dynamic_cache,
    continue_hf,
    dynamic_cache_to_card,
    hf_prefill,
)
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import (
    CacheShapeError,
    ModelMismatchError,
    PromptMismatchError,
)
from qkvshare_mlx.fingerprint import fingerprint
from qkvshare_mlx.formats import QuantConfig

FLOAT32 = QuantConfig(float_dtype="float32")  # width 16 = a lossless fp32 copy


def hf_variant(attn="sdpa", **overrides):
    """The :func:`tiny_hf` weights (torch seed 0) under another config or attention."""
    return tiny_llama(
        {**WIDE_HEAD_CONFIG, **overrides},
        runtimes=("hf",),
        init="torch",
        attn_implementation=attn,
    ).hf_model


@pytest.fixture(scope="module")
def model(tiny_hf):
    return tiny_hf


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, WIDE_HEAD_CONFIG["vocab_size"], n)


def hf_greedy(model, ids, n):
    """transformers' own greedy generate over the full prompt (no early stop)."""
    out = model.generate(
        input_ids=torch.tensor(ids).view(1, -1),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def float_card(model, ids):
    cache, stats, _ = hf_prefill(model, ids)
    return dynamic_cache_to_card(
        cache, ids, model, controller="uniform", budget_bits=32, config=FLOAT32
    ), cache


# ----------------------------------------------------------------------------
# Fingerprint, prefill statistics


def test_fingerprint_reads_transformers5_rope_parameters(model):
    fp = fingerprint(model)
    assert "rope_theta" not in model.config.to_dict()  # nested in rope_parameters
    assert fp["rope_theta"] == 10000.0 and fp["rope_scaling"] is None
    assert (fp["n_layers"], fp["n_kv_heads"], fp["head_dim"]) == (2, 2, 64)


def test_probe_attention_equals_eager_attention_weights(model):
    ids, P = tokens(40), 8
    _, stats, _ = hf_prefill(model, ids, probe_queries=P)
    eager = hf_variant(attn="eager")
    with torch.no_grad():
        out = eager(torch.tensor(ids).view(1, -1), output_attentions=True)
    ref = np.stack(
        [a[0, :, -P:].sum(dim=(0, 1)).double().numpy() for a in out.attentions]
    )
    n_heads = WIDE_HEAD_CONFIG["num_attention_heads"]
    assert stats.attention.shape == (2, 40)
    np.testing.assert_allclose(stats.attention.sum(axis=1), n_heads * P, rtol=1e-5)
    np.testing.assert_allclose(stats.attention, ref, atol=1e-5)
    # causal: the last keys are seen by few probe queries
    assert (stats.attention[:, 40 - P + 1 :] < ref.max()).all()


# ----------------------------------------------------------------------------
# Cards in and out of DynamicCache


def test_float32_card_round_trip_is_bit_exact(model):
    ids = tokens(50)
    card, cache = float_card(model, ids)
    assert card.width_histogram() == {16: 2 * 50}
    back = card_to_dynamic_cache(CacheCard.from_bytes(card.to_bytes()), model)
    assert isinstance(back, DynamicCache) and back.get_seq_length() == 50
    for a, b in zip(cache.layers, back.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("extra", [0, 5])
def test_continue_hf_equals_transformers_generate(model, extra):
    ids = tokens(40 + extra, seed=1)
    card, _ = float_card(model, ids[:40])
    got = continue_hf(card, model, None, ids, max_tokens=24).tokens
    assert got == hf_greedy(model, ids, 24)


def test_injected_cache_works_with_generate(model):
    ids = tokens(30, seed=2)
    card, _ = float_card(model, ids[:25])
    cache = card_to_dynamic_cache(card, model)
    out = model.generate(
        input_ids=torch.tensor(ids).view(1, -1),
        cache=cache,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[0, 30:].tolist() == hf_greedy(model, ids, 8)


def test_prompt_must_start_with_card_tokens(model):
    ids = tokens(20, seed=3)
    card, _ = float_card(model, ids)
    other = ids.copy()
    other[7] = (other[7] + 1) % WIDE_HEAD_CONFIG["vocab_size"]
    with pytest.raises(PromptMismatchError, match="position 7"):
        continue_hf(card, model, None, other, policy="strict")
    with pytest.raises(PromptMismatchError, match="card.s 20 tokens"):
        continue_hf(card, model, None, ids[:10], policy="strict")
    # prefix (the default in both runtimes): reuse the common part, as MLX does
    assert continue_hf(card, model, None, other, max_tokens=6).tokens == hf_greedy(
        model, other, 6
    )


@pytest.mark.parametrize(
    "overrides", [{"num_hidden_layers": 3}, {"head_dim": 32}, {"rope_theta": 5e5}]
)
def test_card_for_another_model_is_refused(model, overrides):
    card, _ = float_card(model, tokens(16))
    other = hf_variant(**overrides)
    with pytest.raises(ModelMismatchError, match=next(iter(overrides)).split("_")[-1]):
        card_to_dynamic_cache(card, other)
    with pytest.raises(ModelMismatchError):
        continue_hf(card, other, None, tokens(16))


# ----------------------------------------------------------------------------
# Quantized cards: the logit error is bounded by the quantization step


def _next_logits(model, kv, token):
    cache = DynamicCache(config=model.config)
    for li in range(len(kv) // 2):
        cache.update(kv[2 * li], kv[2 * li + 1], li)
    out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
    return out.logits[0, -1]


def test_quantized_card_logits_within_first_order_bound(model):
    """|logit_j(K^, V^) - logit_j(K, V)| <= sum_i |d logit_j / d x_i| * step_i / 2.

    The numpy codec rounds to nearest, so every cached element moves by at
    most half its group's step; to first order the logit error is then at
    most the Jacobian-weighted sum of half steps (computed with autograd at
    the exact cache). A factor 1.5 covers the second-order remainder.
    """
    ids = tokens(80, seed=4)  # 64 tokens of per-channel keys + a per-token tail
    cache, _, _ = hf_prefill(model, ids)
    exact = tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
    nxt = 17
    ref = _next_logits(model, exact, nxt)
    jac = torch.autograd.functional.jacobian(
        lambda *kv: _next_logits(model, kv, nxt), exact
    )
    errors = {}
    for bits in (8, 4):
        cfg = QuantConfig(widths=(bits,), adaptive_groups=False)
        card = dynamic_cache_to_card(
            cache, ids, model, controller="uniform", budget_bits=bits + 0.5, config=cfg
        )
        assert card.width_histogram() == {bits: 2 * 80}
        back = card_to_dynamic_cache(card, model)
        kv = tuple(t for layer in back.layers for t in (layer.keys, layer.values))
        got = _next_logits(model, kv, nxt)
        steps = [s for layer in card.layers for s in element_steps(layer, 80)]
        bound = sum(
            (j.abs() * torch.from_numpy(s / 2)).flatten(1).sum(dim=1)
            for j, s in zip(jac, steps)
        )
        err = (got - ref).abs()
        assert (err <= 1.5 * bound + 1e-5).all(), float((err / bound).max())
        errors[bits] = float(err.max())
    # steps shrink 17x from 4 to 8 bits (15 vs 255 levels); ask for 4x
    assert 0 < errors[8] < errors[4] / 4


def test_saliency_card_from_probe_attention_meets_budget(model):
    ids = tokens(96, seed=5)
    cache, stats, _ = hf_prefill(model, ids)
    card = dynamic_cache_to_card(
        cache,
        ids,
        model,
        tokenizer=None,
        budget_bits=4.5,
        stats=stats,
        user={"role": "sender"},
    )
    assert card.producer["runtime"] == "transformers"
    assert card.effective_bits <= 4.5 + 0.02
    assert len(card.width_histogram()) > 1  # saliency mixes widths
    back = CacheCard.from_bytes(card.to_bytes(), expect=fingerprint(model))
    assert back.user == {"role": "sender"}
    # no attention statistics: saliency falls back to key norms, with a notice
    from qkvshare_mlx.quant.controllers import NoAttentionStatsWarning

    with pytest.warns(NoAttentionStatsWarning, match="key norms"):
        fallback = dynamic_cache_to_card(cache, ids, model, controller="saliency")
    assert fallback.effective_bits <= 4.5 + 0.02


def test_cache_must_cover_the_tokens(model):
    ids = tokens(12)
    cache, _, _ = hf_prefill(model, ids)
    with pytest.raises(CacheShapeError, match="12 tokens"):
        dynamic_cache_to_card(
            cache, ids[:11], model, controller="uniform", budget_bits=4.5
        )


# ----------------------------------------------------------------------------
# No MLX on the transformers side


NO_MLX = """
import sys

# A None entry makes `import mlx` raise ImportError and find_spec report it
# missing, as on a machine without MLX.
sys.modules["mlx"] = sys.modules["mlx_lm"] = None
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from qkvshare_converters import hf_cache
from qkvshare_mlx.card import CacheCard

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=100,
)).eval()
ids = np.arange(40) % 100
cache, stats, _ = hf_cache.hf_prefill(model, ids)
card = hf_cache.dynamic_cache_to_card(cache, ids, model, stats=stats)
card = CacheCard.from_bytes(card.to_bytes())
back = hf_cache.card_to_dynamic_cache(card, model)
assert back.get_seq_length() == 40
print(hf_cache.continue_hf(card, model, None, ids, max_tokens=3).tokens)
assert not [m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm")
            and sys.modules[m] is not None]
print("ok")
"""


def test_transformers_side_never_imports_mlx():
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_MLX)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_prefill_without_probe_gives_key_norms_only(model):
    ids = tokens(70, seed=6)
    cache, stats, logits = hf_prefill(model, ids, probe_queries=0)
    assert stats.attention is None and stats.key_norms.shape == (2, 70)
    keys = cache.layers[1].keys
    torch.testing.assert_close(
        torch.from_numpy(stats.key_norms[1]).float(), keys.norm(dim=-1).sum(dim=(0, 1))
    )
    with torch.no_grad():
        ref = model(torch.tensor(ids).view(1, -1)).logits[:, -1]
    torch.testing.assert_close(logits, ref)
    card = dynamic_cache_to_card(
        cache, ids, model, controller="saliency-keynorm", budget_bits=4.0, stats=stats
    )
    assert card.effective_bits <= 4.0 + 0.02
