"""The project's mlx-lm cache classes: protocol, state round trips, prompt-cache files.

After mlx-lm's own prompt-cache tests: every cache class the project creates is
saved with ``mlx_lm.models.cache.save_prompt_cache``, loaded with
``qkvshare_mlx.load_prompt_cache``, and must hold bit-identical keys/values and
answer the next ``update_and_fetch`` bit-identically.
"""

from concurrent.futures import Future

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_LLAMA_CONFIG, prefill_card
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache, save_prompt_cache

import qkvshare_mlx
from qkvshare_mlx.caches import MixedQuantizedKVCache, StreamedKVCache
from qkvshare_mlx.errors import CardFormatError
from qkvshare_mlx.formats import FLOAT_BITS, QuantConfig
from qkvshare_mlx.handoff import continue_from_card
from qkvshare_mlx.inject import inject
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import quantize_cache

H, T, D = 2, 200, 64  # T not a multiple of 64: per-channel keys leave token tails


@pytest.fixture(scope="module")
def model(tiny_mlx):
    return tiny_mlx


def random_qkv(seed=0, *, n_layers=2, controller="saliency", budget=5.0, **config):
    """quantize_cache of random (1, H, T, D) K/V; keys with two loud channels.

    By default: 4-bit tokens with per-channel and per-token keys, 2-bit tokens
    and float copies, in shuffled token order.
    """
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for _ in range(n_layers):
        k = rng.standard_normal((1, H, T, D)).astype(np.float32)
        k[..., [3, 17]] *= 25.0
        ks.append(mx.array(k))
        vs.append(mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)))
    stats = TokenStats(
        attention=rng.random((n_layers, T)) ** 4, key_norms=rng.random((n_layers, T))
    )
    config.setdefault("widths", (2, 4, 16))
    return quantize_cache(
        ks,
        vs,
        controller=controller,
        budget_bits=budget,
        stats=stats,
        config=QuantConfig(**config),
    )


def last_logits(model, cache, feed):
    x = mx.array(np.asarray(feed, dtype=np.int32))[None]
    return np.array(model(x, cache=cache)[0, -1])


def exact_logits(model, toks):
    return np.array(model(mx.array(np.asarray(toks, dtype=np.int32))[None])[0, -1])


def new_kv(n=2, seed=9, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(2))
    return mx.array(k).astype(dtype), mx.array(v).astype(dtype)


# ---------------------------------------------------------------------------
# Every cache class the project creates, by name.


def _feed(cache, n=3, seed=1):
    for c in cache:
        c.update_and_fetch(*new_kv(n, seed))
    return cache


def _mixed(**kw):
    return lambda: inject(random_qkv(**kw), mode="compressed")


def _with_start(start=5):
    return [
        MixedQuantizedKVCache(layer, T, start=start) for layer in random_qkv().layers
    ]


def _trimmed():
    cache = _feed(_mixed()())
    assert [c.trim(10) for c in cache] == [10, 10]  # 3 tail tokens, 7 card tokens
    return cache


def _arrived():
    cache = inject(random_qkv(), mode="stream")
    return _feed(cache)


KINDS = {
    "mixed": _mixed(),  # mixed widths, per-channel keys, float tokens
    "mixed-token-keys": _mixed(key_layout="token", group_size=32),
    "rotated": _mixed(rotation="hadamard"),
    "split-widths": _mixed(split_kv=True, widths=(2, 4, 6, 16)),  # keys > values
    "offset-card": _with_start,
    "tail": lambda: _feed(_mixed()()),
    "trimmed": _trimmed,
    "empty": lambda: [MixedQuantizedKVCache() for _ in range(2)],
    "tail-only": lambda: _feed([MixedQuantizedKVCache(start=4) for _ in range(2)]),
    "streamed": lambda: inject(random_qkv(), mode="stream"),
    "streamed-f16": lambda: inject(random_qkv(), mode="stream", dtype="float16"),
    "streamed-arrived": _arrived,
    "kv": lambda: inject(random_qkv(), mode="dequantize"),
    "quantized": lambda: inject(
        random_qkv(
            controller="uniform",
            budget=5.0,
            key_layout="token",
            group_size=32,
            adaptive_groups=False,
        ),
        mode="compressed",
    ),
}
LOADS_AS = {"streamed": KVCache, "streamed-f16": KVCache, "streamed-arrived": KVCache}


