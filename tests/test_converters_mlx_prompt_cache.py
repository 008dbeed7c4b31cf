"""CacheCards <-> mlx-lm prompt-cache files (save_prompt_cache format)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPT_CACHE_CONFIG, tiny_llama
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

from qkvshare_converters.mlx_prompt_cache import (
    card_to_prompt_cache_file,
    prompt_cache_file_to_card,
    quantized_layout,
)
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache

EXACT = dict(
    controller="uniform",
    budget_bits=32,
    config=QuantConfig(widths=(16,), float_dtype="float32"),
)
FP = {"model_type": "llama", "n_layers": 3, "vocab_size": 500}


def _kv(L=3, H=2, T=90, D=64, seed=0):
    rng = np.random.default_rng(seed)
    ks = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    vs = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    return ks, vs, TokenStats(attention=rng.random((L, T)) ** 3)


def _card(**kw):
    ks, vs, stats = _kv()
    qkv = quantize_cache(ks, vs, stats=stats, **kw)
    return CacheCard.from_quantized(qkv, np.arange(90) * 3, FP), ks, vs


def _equal(a_list, b_list):
    return all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(a_list, b_list))


def test_float_card_round_trip_is_exact(tmp_path):
    card, ks, vs = _card(**EXACT)
    path = card_to_prompt_cache_file(card, tmp_path / "p.safetensors")
    cache = load_prompt_cache(str(path))
    assert all(type(c) is KVCache for c in cache)
    back = prompt_cache_file_to_card(path, **EXACT)
    assert np.array_equal(back.tokens, card.tokens) and back.model == FP
    k2, v2 = dequantize_cache(back.to_quantized())
    assert _equal(ks, k2) and _equal(vs, v2)


def test_mixed_card_goes_out_dequantized(tmp_path):
    card, _, _ = _card(controller="saliency", budget_bits=4.5)
    assert quantized_layout(card) is None
    with pytest.raises(ConfigError, match="quantized=True"):
        card_to_prompt_cache_file(card, tmp_path / "q.safetensors", quantized=True)
    path = card_to_prompt_cache_file(card, tmp_path / "p.safetensors")
    back = prompt_cache_file_to_card(path, **EXACT)
    assert _equal(
        dequantize_cache(card.to_quantized())[0],
        dequantize_cache(back.to_quantized())[0],
    )


def test_uniform_card_goes_out_as_mlx_quantized_cache(tmp_path):
    config = QuantConfig(key_layout="token", group_size=64, adaptive_groups=False)
    card, ks, _ = _card(controller="uniform", budget_bits=4.5, config=config)
    assert quantized_layout(card) == (4, 64)
    path = card_to_prompt_cache_file(
        card, tmp_path / "p.safetensors", metadata={"model": "x"}
    )
    cache, meta = load_prompt_cache(str(path), return_metadata=True)
    assert meta["model"] == "x"
    assert all(
        type(c) is QuantizedKVCache and c.bits == 4 and c.group_size == 64
        for c in cache
    )
    # mlx-lm holds the card's codes unchanged.
    seg = card.layers[0][0]
    assert np.array_equal(np.array(cache[0].keys[0]), seg.keys.codes)
    # Back to a card: exact in float, and within one step when re-quantized at 4 bits.
    exact = prompt_cache_file_to_card(path, **EXACT)
    assert _equal(
        dequantize_cache(card.to_quantized())[0],
        dequantize_cache(exact.to_quantized())[0],
    )
    again = prompt_cache_file_to_card(
        path, controller="uniform", budget_bits=4.5, config=config
    )
    k_card = dequantize_cache(card.to_quantized())[0]
    k_again = dequantize_cache(again.to_quantized())[0]
    step = np.abs(seg.keys.scales.astype(np.float32)).max()
    assert (
        max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(k_card, k_again))
        <= 1.1 * step
    )
    # And the writer can be told not to quantize.
    path2 = card_to_prompt_cache_file(card, tmp_path / "f.safetensors", quantized=False)
    assert all(type(c) is KVCache for c in load_prompt_cache(str(path2)))


def test_tokens_are_required_when_the_file_has_none(tmp_path):
    ks, vs, _ = _kv(T=20)
    caches = []
    for k, v in zip(ks, vs):
        c = KVCache()
        c.update_and_fetch(k, v)
        caches.append(c)
    path = tmp_path / "mlx.safetensors"
    save_prompt_cache(str(path), caches, {"model": "tiny"})
    with pytest.raises(ConfigError, match="tokens"):
        prompt_cache_file_to_card(path, **EXACT)
    with pytest.raises(ConfigError, match="expected 20 ids"):
        prompt_cache_file_to_card(path, tokens=list(range(19)), **EXACT)


def test_real_prefill_saved_by_mlx_lm_comes_back_exactly(tmp_path):
    """A tiny random Llama prefills with mlx-lm; its saved cache becomes a card."""
    model = tiny_llama(PROMPT_CACHE_CONFIG).mlx_model
    tokens = np.random.default_rng(0).integers(0, 300, 37)
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    path = tmp_path / "prefill.safetensors"
    save_prompt_cache(str(path), cache, {"model": "tiny"})
    # mlx-lm's buffers are longer than the prompt (step 256); only T are real.
    assert cache[0].keys.shape[2] > 37

    card = prompt_cache_file_to_card(path, tokens=tokens, **EXACT)
    assert card.n_tokens == 37 and card.cache["n_kv_heads"] == 2
    k2, v2 = dequantize_cache(card.to_quantized())
    assert _equal([c.keys[..., :37, :] for c in cache], k2)
    assert _equal([c.values[..., :37, :] for c in cache], v2)

    # Quantized at 8 bits (groups of 32: 9 bits per element): within about one
    # step of each group (mx.quantize can clip up to one step, not a half).
    q8 = prompt_cache_file_to_card(
        path, tokens=tokens, controller="uniform", budget_bits=9
    )
    assert set(q8.width_histogram()) == {8}
    k8 = dequantize_cache(q8.to_quantized())[0]
    for c, k in zip(cache, k8):
        orig = np.array(c.keys[..., :37, :])
        span = orig.max() - orig.min()
        assert np.abs(np.array(k) - orig).max() <= 1.2 * span / 255


def test_file_saved_from_a_stream_mode_cache_becomes_a_card(tmp_path):
    """StreamedKVCache layers are recorded under their own class name, which
    mlx-lm's loader does not know; the converter reads them as KVCache."""
    from qkvshare_mlx.inject import inject

    card, ks, vs = _card(**EXACT)
    path = tmp_path / "s.safetensors"
    save_prompt_cache(str(path), inject(card, mode="stream"))
    back = prompt_cache_file_to_card(path, tokens=card.tokens, **EXACT)
    k2, v2 = dequantize_cache(back.to_quantized())
    assert _equal(ks, k2) and _equal(vs, v2)


@pytest.mark.parametrize("extra", ["rotation", "key_rope"])
def test_codes_in_another_basis_go_out_dequantized(tmp_path, extra):
    # mlx-lm's quantized attention would read rotated or pre-RoPE codes as
    # they are: such a card is written as float KVCache layers
    from qkvshare_mlx.rope import KeyRope, RopeSpec

    kw = {"rotation": "hadamard"}
    if extra == "key_rope":
        spec = RopeSpec("half", tuple(float(np.float32(0.5**i)) for i in range(8)))
        kw = {"key_rope": KeyRope((spec,), (0, 0, 0))}
    config = QuantConfig(key_layout="token", group_size=64, adaptive_groups=False, **kw)
    card, _, _ = _card(controller="uniform", budget_bits=4.5, config=config)
    assert quantized_layout(card) is None
    path = card_to_prompt_cache_file(card, tmp_path / "p.safetensors")
    cache = load_prompt_cache(str(path))
    assert all(type(c) is KVCache for c in cache)
    assert _equal(dequantize_cache(card.to_quantized())[0], [c.state[0] for c in cache])
