"""Model families in both runtimes: one checkpoint (transformers draws the
weights and saves them; mlx-lm loads the folder), 16-bit cards MLX -> MLX,
MLX -> transformers and transformers -> MLX, each against the receiver's own
prefill, and cards refused across families."""

import numpy as np
import pytest
from conftest import _random_weights_torch

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
}
LOSSLESS = QuantConfig(float_dtype="float32")


def _twins(family: str, folder):
    """(mlx-lm model, transformers model) with the same float32 weights."""
    import torch
    from mlx_lm.utils import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**BASE, **FAMILIES[family]}
    config = AutoConfig.for_model(
        spec["model_type"], **{k: v for k, v in spec.items() if k != "model_type"}
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf = hf.to(torch.float32).eval()
    _random_weights_torch(hf)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
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
        card = make_card(
            mlx, None, _ids(48, 4), budget_bits=16 if "80" in name else 4.5
        )
    assert card.effective_bits <= (16 if "80" in name else 4.52)


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
    # a card handed on inherits every segment, local layers included
    longer = make_card(
        mlx, None, prompt + got, inherited=card, controller="uniform", budget_bits=32
    )
    assert longer.n_tokens == n + 17 and longer.layers[0][0].n_tokens == n


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
    if fingerprint(mlx)["head_dim"] % 32 == 0:
        k6, k45, k3 = kl(6.0), kl(4.5), kl(3.0)
        assert k6 < k45 < k3, (k6, k45, k3)
