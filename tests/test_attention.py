"""Attention on a card's codes (qkvshare_mlx.attention) in compressed caches."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_LLAMA_CONFIG, WIDE_HEAD_CONFIG, prefill_card, tiny_llama
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from qkvshare_mlx import attention
from qkvshare_mlx.attention import WIDER_ON_CPU, widen
from qkvshare_mlx.caches import MixedQuantizedKVCache, _to_mx
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.inject import inject

HEAD80 = {**TINY_LLAMA_CONFIG, "head_dim": 80, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def wide():
    return tiny_llama(WIDE_HEAD_CONFIG).mlx_model


@pytest.fixture(scope="module")
def head80():
    return tiny_llama(HEAD80).mlx_model


@pytest.fixture
def calls(monkeypatch):
    """How many attentions ran on the codes."""
    n = {"native": 0}
    real = attention.mixed_attention

    def counting(*a, **kw):
        n["native"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(attention, "mixed_attention", counting)
    return n


def _run(model, caches, feeds):
    out = []
    for feed in feeds:
        x = mx.array(np.asarray(feed, dtype=np.int32))[None]
        logits = model(x, cache=caches)
        mx.eval(logits)
        out.append(np.array(logits[0]))
    return out


FEEDS = [[5, 9, 11, 2, 7], [3], [8]]  # a short suffix, then two decode steps
CONFIGS = {
    "channel keys": QuantConfig(),
    "token keys": QuantConfig(key_layout="token"),
    "hadamard": QuantConfig(rotation="hadamard"),
    "hadamard split": QuantConfig(rotation="hadamard", split_kv=True),
    "float tokens": QuantConfig(widths=(2, 4, 16)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_on_codes_equals_attention_on_decoded_kv(wide, ids, calls, name):
    card, _ = prefill_card(
        wide, ids[:150], controller="saliency", budget=4.5, config=CONFIGS[name]
    )
    native = inject(card, wide, mode="compressed")
    assert all(isinstance(c, MixedQuantizedKVCache) for c in native)
    decoded = inject(card, wide, mode="compressed")
    for c in decoded:
        c.native = False
    got = _run(wide, native, FEEDS)
    assert calls["native"] == len(FEEDS) * len(native)
    want = _run(wide, decoded, FEEDS)
    assert calls["native"] == len(FEEDS) * len(native)  # the decoded run: none
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)
    # and the same as the card injected into plain KVCaches
    plain = _run(wide, inject(card, wide, mode="dequantize"), FEEDS)
    for g, w in zip(got, plain):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)


def test_padded_rows_attend_on_codes(head80, ids, calls):
    # head 80: per-token rows are padded to 96 (groups of 32); the pad meets
    # zero query columns and is cut from the values' output
    card, _ = prefill_card(
        head80, ids[:120], controller="saliency", budget=4.5, config=QuantConfig()
    )
    assert any(s.keys.dim == 80 or s.values.dim == 80 for s in card.layers[0])
    native = inject(card, head80, mode="compressed")
    got = _run(head80, native, FEEDS)
    assert calls["native"] == len(FEEDS) * len(native)
    plain = _run(head80, inject(card, head80, mode="dequantize"), FEEDS)
    for g, w in zip(got, plain):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)


def test_hidden_card_tokens_fall_back_to_decoded_kv(wide, ids, calls):
    card, _ = prefill_card(wide, ids[:100])  # float32: refeeding is exact
    cache = inject(card, wide, mode="compressed")
    assert [c.trim(10) for c in cache] == [10, 10]  # hides 10 card tokens
    got = _run(wide, cache, [list(ids[90:100]) + [4]])[0][-1]
    assert calls["native"] == 0
    x = mx.array(np.asarray(list(ids[:100]) + [4], dtype=np.int32))[None]
    np.testing.assert_allclose(got, np.array(wide(x)[0, -1]), atol=1e-4)


def test_mlx_lm_quantized_caches_keep_their_own_attention(wide, ids):
    assert attention.install()
    from mlx_lm.models import base

    assert base.quantized_scaled_dot_product_attention._qkvshare_hook
    x = mx.array(np.asarray(ids[:40], dtype=np.int32))[None]
    ref = [KVCache() for _ in range(2)]
    wide(x, cache=ref)
    caches = [c.to_quantized(group_size=32, bits=8) for c in ref]
    assert all(isinstance(c, QuantizedKVCache) for c in caches)
    hooked = np.array(wide(mx.array([[3]]), cache=caches)[0, -1])
    # mlx-lm's function itself, on the same quantized caches
    caches = [c.to_quantized(group_size=32, bits=8) for c in ref]
    for c in caches:
        c.offset = 40
    orig = attention._installed["original"]
    try:
        base.quantized_scaled_dot_product_attention = orig
        own = np.array(wide(mx.array([[3]]), cache=caches)[0, -1])
    finally:
        attention._installed["original"] = None
        base.quantized_scaled_dot_product_attention = orig
        assert attention.install()
    np.testing.assert_array_equal(hooked, own)


def test_returned_kv_are_the_decoded_card(wide, ids):
    # a caller that bypasses the hook reads the exact decoded K/V
    card, _ = prefill_card(
        wide, ids[:64], controller="saliency", budget=4.5, config=QuantConfig()
    )
    c = inject(card, wide, mode="compressed")[0]
    ref = inject(card, wide, mode="dequantize")[0]
    k_new = mx.zeros((1, 2, 1, 64))
    keys, values = c.update_and_fetch(k_new, k_new)
    rk, rv = ref.update_and_fetch(k_new, k_new)
    assert np.array_equal(np.array(keys), np.array(rk))
    assert np.array_equal(np.array(values), np.array(rv))


def test_a_long_prefill_attends_on_decoded_kv_on_a_cpu(wide, ids, calls):
    card, _ = prefill_card(
        wide, ids[:100], controller="saliency", budget=4.5, config=QuantConfig()
    )
    long_feed = list(range(1, attention.CPU_MAX_QUERIES + 4))
    native = inject(card, wide, mode="compressed")
    got = _run(wide, native, [long_feed, [3]])
    assert calls["native"] == len(native)  # the decoding step only
    plain = _run(wide, inject(card, wide, mode="dequantize"), [long_feed, [3]])
    for g, w in zip(got, plain):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)


def test_segments_of_one_format_are_merged(wide, ids):
    # a card writes one segment per format and token run; the compressed
    # cache holds one per format, with the same codes and the same K/V
    card, _ = prefill_card(
        wide, ids[:200], controller="saliency", budget=4.5, config=QuantConfig()
    )
    c = inject(card, wide, mode="compressed")[0]
    layer = [widen(s) for s in card.layers[0]]  # as a CPU cache holds them
    formats = {merge_key(s) for s in layer}
    assert len(layer) > len(formats)  # the card has runs to merge
    assert len(c.segments) == len(formats)
    assert sorted(merge_key(s) for s in c.segments) == sorted(formats)
    assert sum(s.n_tokens for s in c.segments) == sum(s.n_tokens for s in layer)
    # values of one format form one block, of which the segments hold views
    value_formats = {(s.vbits, s.values.layout, s.values.group) for s in layer}
    blocks = c._value_blocks
    assert len(blocks) == len(value_formats) < len(c.segments)
    assert sum(k for *_, k in blocks) == len(c.segments)
    # built from pieces already in memory, the cache allocates at most one
    # copy of them (the merged keys and the value blocks), no second one
    pieces = [_to_mx(s) for s in layer]
    mx.eval(
        [a for s in pieces for e in (s.keys, s.values) for a in e.arrays().values()]
    )
    payload = sum(s.payload_bits() for s in layer) // 8
    gc.collect()
    mx.synchronize()
    mx.clear_cache()  # fresh buffers: a cached one may be larger than asked
    before = mx.get_active_memory()
    again = MixedQuantizedKVCache(pieces, card.n_tokens)
    assert mx.get_active_memory() - before <= 1.25 * payload  # allocator rounding
    assert again.nbytes >= payload
    ref = inject(card, wide, mode="dequantize")[0]
    k, v = c.dequantized()
    assert np.array_equal(np.array(k), np.array(ref.keys[..., : ref.offset, :]))
    assert np.array_equal(np.array(v), np.array(ref.values[..., : ref.offset, :]))


def test_a_cpu_cache_holds_slow_widths_widened_with_the_same_values(wide, ids):
    card, _ = prefill_card(
        wide, ids[:200], controller="saliency", budget=4.5, config=QuantConfig()
    )
    widths = {b for layer in card.layers for s in layer for b in (s.bits, s.vbits)}
    assert widths & set(WIDER_ON_CPU)  # the card has widths to widen
    caches = inject(card, wide, mode="compressed")
    held = {b for c in caches for s in c.segments for b in (s.bits, s.vbits)}
    assert not held & set(WIDER_ON_CPU)
    for c, d in zip(caches, inject(card, wide, mode="dequantize")):
        k, v = c.dequantized()
        assert np.array_equal(np.array(k), np.array(d.keys[..., : d.offset, :]))
        assert np.array_equal(np.array(v), np.array(d.values[..., : d.offset, :]))


def merge_key(s):
    k, v = s.keys, s.values
    return (
        s.bits,
        s.vbits,
        k.layout,
        k.group,
        k.dim or 0,
        v.layout,
        v.group,
        v.dim or 0,
    )


def test_decoded_graph_is_built_once_and_never_kept_evaluated(wide, ids, calls):
    card, _ = prefill_card(
        wide, ids[:100], controller="saliency", budget=4.5, config=QuantConfig()
    )
    caches = inject(card, wide, mode="compressed")
    _run(wide, caches, [[3]])
    kept = caches[0]._lazy
    assert kept is not None  # the step ran on the codes: the graph is kept
    _run(wide, caches, [[4]])
    assert caches[0]._lazy is kept  # and reused, not rebuilt
    # a prefill on a CPU attends on the decoded K/V: nothing stays behind
    _run(wide, caches, [list(range(1, attention.CPU_MAX_QUERIES + 4))])
    assert all(c._lazy is None for c in caches)


def test_a_model_that_bypasses_the_hook_keeps_no_decoded_card(wide, ids):
    card, _ = prefill_card(
        wide, ids[:64], controller="saliency", budget=4.5, config=QuantConfig()
    )
    c = inject(card, wide, mode="compressed")[0]
    ref = inject(card, wide, mode="dequantize")[0]
    for step in range(3):  # a caller that never reaches the hook
        k_new = mx.full((1, 2, 1, 64), float(step))
        keys, _ = c.update_and_fetch(k_new, k_new)
        rk, _ = ref.update_and_fetch(k_new, k_new)
        assert np.array_equal(np.array(keys), np.array(rk))
    assert c._bypassed and c._lazy is None


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "bool shared", "additive per head"]
)
def test_mixed_attention_masks_match_attention_on_decoded_kv(mask_kind):
    from qkvshare_mlx.quant.mlx_backend import decode, quantize_cache

    rng = np.random.default_rng(3)
    B, Hk, T, D, R, L, n_tail = 1, 2, 96, 64, 3, 4, 6
    keys = [mx.array(rng.standard_normal((B, Hk, T, D)).astype(np.float32))]
    values = [mx.array(rng.standard_normal((B, Hk, T, D)).astype(np.float32))]
    qkv = quantize_cache(keys, values, controller="uniform", budget_bits=4.5)
    segs = qkv.layers[0]
    tk = mx.array(rng.standard_normal((B, Hk, n_tail, D)).astype(np.float32))
    tv = mx.array(rng.standard_normal((B, Hk, n_tail, D)).astype(np.float32))
    q = mx.array(rng.standard_normal((B, Hk * R, L, D)).astype(np.float32))
    k = mx.concatenate([decode(s.keys, s.bits) for s in segs] + [tk], axis=2)
    v = mx.concatenate([decode(s.values, s.vbits) for s in segs] + [tv], axis=2)
    n = k.shape[2]
    mask = {
        "none": None,
        "causal": "causal",
        "bool shared": mx.array(rng.random((B, 1, L, n)) > 0.3),
        "additive per head": mx.array(
            rng.standard_normal((B, Hk * R, L, n)).astype(np.float32)
        ),
    }[mask_kind]
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        mask[..., 0] = True  # every row attends somewhere
    got = attention.mixed_attention(q, segs, tk, tv, scale=0.125, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)