def _held(c):
    """Everything a layer answers with: (offset, size, its K/V arrays)."""
    if isinstance(c, MixedQuantizedKVCache):
        kv = c.dequantized(mx.float32) if c.size() else ()
        return c.offset, c.size(), list(kv)
    if isinstance(c, QuantizedKVCache):
        n = c.offset
        return n, n, [a[..., :n, :] for a in (*c.keys, *c.values)]
    n = c.offset
    return n, c.size(), [c.keys[..., :n, :], c.values[..., :n, :]]


def assert_same(a_tree, b_tree):
    """Two trees of arrays: same structure, dtypes, shapes and bits."""
    a_flat, b_flat = tree_flatten(a_tree), tree_flatten(b_tree)
    assert [k for k, _ in a_flat] == [k for k, _ in b_flat]
    for (_, a), (_, b) in zip(a_flat, b_flat):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert mx.array_equal(a, b).item()


def assert_same_cache(a, b):
    oa, sa, kva = _held(a)
    ob, sb, kvb = _held(b)
    assert (oa, sa) == (ob, sb)
    assert_same(kva, kvb)


def _dtype_of(c):
    if isinstance(c, QuantizedKVCache):
        return c.keys[1].dtype
    if isinstance(c, MixedQuantizedKVCache):
        return c.tail_keys.dtype if c.tail_keys is not None else mx.float32
    return c.keys.dtype


def assert_same_next_step(a, b):
    dtype = _dtype_of(a)
    k, v = new_kv(2, seed=11, dtype=dtype)
    assert_same(a.update_and_fetch(k, v), b.update_and_fetch(k, v))
    assert (a.offset, a.size()) == (b.offset, b.size())


