"""Model families in both runtimes: one checkpoint (transformers draws the
weights and saves them; mlx-lm loads the folder), 16-bit cards MLX -> MLX,
MLX -> transformers and transformers -> MLX, each against the receiver's own
prefill, and cards refused across families."""

import json

import numpy as np
import pytest
from conftest import _random_weights_torch, assert_inherits

from qkvshare_converters.hf_cache import (
    continue_hf,
    dynamic_cache_to_card,
    hf_greedy_tokens,
    hf_prefill,
)
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import ModelMismatchError
from qkvshare_mlx.fingerprint import fingerprint
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.handoff import continue_from_card, greedy_tokens, make_card

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,  # (Phi-3's default, 32000, is past this vocabulary)
}
FAMILIES = {
    "llama": {"model_type": "llama", "head_dim": 32, "rope_theta": 10000.0},
    "llama-head80": {"model_type": "llama", "head_dim": 80, "rope_theta": 10000.0},
    "qwen2": {"model_type": "qwen2", "hidden_size": 128, "rope_theta": 1000000.0},
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0},
    "phi3": {"model_type": "phi3", "hidden_size": 128, "rope_theta": 10000.0},
    # rotates the first half of each head only (both runtimes, and the probes)
    "phi3-partial": {
        "model_type": "phi3",
        "hidden_size": 128,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    },
    # a window on the first layer only, so the second layer's cached keys
    # depend on it; the prompts (40, 48, 64 tokens) are longer than it
    "mistral-windows": {
        "model_type": "mistral",
        "head_dim": 32,
        "rope_theta": 10000.0,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}
LOSSLESS = QuantConfig(float_dtype="float32")


def _twins(family: str, folder):
    """(mlx-lm model, transformers model) with the same float32 weights."""
    import torch
    from mlx_lm.utils import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**BASE, **FAMILIES[family]}
    # the checkpoint's config.json, read the way transformers reads a
    # checkpoint: AutoConfig reads a "mistral" with layer_types as "ministral"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf = hf.to(torch.float32).eval()
    _random_weights_torch(hf)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
    # which transformers saves under its own name; mlx-lm reads the checkpoint's
    saved = json.loads((folder / "config.json").read_text())
    saved["model_type"] = spec["model_type"]
    (folder / "config.json").write_text(json.dumps(saved))
    mlx, _ = load_model(folder)
    return mlx, hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    mlx, hf = _twins(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, mlx, hf


def _ids(n, seed):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], n).tolist()


def test_one_checkpoint_one_fingerprint(family):
    _, mlx, hf = family
    assert fingerprint(mlx) == fingerprint(hf)


