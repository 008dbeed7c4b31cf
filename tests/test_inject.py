"""Receiver-side injection: cards as mlx-lm caches, prompt alignment."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_LLAMA_CONFIG, tiny_llama
from conftest import prefill_card as card_of
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from qkvshare_mlx.attention import widen
from qkvshare_mlx.caches import MixedQuantizedKVCache
from qkvshare_mlx.capture import prefill
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import ConfigError, ModelMismatchError, PromptMismatchError
from qkvshare_mlx.fingerprint import fingerprint
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.inject import align, inject
from qkvshare_mlx.quant.mlx_backend import quantize_cache

FLOAT32 = QuantConfig(float_dtype="float32")
TOKEN_G32 = QuantConfig(key_layout="token", group_size=32, adaptive_groups=False)


@pytest.fixture(scope="module")
def model(tiny_mlx):
    return tiny_mlx


def last_logits(model, cache, feed):
    x = mx.array(np.asarray(feed, dtype=np.int32))[None]
    return np.array(model(x, cache=cache)[0, -1])


def exact_logits(model, toks):
    return np.array(model(mx.array(np.asarray(toks, dtype=np.int32))[None])[0, -1])


# ---------------------------------------------------------------------------
# Lossless cards: the handoff is invisible.


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("mode", ["dequantize", "compressed"])
def test_offset_continues_rope(model, ids, mode, rotation):
    # card of the first N tokens + feeding the rest == prefill of everything
    # (a rotated float32 card: exact up to float32 rounding of the rotation)
    n = 100
    config = QuantConfig(float_dtype="float32", rotation=rotation)
    card, _ = card_of(model, ids[:n], config=config)
    assert card.quant["config"].get("rotation", "none") == rotation
    cache = inject(card, model, mode=mode)
    assert cache[0].offset == n
    got = last_logits(model, cache, ids[n:])
    np.testing.assert_allclose(got, exact_logits(model, ids), atol=1e-4)
    assert cache[0].offset == len(ids)


# ---------------------------------------------------------------------------
# Lossy cards: error bounded by the quantization step.


def _max_step(card) -> float:
    """Largest quantization step (scale) of any group in the card."""
    return max(
        float(np.max(enc.scales.astype(np.float32)))
        for layer in card.layers
        for s in layer
        for enc in (s.keys, s.values)
        if enc.layout != "float"
    )


def _perturbed_logits(model, pre, feed, eps, seed=0):
    """Logits after a ±eps random-sign perturbation of every cached K/V element."""
    rng = np.random.default_rng(seed)
    caches = []
    for k, v in zip(pre.keys, pre.values, strict=True):
        c = KVCache()
        pk = k + eps * mx.array(rng.choice([-1.0, 1.0], k.shape).astype(np.float32))
        pv = v + eps * mx.array(rng.choice([-1.0, 1.0], v.shape).astype(np.float32))
        c.state = (pk, pv, k.shape[2])
        caches.append(c)
    return last_logits(model, caches, feed)


@pytest.mark.parametrize("bits", [8, 4])
def test_lossy_logits_within_step_bound(model, ids, bits):
    """Bound: rounding moves each K/V element by at most step/2 (step = the
    group's scale), so the logits may move at most twice as much as under a
    random-sign perturbation of *every* element by max_step/2."""
    n = len(ids) - 1
    card, pre = card_of(model, ids[:n], budget=bits + 1.0, config=TOKEN_G32)
    assert set(card.width_histogram()) == {bits}
    exact = exact_logits(model, ids)
    got = last_logits(model, inject(card, model), ids[n:])
    err = np.abs(got - exact).max()
    half_step = _max_step(card) / 2
    sensitivity = np.abs(
        _perturbed_logits(model, pre, ids[n:], half_step) - exact
    ).max()
    assert err <= 2 * sensitivity, (err, sensitivity)
    assert err < {8: 0.05, 4: 1.0}[bits] * np.std(exact)


def test_more_bits_less_error(model, ids):
    n = len(ids) - 1
    exact = exact_logits(model, ids)
    errs = {}
    for bits in (8, 4):
        card, _ = card_of(model, ids[:n], budget=bits + 1.0, config=TOKEN_G32)
        errs[bits] = np.abs(
            last_logits(model, inject(card, model), ids[n:]) - exact
        ).max()
    # the step shrinks 17x from 4 to 8 bits; demand at least 4x less error
    assert errs[8] * 4 < errs[4]


# ---------------------------------------------------------------------------
# Compressed mode: same numbers, less memory.


def test_compressed_mixed_card_matches_dequantize(model, ids):
    n = len(ids) - 1
    card, _ = card_of(
        model, ids[:n], controller="saliency", budget=4.5, config=QuantConfig()
    )
    assert len(card.width_histogram()) > 1  # mixed widths
    comp = inject(card, model, mode="compressed")
    assert all(type(c) is MixedQuantizedKVCache for c in comp)
    nbytes = sum(c.nbytes for c in comp)
    index_bytes = 4 * card.n_tokens * card.cache["n_layers"]
    # on a CPU, 3-, 5- and 6-bit codes are held at 4 or 8 bits (attention.widen)
    held = sum(widen(s).payload_bits() for layer in card.layers for s in layer) // 8
    assert card.payload_bytes < held <= nbytes <= held + index_bytes
    deq = inject(card, model, mode="dequantize")
    assert nbytes < sum(c.nbytes for c in deq) / 4
    a = last_logits(model, comp, ids[n:])
    b = last_logits(model, deq, ids[n:])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # and it keeps decoding: several single-token steps stay equal
    for t in (3, 9, 27):
        np.testing.assert_allclose(
            last_logits(model, comp, [t]),
            last_logits(model, deq, [t]),
            atol=1e-5,
            rtol=0,
        )
    assert comp[0].offset == deq[0].offset == len(ids) + 3


def test_uniform_token_card_becomes_quantized_kv_cache(model, ids):
    n = len(ids) - 1
    card, _ = card_of(model, ids[:n], budget=5.0, config=TOKEN_G32)
    comp = inject(card, model, mode="compressed")
    assert all(type(c) is QuantizedKVCache for c in comp)
    assert (comp[0].bits, comp[0].group_size, comp[0].offset) == (4, 32, n)
    assert comp[0].keys[1].dtype == mx.float32  # scales cast to the model dtype
    seg = card.layers[0][0]
    assert np.array_equal(np.array(comp[0].keys[0]), seg.keys.codes)
    assert np.array_equal(np.array(comp[0].keys[1]), seg.keys.scales.astype(np.float32))
    # mlx-lm quantizes the receiver's new token too (4 bits, group 32), so the
    # logits differ from dequantize mode by about one 4-bit rounding of one token
    a = last_logits(model, comp, ids[n:])
    b = last_logits(model, inject(card, model), ids[n:])
    assert np.abs(a - b).max() < 0.05 * np.std(b)
    assert comp[0].offset == n + 1


# ---------------------------------------------------------------------------
# Model checks


def test_card_for_another_model_is_refused(model, ids):
    card, _ = card_of(model, ids[:20])
    card.model["tokenizer_sha256"] = None  # no tokenizer hash to lean on
    three_layers = tiny_llama({**TINY_LLAMA_CONFIG, "num_hidden_layers": 3}).mlx_model
    wide_head = tiny_llama({**TINY_LLAMA_CONFIG, "head_dim": 64}).mlx_model
    for other in (three_layers, wide_head):
        with pytest.raises(ModelMismatchError, match="another model"):
            inject(card, other)
    qkv = card.to_quantized()
    with pytest.raises(ModelMismatchError, match="n_layers"):
        inject(qkv, three_layers)
    with pytest.raises(ConfigError, match="mode"):
        inject(card, model, mode="fast")


# ---------------------------------------------------------------------------
# Prompt alignment


def test_align_strict_and_prefix(model, ids):
    card, _ = card_of(model, ids[:50])
    toks = list(ids[:50])
    with pytest.raises(PromptMismatchError, match=r"prompt_tokens\[20\]"):
        align(card, toks[:20] + [toks[20] + 1] + toks[21:] + [1], policy="strict")
    with pytest.raises(PromptMismatchError, match="at least the card's 50"):
        align(card, toks[:30], policy="strict")
    assert align(card, toks + [4, 5], policy="strict") == (50, [4, 5])
    # a prompt equal to the card re-feeds its last token for logits
    assert align(card, toks, policy="strict") == (49, [toks[-1]])
    # prefix: reuse the common part, trim the cache to it
    for mode in ("dequantize", "compressed"):
        cache = inject(card, model, mode=mode)
        prompt = toks[:30] + [1, 2, 3]
        n, rest = align(card, prompt, policy="prefix", cache=cache)
        assert (n, rest) == (30, [1, 2, 3]) and cache[0].offset == 30
        got = last_logits(model, cache, rest)
        np.testing.assert_allclose(got, exact_logits(model, prompt), atol=1e-4)
    with pytest.raises(PromptMismatchError):
        align(card, [], policy="prefix")
    with pytest.raises(ConfigError, match="policy"):
        align(card, toks, policy="loose")


# ---------------------------------------------------------------------------
# High-level API


# ---------------------------------------------------------------------------
# Room for the receiver's tokens; stream mode


def test_injected_cache_has_room_and_continues_exactly(model):
    ids = np.random.default_rng(3).integers(0, TINY_LLAMA_CONFIG["vocab_size"], 150)
    pre = prefill(model, ids, probe_queries=8)
    qkv = quantize_cache(
        pre.keys,
        pre.values,
        controller="uniform",
        budget_bits=32,
        config=QuantConfig(float_dtype="float32"),
    )
    card = CacheCard.from_bytes(
        CacheCard.from_quantized(qkv, ids, fingerprint(model)).to_bytes()
    )
    cache = inject(card, model, mode="dequantize")
    assert all(c.offset == 150 and c.keys.shape[2] >= 151 for c in cache)
    before = [c.keys for c in cache]
    feed = mx.array([[1, 2, 3]])
    got = np.array(model(feed, cache=cache)[0, -1])
    # the new tokens went into the preallocated room (no reallocation)
    assert all(c.keys.shape == b.shape for c, b in zip(cache, before))
    ref = np.array(model(mx.array(np.r_[ids, [1, 2, 3]].astype(np.int32))[None])[0, -1])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def offset_card(model, ids, offset, rotation="none", budget=4.0):
    pre = prefill(model, ids, probe_queries=8)
    qkv = quantize_cache(
        pre.keys,
        pre.values,
        controller="saliency",
        budget_bits=budget,
        stats=pre.stats,
        config=QuantConfig(rotation=rotation),
    )
    return CacheCard.from_bytes(
        CacheCard.from_quantized(qkv, ids, fingerprint(model), offset=offset).to_bytes()
    )


def test_stream_mode_refuses_an_offset_card(model):
    ids = np.random.default_rng(6).integers(0, TINY_LLAMA_CONFIG["vocab_size"], 80)
    card = offset_card(model, ids, offset=5)
    with pytest.raises(ConfigError, match="'stream'"):
        inject(card, model, mode="stream")


# ---------------------------------------------------------------------------
# Who decodes: host numpy (the CPU fast path) or MLX ops on the device.


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("mode", ["dequantize", "stream"])
def test_device_decode_equals_the_host_fast_path(model, ids, rotation, mode):
    """decode="mlx" (what a GPU receiver runs: mx.dequantize-style ops,
    mx.hadamard_transform) gives the host path's caches: bit for bit without
    a rotation (the same float32 multiply then add), to float32 rounding
    with one (a transform against a (D, D) matmul)."""
    config = QuantConfig(rotation=rotation, split_kv=True)
    card, _ = card_of(model, ids[:90], controller="saliency", budget=4.5, config=config)
    host = inject(card, model, mode=mode, decode="numpy")
    device = inject(card, model, mode=mode, decode="mlx")
    assert [type(c) for c in device] == [KVCache] * len(device)
    for a, b in zip(host, device):
        assert a.offset == b.offset == 90
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            x, y = np.array(x[..., :90, :]), np.array(y[..., :90, :])
            if rotation == "none":
                assert np.array_equal(x, y)
            else:
                assert np.abs(x - y).max() <= 2e-6 * np.abs(x).max()
    feed = ids[90:]
    np.testing.assert_allclose(
        last_logits(model, device, feed), last_logits(model, host, feed), atol=1e-4
    )


def test_auto_decodes_on_the_host_on_a_cpu(model, ids, monkeypatch):
    import qkvshare_mlx.inject as injection

    calls = []
    real = injection.dequantize_layer
    monkeypatch.setattr(
        injection, "dequantize_layer", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    card, _ = card_of(model, ids[:40])
    inject(card, model)  # the default device here is the CPU
    assert calls == [] and mx.default_device().type == mx.DeviceType.cpu
    inject(card, model, decode="mlx")
    assert len(calls) == len(card.layers)
    with pytest.raises(ConfigError, match="decode must be one of"):
        inject(card, model, decode="gpu")


@pytest.mark.parametrize("mode", ["dequantize", "stream"])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_reused_buffers_give_the_same_cache(model, ids, rotation, mode):
    cfg = QuantConfig(rotation=rotation)
    first = card_of(model, ids[:90], controller="saliency", budget=4.5, config=cfg)[0]
    second = card_of(model, ids[:70], controller="saliency", budget=3.0, config=cfg)[0]
    old = inject(first, model)
    model(mx.array([[3, 4]]), cache=old)  # the receiver used it
    old_bufs = [(c.keys, c.values) for c in old]
    got = inject(second, model, mode=mode, reuse=old)
    want = inject(second, model)
    for g, w, (ok, ov) in zip(got, want, old_bufs, strict=True):
        assert g.keys is ok and g.values is ov  # decoded in place
        assert g.offset == w.offset == 70
        # the whole buffer: no earlier rows stay behind past the offset
        assert g.keys.shape == w.keys.shape
        assert mx.array_equal(g.keys, w.keys) and mx.array_equal(g.values, w.values)
    feed = mx.array([[5, 6, 7]])
    assert mx.array_equal(model(feed, cache=got), model(feed, cache=want))


def test_buffers_too_small_are_not_reused(model, ids):
    small = []
    for _ in range(TINY_LLAMA_CONFIG["num_hidden_layers"]):
        c = KVCache()
        c.update_and_fetch(*(mx.zeros((1, 2, 20, 32)) for _ in range(2)))
        c.keys, c.values = c.keys[..., :32, :], c.values[..., :32, :]
        small.append(c)  # room for 32 tokens
    big = card_of(model, ids[:84])[0]  # the receiver's cache needs 256
    got = inject(big, model, reuse=small)
    assert all(g.keys is not s.keys for g, s in zip(got, small, strict=True))
    want = inject(big, model)
    assert all(
        mx.array_equal(g.state[0], w.state[0]) for g, w in zip(got, want, strict=True)
    )