def test_kinds_cover_every_format():
    formats = {(s.bits, s.keys.layout) for c in KINDS["mixed"]() for s in c.segments}
    assert len({b for b, _ in formats}) >= 2  # mixed widths
    assert ("channel" in {lay for _, lay in formats}) and FLOAT_BITS in {
        b for b, _ in formats
    }
    assert type(KINDS["quantized"]()[0]) is QuantizedKVCache
    assert type(KINDS["kv"]()[0]) is KVCache
    assert KINDS["rotated"]()[0].rotation == "hadamard"


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_by_mlx_lm_loads_back_bit_for_bit(kind, tmp_path):
    cache = KINDS[kind]()
    path = tmp_path / f"{kind}.safetensors"
    save_prompt_cache(str(path), cache, {"model": "tiny"})
    back, meta = qkvshare_mlx.load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "tiny"}
    want = LOADS_AS.get(kind, type(cache[0]))
    assert [type(c) for c in back] == [want] * len(cache)
    for a, b in zip(cache, back):
        assert_same_cache(a, b)
        assert_same_next_step(a, b)
        assert_same_cache(a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_round_trip_in_memory(kind):
    cache = KINDS[kind]()
    for a in cache:
        b = type(a).from_state(a.state)
        assert not hasattr(a, "meta_state")
        assert_same_cache(a, b)
        assert_same_next_step(a, b)


@pytest.mark.parametrize("kind", ["kv", "quantized"])
def test_mlx_lm_loader_reads_what_inject_makes(kind, tmp_path):
    cache = KINDS[kind]()
    path = tmp_path / "c.safetensors"
    save_prompt_cache(str(path), cache)
    theirs = mlx_cache.load_prompt_cache(str(path))
    ours = qkvshare_mlx.load_prompt_cache(str(path))
    for a, b, c in zip(cache, theirs, ours):
        assert type(a) is type(b) is type(c)
        assert_same_cache(a, b)
        assert_same_cache(b, c)


def test_mixed_state_carries_scalars_not_meta_state():
    c = KINDS["trimmed"]()[0]
    segments, tk, tv, n_card, n_visible, n_tail, start, rotation = c.state
    assert (n_card, n_visible, n_tail, start, rotation) == (T, T - 7, 0, 0, "none")
    assert tk is None and tv is None
    assert [s["bits"] for s in segments] == [s.bits for s in c.segments]
    assert all(isinstance(s["index"], mx.array) for s in segments)
    # save_prompt_cache serializes every leaf: arrays, ints, strings, None
    leaves = [x for _, x in tree_flatten(c.state)]
    assert all(isinstance(x, (mx.array, int, str, type(None))) for x in leaves)


def test_loader_names_an_unknown_cache_class(tmp_path):
    class NoSuchCache(KVCache):
        pass

    c = NoSuchCache()
    c.update_and_fetch(*new_kv())
    save_prompt_cache(str(tmp_path / "x.safetensors"), [c])
    with pytest.raises(CardFormatError, match="'NoSuchCache'"):
        qkvshare_mlx.load_prompt_cache(tmp_path / "x.safetensors")


def test_broken_mixed_state_is_a_format_error():
    segments, tk, tv, n_card, n_visible, n_tail, start, rotation = KINDS["tail"]()[
        0
    ].state
    with pytest.raises(CardFormatError, match="n_tail"):
        MixedQuantizedKVCache.from_state(
            (segments, tk, tv, n_card, n_visible, n_tail + 1, start, rotation)
        )
    with pytest.raises(CardFormatError, match="cover"):
        MixedQuantizedKVCache.from_state(
            (segments[1:], tk, tv, n_card, n_visible, n_tail, start, rotation)
        )
    broken = [dict(segments[0], keys={"layout": "token", "group": 32})]
    with pytest.raises(CardFormatError, match="codes"):
        MixedQuantizedKVCache.from_state(
            (broken, tk, tv, n_card, n_visible, n_tail, start, rotation)
        )
    with pytest.raises(CardFormatError, match="8 fields"):
        MixedQuantizedKVCache.from_state((segments, tk, tv))


# ---------------------------------------------------------------------------
# StreamedKVCache: a KVCache whose rows arrive later, without class swapping.


def test_streamed_cache_waits_only_for_its_rows():
    future = Future()
    c = StreamedKVCache(future, 5, dtype=mx.float16)
    # offset, size, mask and trimming need no rows
    assert (c.offset, c.size()) == (5, 5)
    assert c.make_mask(3, return_array=False, window_size=None) == "causal"
    assert c.is_trimmable() and not future.done()
    k, v = (mx.zeros((1, H, 8, D)) + i for i in range(2))
    future.set_result((k, v))
    assert c.keys.dtype == mx.float16 and mx.array_equal(c.values, v).item()
    # arrived: the rows live in the instance, under KVCache's names
    assert type(c) is StreamedKVCache and isinstance(c, KVCache)
    assert {"keys", "values", "offset"} <= set(vars(c)) and c._future is None
    assert c.update_and_fetch(*new_kv(2, dtype=mx.float16))[0].shape[2] == 7


def test_streamed_cache_state_set_before_arrival_replaces_the_rows():
    c = StreamedKVCache(Future(), 5)  # a decode that never lands
    k, v = new_kv(4)
    c.state = (k, v, 4)
    assert c.keys is k and c.values is v and c.offset == 4
    assert c.update_and_fetch(*new_kv(1))[0].shape[2] == 5


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_stream_mode_continues_exactly_like_dequantize(model, rotation):
    ids = np.random.default_rng(4).integers(0, TINY_LLAMA_CONFIG["vocab_size"], 150)
    card, _ = prefill_card(
        model,
        ids,
        controller="saliency",
        budget=4.0,
        config=QuantConfig(rotation=rotation),
    )
    eager = inject(card, model, mode="dequantize")
    streamed = inject(card, model, mode="stream")
    assert all(type(c) is StreamedKVCache and c.offset == 150 for c in streamed)
    feed = mx.array([[1, 2, 3]])
    want = np.array(model(feed, cache=eager))
    got = np.array(model(feed, cache=streamed))
    assert np.array_equal(got, want)
    # once used, each layer holds a plain KVCache's rows and room
    for s, e in zip(streamed, eager):
        assert isinstance(s, KVCache) and s._future is None
        assert s.offset == e.offset == 153
        assert s.keys.shape == e.keys.shape
        assert mx.array_equal(s.keys, e.keys).item()
        assert mx.array_equal(s.values, e.values).item()


def test_stream_mode_generates_and_saves_as_kv_cache(model, tmp_path):
    ids = np.random.default_rng(5).integers(0, TINY_LLAMA_CONFIG["vocab_size"], 120)
    card = prefill_card(
        model, ids, controller="saliency", budget=4.0, config=QuantConfig()
    )[0]
    want = continue_from_card(card, model, None, list(ids) + [9], max_tokens=8)
    got = continue_from_card(
        card, model, None, list(ids) + [9], max_tokens=8, mode="stream"
    )
    assert got.tokens == want.tokens and got.info["cache_class"] == "StreamedKVCache"
    # saved before any forward: reading the state waits for the decode
    cache = inject(card, model, mode="stream", dtype="float16")
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    back = qkvshare_mlx.load_prompt_cache(str(tmp_path / "c.safetensors"))
    ref = inject(card, model, mode="dequantize", dtype="float16")
    assert [type(c).__name__ for c in back] == ["KVCache"] * len(ref)
    for b, r in zip(back, ref):
        assert b.offset == r.offset == 120 and b.keys.dtype == mx.float16
        assert mx.array_equal(b.keys[..., :120, :], r.keys[..., :120, :]).item()


# ---------------------------------------------------------------------------
# MixedQuantizedKVCache against a model


def test_mixed_cache_state_round_trip_and_trim(model, ids):
    card, _ = prefill_card(
        model, ids[:80], controller="saliency", budget=4.5, config=QuantConfig()
    )
    cache = inject(card, model, mode="compressed")
    last_logits(model, cache, [1, 2, 3])
    clone = [MixedQuantizedKVCache.from_state(c.state) for c in cache]
    for a, b in zip(cache, clone, strict=True):
        ka, va = a.dequantized()
        kb, vb = b.dequantized()
        assert mx.array_equal(ka, kb) and mx.array_equal(va, vb)
        assert (a.offset, a.size()) == (b.offset, b.size()) == (83, 83)


def test_mixed_cache_trim_into_card_then_refeed(model, ids):
    card = prefill_card(model, ids[:80])[0]  # float32: refeeding is exact
    cache = [MixedQuantizedKVCache(layer, 80) for layer in card.layers]
    last_logits(model, cache, [1, 2, 3])
    # trim drops the 3 tail tokens, then hides 7 card tokens
    assert [c.trim(10) for c in cache] == [10, 10]
    assert (cache[0].offset, cache[0].n_tail, cache[0].n_visible) == (73, 0, 73)
    got = last_logits(model, cache, list(ids[73:80]) + [9])
    np.testing.assert_allclose(
        got, exact_logits(model, list(ids[:80]) + [9]), atol=1e-4
    )


def test_compressed_cache_state_keeps_the_rotation():
    c = inject(
        random_qkv(3, controller="uniform", rotation="hadamard"), mode="compressed"
    )[0]
    again = MixedQuantizedKVCache.from_state(c.state)
    assert again.rotation == "hadamard"
    a, b = c.dequantized(mx.float32), again.dequantized(mx.float32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