def test_lossless_mlx_card_continues_in_mlx_and_transformers(family):
    _, mlx, hf = family
    ids = _ids(40, 1)
    card = make_card(
        mlx, None, ids, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    card = CacheCard.from_bytes(card.to_bytes())
    prompt = ids + [3, 4, 5]
    got = continue_from_card(card, mlx, None, prompt, max_tokens=16).tokens
    assert got == greedy_tokens(mlx, prompt, max_tokens=16)
    got = continue_hf(card, hf, None, prompt, max_tokens=16).tokens
    assert got == hf_greedy_tokens(hf, prompt, max_tokens=16)


def test_lossless_transformers_card_continues_in_mlx(family):
    _, mlx, hf = family
    ids = _ids(40, 2)
    cache, _, _ = hf_prefill(hf, ids)
    card = dynamic_cache_to_card(
        cache, ids, hf, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    card = CacheCard.from_bytes(card.to_bytes())
    prompt = ids + [7, 8]
    got = continue_from_card(card, mlx, None, prompt, max_tokens=16).tokens
    assert got == greedy_tokens(mlx, prompt, max_tokens=16)


def _same_rope(a, b):
    """Two KeyRopes alike up to float32 rounding of the probed angles."""
    assert a.layers == b.layers and len(a.specs) == len(b.specs)
    for x, y in zip(a.specs, b.specs):
        assert (x.pairing, x.dims) == (y.pairing, y.dims)
        assert np.allclose(x.freqs, y.freqs, rtol=1e-6, atol=1e-9)


def _pre_rope_ways(mlx, hf, ids, prompt):
    """Lossless pre-RoPE cards both ways continue as each runtime's own."""
    from dataclasses import replace

    from qkvshare_converters.hf_cache import key_rope_of
    from qkvshare_mlx.rope import from_mlx_model

    kr_mlx, kr_hf = from_mlx_model(mlx), key_rope_of(hf)
    _same_rope(kr_mlx, kr_hf)
    kw = {"controller": "uniform", "budget_bits": 32}
    card = make_card(mlx, None, ids, config=replace(LOSSLESS, key_rope=kr_mlx), **kw)
    card = CacheCard.from_bytes(card.to_bytes())
    assert card.version == 4
    got = continue_hf(card, hf, None, prompt, max_tokens=12).tokens
    assert got == hf_greedy_tokens(hf, prompt, max_tokens=12)
    cache, _, _ = hf_prefill(hf, ids)
    config = replace(LOSSLESS, key_rope=kr_hf)
    card = CacheCard.from_bytes(
        dynamic_cache_to_card(cache, ids, hf, config=config, **kw).to_bytes()
    )
    got = continue_from_card(card, mlx, None, prompt, max_tokens=12).tokens
    assert got == greedy_tokens(mlx, prompt, max_tokens=12)
    return kr_mlx


def test_pre_rope_cards_go_both_ways(family):
    # each family's RoPE (partial for Phi-3, scaled, per head size) is read
    # alike in both runtimes, and keys stored before it come back exactly
    _, mlx, hf = family
    ids = _ids(40, 3)
    _pre_rope_ways(mlx, hf, ids, ids + [9, 10])


def test_cards_are_refused_across_families(family, tmp_path):
    name, mlx, _ = family
    other = "qwen3" if name != "qwen3" else "llama"
    other_mlx, _ = _twins(other, tmp_path / other)
    card = make_card(
        mlx, None, _ids(20, 3), controller="uniform", budget_bits=32, config=LOSSLESS
    )
    with pytest.raises(ModelMismatchError):
        continue_from_card(card, other_mlx, None, _ids(21, 3), max_tokens=2)


def test_every_family_is_probed_for_saliency(family):
    import warnings

    from qkvshare_mlx.capture import prefill

    name, mlx, _ = family
    pre = prefill(mlx, _ids(48, 4), probe_queries=8)
    assert pre.probe_queries == 8 and pre.stats.attention is not None
    # each probe query's softmax sums to one, for every query head
    heads = BASE["num_attention_heads"]
    np.testing.assert_allclose(pre.stats.attention.sum(axis=1), heads * 8, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key-norm fallback notice
        card = make_card(mlx, None, _ids(48, 4), budget_bits=4.5)
    assert card.effective_bits <= 4.52


def test_both_runtimes_probe_the_same_attention(family):
    """transformers' probe (a q_proj, or the query columns of Phi-3's fused
    qkv_proj; partial RoPE included) gives the MLX probe's statistics for
    the same weights and tokens, so saliency needs no key-norm fallback.

    Each (layer, token) entry sums 32 softmax probabilities (4 query heads x
    8 probes). The twins run the same float32 weights with other kernels and
    summation orders (their logits agree to ~1e-5), so a probability may
    move by a few 1e-6: atol 1e-4, against masses that sum to 32 over 48
    tokens. transformers' own eager weights are the same computation in the
    same runtime: atol 1e-5, as for the Llama probe (test_converters_hf_cache).
    """
    import warnings

    import torch

    from qkvshare_mlx.capture import prefill
    from qkvshare_mlx.quant.controllers import NoAttentionStatsWarning

    name, mlx, hf = family
    ids, P = _ids(48, 4), 8
    cache, stats, _ = hf_prefill(hf, ids, probe_queries=P)
    assert stats.attention is not None and stats.attention.shape == (2, 48)
    assert stats.attention.max() > 2 * stats.attention.mean()  # far from uniform
    mlx_attention = prefill(mlx, ids, probe_queries=P).stats.attention
    np.testing.assert_allclose(stats.attention, mlx_attention, atol=1e-4)
    # a sliding layer's eager attention also applies its window, which
    # neither probe does (both count the keys it dropped): full layers only
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    types = getattr(hf.config, "layer_types", None) or ["full_attention"] * 2
    full = [li for li, t in enumerate(types) if t != "sliding_attention"]
    assert full
    for li in full:
        ref = out.attentions[li][0, :, -P:].sum(dim=(0, 1)).double().numpy()
        np.testing.assert_allclose(stats.attention[li], ref, atol=1e-5)
    budget = 4.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoAttentionStatsWarning)
        card = dynamic_cache_to_card(cache, ids, hf, stats=stats, budget_bits=budget)
    assert card.effective_bits <= budget + 0.02


# ----------------------------------------------------------------------------
# Sliding-window layers (Gemma 3: five local layers, then a global one)

GEMMA3 = {
    **BASE,
    "model_type": "gemma3_text",
    "num_hidden_layers": 6,
    "head_dim": 32,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "sliding_window": 16,
    "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 32,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    FAMILIES["gemma3"] = {k: v for k, v in GEMMA3.items() if BASE.get(k) != v}
    try:
        return _twins("gemma3", tmp_path_factory.mktemp("gemma3"))
    finally:
        del FAMILIES["gemma3"]


@pytest.mark.parametrize("n", [12, 40], ids=["within", "past"])
def test_sliding_window_cards_go_every_way(gemma3, n):
    """Shorter and longer than the window (16; both runtimes keep 15)."""
    from qkvshare_mlx.inject import inject

    mlx, hf = gemma3
    assert fingerprint(mlx) == fingerprint(hf)
    assert fingerprint(mlx)["layer_types"] == ["sliding"] * 5 + ["full"]
    ids = _ids(n, 5)
    card = make_card(
        mlx, None, ids, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    cache = inject(card, mlx)
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache"] * 5 + ["KVCache"]
    assert cache[0].offset == n and cache[0].keys.shape[2] == min(n, 16)
    prompt = ids + [3]
    got = continue_from_card(card, mlx, None, prompt, max_tokens=16).tokens
    assert got == greedy_tokens(mlx, prompt, max_tokens=16)
    got = continue_hf(card, hf, None, prompt, max_tokens=16).tokens
    assert got == hf_greedy_tokens(hf, prompt, max_tokens=16)
    cache, _, _ = hf_prefill(hf, ids)
    hf_card = dynamic_cache_to_card(
        cache, ids, hf, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    got = continue_from_card(hf_card, mlx, None, prompt, max_tokens=16).tokens
    assert got == greedy_tokens(mlx, prompt, max_tokens=16)
    # a local layer holds its window (16) only: version 3 past the window
    first = max(0, n - 16)
    assert card.qkv.starts == [first] * 5 + [0]
    assert card.version == (3 if first else 1)
    full = make_card(
        mlx,
        None,
        ids,
        controller="uniform",
        budget_bits=32,
        config=LOSSLESS,
        trim_windows=False,
    )
    assert full.qkv.held_from is None
    if first:
        assert len(card.to_bytes()) < len(full.to_bytes())
        assert card.payload_bytes * 6 * n == full.payload_bytes * (5 * 16 + n)
    got_full = continue_from_card(full, mlx, None, prompt, max_tokens=16).tokens
    assert got_full == got
    # a card handed on keeps the global layer's segments; local layers drop
    # the inherited segments that fell out of their window
    longer = make_card(
        mlx, None, prompt + got, inherited=card, controller="uniform", budget_bits=32
    )
    assert longer.n_tokens == n + 17
    assert longer.qkv.starts == [n + 17 - 16] * 5 + [0]
    assert_inherits(card, longer, layers=[5])


def test_a_local_layer_keeps_inherited_segments_its_window_still_reads(gemma3):
    """A hop of 5 tokens after a 40-token card: the window (16) still reads
    positions 29.., so the local layers keep the whole inherited segment
    (24..39, bit for bit) and hold from 24; the card goes on continuing
    exactly like a full-length one."""
    mlx, hf = gemma3
    ids = _ids(45, 7)
    lossless = dict(controller="uniform", budget_bits=32, config=LOSSLESS)
    card = make_card(mlx, None, ids[:40], **lossless)
    longer = make_card(mlx, None, ids, inherited=card, **lossless)
    assert card.qkv.starts == [24] * 5 + [0]
    assert longer.qkv.starts == [24] * 5 + [0]
    assert_inherits(card, longer)
    back = CacheCard.from_bytes(longer.to_bytes())
    assert back.qkv.starts == [24] * 5 + [0] and back.version == 3
    prompt = ids + [3]
    want = greedy_tokens(mlx, prompt, max_tokens=12)
    assert continue_from_card(back, mlx, None, prompt, max_tokens=12).tokens == want
    got = continue_hf(back, hf, None, prompt, max_tokens=12).tokens
    assert got == hf_greedy_tokens(hf, prompt, max_tokens=12)


def test_a_mistral_class_that_ignores_layer_types_is_refused(tmp_path):
    """transformers' MistralForCausalLM, named rather than auto-loaded, windows
    every layer whatever layer_types say (AutoModelForCausalLM loads the same
    checkpoint as Ministral, which honours them, as mlx-lm does): it runs
    another model past the window, and its fingerprint says so."""
    import torch
    from transformers import MistralForCausalLM

    from qkvshare_mlx.inject import inject

    mlx, hf = _twins("mistral-windows", tmp_path / "mistral")
    assert type(hf).__name__ == "MinistralForCausalLM"
    assert fingerprint(mlx)["layer_types"] == ["sliding", "full"]
    named = MistralForCausalLM.from_pretrained(tmp_path / "mistral").eval()
    ids = _ids(40, 8)
    with torch.no_grad():
        auto = hf(torch.tensor([ids])).logits[0]
        every = named.to(torch.float32)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(every[:16], auto[:16])  # within the window
    assert (every[16:] - auto[16:]).abs().max() > 0.1  # past it
    assert "layer_types" not in fingerprint(named)
    card = make_card(
        mlx, None, ids, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    kinds = [type(c).__name__ for c in inject(card, mlx)]
    assert kinds == ["RotatingKVCache", "KVCache"]
    with pytest.raises(ModelMismatchError, match="layer_types: card has.*Ministral"):
        continue_hf(card, named, None, ids + [3], max_tokens=2)


def test_a_mode_other_than_dequantize_is_refused(gemma3):
    from qkvshare_mlx.errors import ConfigError
    from qkvshare_mlx.inject import inject

    mlx, _ = gemma3
    card = make_card(mlx, None, _ids(12, 6), controller="uniform", budget_bits=16)
    with pytest.raises(ConfigError, match="mode 'dequantize' only"):
        inject(card, mlx, mode="compressed")


def test_quantized_cards_degrade_with_fewer_bits_in_every_family(family):
    """Teacher-forced KL(exact || card) over the next 16 tokens, after a
    64-token card: float16 cards are exact to rounding, and fewer bits give
    monotonically larger KL (random tiny models are far more sensitive than
    trained ones: these are orderings, not quality figures)."""
    import mlx.core as mx

    from qkvshare_mlx.capture import sender_cache
    from qkvshare_mlx.evals.metrics import compare_logits
    from qkvshare_mlx.inject import inject

    _, mlx, _ = family
    ids, follow = _ids(64, 9), _ids(16, 10)
    ref_cache = sender_cache(mlx)
    mlx(mx.array([ids]), cache=ref_cache)
    ref = mlx(mx.array([follow]), cache=ref_cache)[0]

    def kl(bits):
        card = make_card(mlx, None, ids, budget_bits=bits)
        got = mlx(mx.array([follow]), cache=inject(card, mlx))[0]
        return compare_logits(ref, got)["kl"]

    assert kl(16.0) < 1e-3
    # head_dim 80 too: per-token rows padded to 96 (format version 3)
    k6, k45, k3 = kl(6.0), kl(4.5), kl(3.0)
    assert k6 < k45 < k3, (k6, k45, k3)


@pytest.mark.parametrize("n", [12, 40], ids=["within", "past"])
def test_gemma3_pre_rope_cards_have_a_rope_per_layer_type(gemma3, n):
    mlx, hf = gemma3
    ids = _ids(n, 6)  # past the window (16): local layers held from it
    kr = _pre_rope_ways(mlx, hf, ids, ids + [3])
    assert len(kr.specs) == 2 and kr.layers == (0,) * 5 + (1,)
