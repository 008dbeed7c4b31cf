"""Sender-side capture: chunked prefill, probe attention statistics."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_LLAMA_CONFIG
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache

from qkvshare_mlx.capture import prefill, probe_attention
from qkvshare_mlx.errors import ConfigError


@pytest.fixture(scope="module")
def model(tiny_mlx):
    return tiny_mlx


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, TINY_LLAMA_CONFIG["vocab_size"], n)


def naive_probe(model, ids, P, moments=False):
    """Reference: explicit softmax(q k^T) of every query, last P rows summed
    (``moments``: and the mean q q^T of the last P queries per KV head)."""
    x = model.model.embed_tokens(mx.array(ids)[None])
    T = len(ids)
    mask = create_causal_mask(T)
    out, mom = [], []
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).reshape(1, T, a.n_heads, -1).transpose(0, 2, 1, 3)
        k = a.k_proj(h).reshape(1, T, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = np.array(a.rope(q), np.float64), np.array(a.rope(k), np.float64)
        k = np.repeat(k, a.n_heads // a.n_kv_heads, axis=1)
        s = q @ k.swapaxes(-1, -2) * a.scale
        s = np.where(np.array(mask), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(p[:, :, T - P :].sum(axis=(0, 1, 2)))
        R = a.n_heads // a.n_kv_heads
        qp = q[0, :, T - P :].reshape(a.n_kv_heads, R * P, -1)  # heads in KV order
        mom.append(np.einsum("hnd,hne->hde", qp, qp) / (R * P))
        x = layer(x, mask="causal")
    return (np.stack(out), np.stack(mom)) if moments else np.stack(out)


def test_chunked_prefill_matches_one_pass(model):
    ids = tokens(150)
    pre = prefill(model, ids, chunk_size=32, probe_queries=16)
    full = model(mx.array(ids)[None])[:, -1]
    np.testing.assert_allclose(np.array(pre.logits), np.array(full), atol=1e-4)
    assert len(pre.keys) == 2 and pre.keys[0].shape == (1, 2, 150, 32)
    assert pre.cache[0].offset == 150
    np.testing.assert_array_equal(pre.tokens, ids)


def test_probe_attention_matches_naive_softmax(model):
    ids = tokens(90, seed=1)
    P = 16
    pre = prefill(model, ids, chunk_size=25, probe_queries=P)
    ref = naive_probe(model, ids, P)
    assert pre.stats.attention.shape == (2, 90)
    np.testing.assert_allclose(pre.stats.attention, ref, rtol=1e-3, atol=1e-5)
    # every probe row is a distribution: mass = heads * probes
    np.testing.assert_allclose(pre.stats.attention.sum(axis=1), 4 * P, rtol=1e-5)
    # and non-uniform, or the test above would prove little
    assert pre.stats.attention.max() > 3 * pre.stats.attention.mean()


def test_probe_records_the_mean_query_moments_per_kv_head(model):
    # what QuantConfig(key_error="query") weighs key channels by
    ids = tokens(70, seed=4)
    pre = prefill(model, ids, chunk_size=20, probe_queries=8)
    _, want = naive_probe(model, ids, 8, moments=True)
    assert pre.stats.query_moments.shape == (2, 2, 32, 32)
    np.testing.assert_allclose(pre.stats.query_moments, want, rtol=1e-3, atol=1e-5)
    assert prefill(model, ids, probe_queries=0).stats.query_moments is None


def test_probe_restores_q_proj_and_key_norms(model):
    ids = tokens(40, seed=2)
    pre = prefill(model, ids, probe_queries=8)
    for layer in model.model.layers:
        assert type(layer.self_attn.q_proj) is nn.Linear
    for li, k in enumerate(pre.keys):
        ref = np.linalg.norm(np.array(k), axis=-1).sum(axis=(0, 1))
        np.testing.assert_allclose(pre.stats.key_norms[li], ref, rtol=1e-5)


def test_probe_longer_than_prompt_and_zero_probe(model):
    ids = tokens(5, seed=3)
    pre = prefill(model, ids, probe_queries=32)
    assert pre.probe_queries == 5
    np.testing.assert_allclose(
        pre.stats.attention, naive_probe(model, ids, 5), rtol=1e-3, atol=1e-5
    )
    pre0 = prefill(model, ids, probe_queries=0)
    assert pre0.stats.attention is None and pre0.stats.key_norms.shape == (2, 5)


def test_gqa_probe_attention_unit():
    # Two query heads share one KV head; the causal row of query t sees keys <= t.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 5, 8)).astype(np.float32)
    got = np.array(probe_attention(mx.array(q), mx.array(k), 2, scale=0.5))
    ref = np.zeros(5)
    for h in range(2):
        for i in range(3):
            s = 0.5 * q[0, h, i] @ k[0, 0, : 2 + i + 1].T
            p = np.exp(s - s.max())
            ref[: 2 + i + 1] += p / p.sum()
    np.testing.assert_allclose(got, ref, rtol=1e-5)


class _NoProbeModel:
    """An mlx-lm-like model whose layers expose no q_proj/rope."""

    def __init__(self, inner):
        self.inner = inner
        self.layers = [object() for _ in inner.layers]

    def __call__(self, x, cache=None):
        return self.inner(x, cache=cache)


def test_non_llama_attention_falls_back_to_key_norms(model):
    ids = tokens(30, seed=4)
    pre = prefill(_NoProbeModel(model), ids)
    assert pre.stats.attention is None
    assert pre.stats.key_norms.shape == (2, 30)
    assert pre.probe_queries == 0


def test_prefill_rejects_bad_input(model):
    with pytest.raises(ConfigError, match="at least one token"):
        prefill(model, [])
    with pytest.raises(ConfigError, match="chunk_size"):
        prefill(model, [1, 2], chunk_size=0)


def test_layers_that_are_not_kv_are_refused_before_any_prefill(tiny_mlx, monkeypatch):
    from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache

    from qkvshare_mlx.errors import UnsupportedCacheError

    calls = []
    monkeypatch.setattr(type(tiny_mlx), "__call__", lambda *a, **k: calls.append(1))
    for layer_cache, name in (
        (RotatingKVCache(max_size=16), r"RotatingKVCache\) would drop tokens: 20 > 15"),
        (ArraysCache(size=2), "ArraysCache, not keys and values"),
        (
            CacheList(ArraysCache(size=2), KVCache()),
            r"CacheList\(ArraysCache, KVCache\), several caches",
        ),
    ):
        cache = [KVCache(), layer_cache]
        with pytest.raises(UnsupportedCacheError, match=f"layer 1: .*{name}"):
            prefill(tiny_mlx, list(range(1, 21)), cache=cache)
    assert calls == []  # refused before the forward pass


def test_prefill_reports_progress_per_chunk(tiny_mlx):
    seen = []
    prefill(
        tiny_mlx, list(range(1, 100)), chunk_size=32, progress=lambda *a: seen.append(a)
    )
    assert seen == [(32, 99), (64, 99), (67, 99), (99, 99)]


def test_a_sender_running_kv_bits_makes_cards_of_what_it_attends_to(tiny_mlx):
    """mlx-lm's QuantizedKVCache (``--kv-bits``): the card holds its
    dequantized tokens, and the receiver continues as that sender would."""
    from mlx_lm.models.cache import QuantizedKVCache

    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.inject import inject
    from qkvshare_mlx.quant.mlx_backend import quantize_cache

    ids = list(range(1, 41))
    cache = [QuantizedKVCache(group_size=32, bits=8) for _ in tiny_mlx.layers]
    pre = prefill(tiny_mlx, ids, cache=cache)
    for c, k in zip(cache, pre.keys):
        want = mx.dequantize(*c.keys, group_size=32, bits=8)[..., :40, :]
        assert k.shape == want.shape and mx.array_equal(k, want)
    lossless = QuantConfig(float_dtype="float32")
    qkv = quantize_cache(
        pre.keys, pre.values, controller="uniform", budget_bits=32, config=lossless
    )
    got = inject(qkv, tiny_mlx)
    held = [KVCache() for _ in tiny_mlx.layers]
    for c, k, v in zip(held, pre.keys, pre.values):
        c.state = (k, v, k.shape[2])
    a = tiny_mlx(mx.array([[7]]), cache=got)[0, -1]
    b = tiny_mlx(mx.array([[7]]), cache=held)[0, -1]
    assert mx.allclose(a, b, atol=1e-5)  # the card is that sender's cache
    # which 8-bit rounding keeps close to the sender's own next step
    c = tiny_mlx(mx.array([[7]]), cache=cache)[0, -1]
    assert mx.abs(a - c).max().item() < 0.05
