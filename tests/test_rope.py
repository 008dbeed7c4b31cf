"""Pre-RoPE keys (qkvshare_mlx.rope): the rotation, its probe of a model's
RoPE, its metadata, and cards holding keys before RoPE in every decoder."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE, SuScaledRoPE

from qkvshare_mlx import rope
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.fingerprint import fingerprint
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.fastpath import dequantize_layers, stream_layers
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np, quantize_cache_np
from qkvshare_mlx.rope import KeyRope, RopeSpec


def _rope_at(module):
    def at(x, p):
        out = module(mx.array(x)[None, :, None, :], offset=p)
        return np.array(out)[0, :, 0, :]

    return at


ROPES = {
    "llama": (nn.RoPE(64, base=10000.0), "half", 64),
    "traditional": (nn.RoPE(64, traditional=True, base=10000.0), "interleaved", 64),
    "partial": (nn.RoPE(32, base=10000.0), "half", 32),  # Phi-style partial rotary
    "gemma-global": (nn.RoPE(64, base=1e6, scale=0.125), "half", 64),
    "llama3": (
        Llama3RoPE(
            64,
            base=500000.0,
            scaling_config={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        "half",
        64,
    ),
    "longrope": (  # input scaled as well as rotated
        SuScaledRoPE(
            64, long_factor=[1.0 + i / 64 for i in range(32)], long_mscale=1.2
        ),
        "half",
        64,
    ),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_probe_reproduces_the_models_rope(name):
    module, pairing, dims = ROPES[name]
    spec = rope.probe(_rope_at(module), 64)
    assert (spec.pairing, spec.dims) == (pairing, dims)
    x = mx.random.normal((1, 2, 3000, 64), key=mx.random.key(1))
    want = module(x)
    scale = np.array(module(mx.ones((1, 1, 1, 64))))[0, 0, 0, 0]  # position 0
    got = np.array(rope.rope_mx(x, spec)) * scale
    # the model's float32 angles (t * f rounded) drift ~1e-4 rad by t = 3000
    assert np.abs(got - np.array(want)).max() < 2e-3 * np.abs(np.array(want)).max()


def test_probe_refuses_what_is_not_a_rope_of_pairs():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))

    def mixing(x, p):  # an orthogonal map, but every channel mixed
        return x @ np.linalg.matrix_power(q, p)

    with pytest.raises(ConfigError, match="not|pairs"):
        rope.probe(mixing, 64)

    def scaled_at_zero(x, p):
        return x * np.linspace(1, 2, 64)

    with pytest.raises(ConfigError, match="position 0"):
        rope.probe(scaled_at_zero, 64)


@pytest.mark.parametrize(
    "pairing,n_freqs", [("half", 32), ("interleaved", 32), ("half", 16)]
)
def test_numpy_and_mlx_rotate_the_same_bits_and_undo_it(pairing, n_freqs):
    spec = RopeSpec(pairing, tuple(float(np.float32(0.8**i)) for i in range(n_freqs)))
    x = np.random.default_rng(2).standard_normal((1, 3, 2500, 64)).astype(np.float32)
    fwd_np = rope.rope_np(x, spec)
    fwd_mx = np.array(rope.rope_mx(mx.array(x), spec))
    assert np.array_equal(fwd_np, fwd_mx)
    back = rope.rope_np(fwd_np, spec, inverse=True)
    assert np.array_equal(
        back, np.array(rope.rope_mx(mx.array(fwd_np), spec, inverse=True))
    )
    assert np.abs(back - x).max() < 1e-5
    # row 0 is not moved, channels past 2F are never moved, others are
    assert np.array_equal(fwd_np[:, :, 0], x[:, :, 0])
    assert np.array_equal(fwd_np[..., 2 * n_freqs :], x[..., 2 * n_freqs :])
    assert (
        np.abs(fwd_np[:, :, 1:, : 2 * n_freqs] - x[:, :, 1:, : 2 * n_freqs]).max() > 1
    )
    # one pair by hand: row 7, pair 1, angle 7 * f_1
    a, b = (1, 1 + n_freqs) if pairing == "half" else (2, 3)
    th = 7 * spec.freqs[1]
    want = x[0, 0, 7, a] * math.cos(th) - x[0, 0, 7, b] * math.sin(th)
    assert fwd_np[0, 0, 7, a] == pytest.approx(want, abs=1e-5)


def test_key_rope_round_trips_and_refuses_bad_fields():
    kr = KeyRope(
        (RopeSpec("half", (1.0, 0.5)), RopeSpec("interleaved", (0.25,))), (0, 1, 0)
    )
    assert KeyRope.from_dict(kr.to_dict()) == kr
    kr.check(3, 4)
    with pytest.raises(ConfigError, match="expected 4 entries"):
        kr.check(3 + 1, 4)
    with pytest.raises(ConfigError, match="head size 2"):
        kr.check(3, 2)
    bad = [
        ({"specs": [], "layers": [0]}, "one or more"),
        ({"specs": [{"pairing": "half", "freqs": [0.1]}], "layers": [0]}, "float32"),
        ({"specs": [{"pairing": "half", "freqs": [4.0]}], "layers": [0]}, "pi"),
        ({"specs": [{"pairing": "half", "freqs": [1]}], "layers": [0]}, "float32"),
        ({"specs": [{"pairing": "odd", "freqs": [1.0]}], "layers": [0]}, "pairing"),
        ({"specs": [{"pairing": "half", "freqs": [1.0]}], "layers": [1]}, "indices"),
        ({"specs": [{"pairing": "half", "freqs": [1.0]}], "layers": [True]}, "indices"),
        ({"specs": [{"pairing": "half", "freqs": [1.0]}]}, "keys"),
    ]
    for d, words in bad:
        with pytest.raises(ConfigError, match=words):
            KeyRope.from_dict(d)
    with pytest.raises(ConfigError, match="KeyRope"):
        QuantConfig(key_rope={"specs": []})


def test_from_mlx_model_reads_every_layer(tiny_mlx):
    kr = rope.from_mlx_model(tiny_mlx)
    assert len(kr.layers) == len(tiny_mlx.layers) and len(kr.specs) == 1
    D = tiny_mlx.layers[0].self_attn.rope.dims
    base = tiny_mlx.layers[0].self_attn.rope.base
    want = base ** (-np.arange(0, D, 2) / D)
    assert np.allclose(kr.specs[0].freqs, want, rtol=1e-6, atol=1e-9)


def _roped_cache(model, kr, L=None, T=300, seed=0):
    """Keys with a constant outlier channel before RoPE, then RoPE'd (what
    real keys look like), and plain values."""
    rng = np.random.default_rng(seed)
    L = L or len(kr.layers)
    ks, vs = [], []
    for li in range(L):
        k = rng.standard_normal((1, 2, T, 64)).astype(np.float32)
        k[..., 2] += 8.0  # a fast-turning pair: RoPE swings it into channel 34
        ks.append(rope.rope_mx(mx.array(k), kr.spec(li)))
        vs.append(mx.array(rng.standard_normal((1, 2, T, 64)).astype(np.float32)))
    return ks, vs


TWO_SPECS = KeyRope(
    (
        RopeSpec("half", tuple(float(np.float32(1e4 ** (-i / 32))) for i in range(32))),
        RopeSpec(
            "half", tuple(float(np.float32(1e6 ** (-i / 32) / 8)) for i in range(32))
        ),
    ),
    (0, 1, 1),
)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_pre_rope_card_decodes_the_same_in_every_decoder(rotation):
    ks, vs = _roped_cache(None, TWO_SPECS)
    config = QuantConfig(key_rope=TWO_SPECS, rotation=rotation)
    qkv = quantize_cache(ks, vs, controller="uniform", budget_bits=4.5, config=config)
    card = CacheCard.from_quantized(qkv, np.arange(300), {"model_type": "llama"})
    back = CacheCard.from_bytes(card.to_bytes())
    assert back.version == 4 and back.qkv.config.key_rope == TWO_SPECS
    q = back.to_quantized()
    T = q.n_tokens
    k_np, v_np = dequantize_cache_np(q)
    k_mx, _ = dequantize_cache(q)
    opts = {"rotation": rotation, "key_rope": q.config.key_rope}
    fast = dequantize_layers(q.layers, T, **opts)
    streamed = [f.result() for f in stream_layers(q.layers, T, **opts)]
    for li in range(3):
        want = k_np[li]
        assert np.array_equal(want, np.array(k_mx[li]))
        assert np.array_equal(want, np.array(fast[li][0])[:, :, :T])
        assert np.array_equal(want, np.array(streamed[li][0])[:, :, :T])
        # real keys come back (a missing forward rotation is off by ~|k|)
        err = np.abs(want - np.array(ks[li])).max()
        assert err < 0.6, err
    # and pre-RoPE quantizing is what makes them better than plain at 4.5 bits
    plain = quantize_cache(
        ks,
        vs,
        controller="uniform",
        budget_bits=4.5,
        config=QuantConfig(rotation=rotation),
    )
    k_plain, _ = dequantize_cache_np(plain)
    mse = [np.mean((a - np.array(b)) ** 2) for a, b in zip(k_np, ks)]
    mse_plain = [np.mean((a - np.array(b)) ** 2) for a, b in zip(k_plain, ks)]
    assert sum(mse) < 0.9 * sum(mse_plain)


def test_numpy_sender_quantizes_before_rope_as_the_mlx_one_does():
    ks, vs = _roped_cache(None, TWO_SPECS, seed=3)
    k_np = [np.array(k) for k in ks]
    v_np = [np.array(v) for v in vs]

    def mse(qkv):
        keys, _ = dequantize_cache_np(qkv)
        return sum(np.mean((a - b) ** 2) for a, b in zip(keys, k_np))

    config = QuantConfig(key_rope=TWO_SPECS)
    kw = {"controller": "uniform", "budget_bits": 4.0}
    pre_np = mse(quantize_cache_np(k_np, v_np, config=config, **kw))
    pre_mx = mse(quantize_cache(ks, vs, config=config, **kw))
    plain_np = mse(quantize_cache_np(k_np, v_np, config=QuantConfig(), **kw))
    assert pre_np == pytest.approx(pre_mx, rel=0.1)  # the grids round alike
    assert pre_np < 0.9 * plain_np


def test_pre_rope_is_refused_where_it_cannot_apply(tiny_mlx):
    from qkvshare_mlx.inject import inject

    ks, vs = _roped_cache(None, TWO_SPECS)
    with pytest.raises(ConfigError, match="query"):
        quantize_cache(
            ks,
            vs,
            controller="uniform",
            budget_bits=4.5,
            config=QuantConfig(key_rope=TWO_SPECS, key_error="query"),
        )
    with pytest.raises(ConfigError, match="2 entries|3 entries"):
        quantize_cache(
            ks[:2],
            vs[:2],
            controller="uniform",
            budget_bits=4.5,
            config=QuantConfig(key_rope=TWO_SPECS),
        )
    # inheriting: one key_rope per card
    qkv = quantize_cache(
        ks,
        vs,
        controller="uniform",
        budget_bits=4.5,
        config=QuantConfig(key_rope=TWO_SPECS),
    )
    with pytest.raises(ConfigError, match="key_rope"):
        quantize_cache(
            ks,
            vs,
            controller="uniform",
            budget_bits=4.5,
            config=QuantConfig(),
            inherited=qkv,
        )
    # compressed receivers attend on the codes, which RoPE does not fold into
    kr = rope.from_mlx_model(tiny_mlx)
    toks = np.arange(40) % 100
    from qkvshare_mlx.capture import prefill

    pre = prefill(tiny_mlx, toks, probe_queries=8)
    q = quantize_cache(
        pre.keys,
        pre.values,
        controller="uniform",
        budget_bits=4.5,
        config=QuantConfig(key_rope=kr, key_layout="token"),
    )
    card = CacheCard.from_quantized(q, toks, fingerprint(tiny_mlx))
    with pytest.raises(ConfigError, match="compressed"):
        inject(card, tiny_mlx, mode="compressed")


@pytest.mark.parametrize("mode", ["dequantize", "stream"])
def test_lossless_pre_rope_card_gives_the_senders_greedy_tokens(tiny_mlx, ids, mode):
    from qkvshare_mlx.capture import prefill
    from qkvshare_mlx.inject import inject

    toks = ids[:120]
    kr = rope.from_mlx_model(tiny_mlx)
    pre = prefill(tiny_mlx, toks, probe_queries=8)
    q = quantize_cache(
        pre.keys,
        pre.values,
        controller="uniform",
        budget_bits=32,
        config=QuantConfig(key_rope=kr, float_dtype="float32", widths=(16,)),
    )
    card = CacheCard.from_bytes(
        CacheCard.from_quantized(q, toks, fingerprint(tiny_mlx)).to_bytes()
    )
    caches = inject(card, tiny_mlx, mode=mode)
    for c, k in zip(caches, pre.keys):
        got = c.state[0][..., : k.shape[2], :]
        assert np.abs(np.array(got) - np.array(k)).max() < 1e-4 * float(mx.abs(k).max())

    def greedy(cache, first, n=8):
        out, tok = [], first
        for _ in range(n):
            logits = tiny_mlx(mx.array([[tok]]), cache=cache)
            tok = int(mx.argmax(logits[0, -1]))
            out.append(tok)
        return out

    exact = greedy(pre.cache, int(ids[120]))
    assert greedy(caches, int(ids[120])) == exact


def test_pre_rope_card_with_padded_rows_decodes_alike():
    # head size 80: per-token rows padded to 96 (version 3 features) under
    # keys before RoPE (version 4): the forward rotation sees the 80 real
    # channels only, in every decoder
    spec = RopeSpec(
        "half", tuple(float(np.float32(1e4 ** (-i / 40))) for i in range(40))
    )
    kr = KeyRope((spec,), (0, 0))
    rng = np.random.default_rng(4)
    ks, vs = [], []
    for _ in range(2):
        k = rng.standard_normal((1, 2, 200, 80)).astype(np.float32)
        k[..., 1] += 6.0
        ks.append(rope.rope_mx(mx.array(k), spec))
        vs.append(mx.array(rng.standard_normal((1, 2, 200, 80)).astype(np.float32)))
    config = QuantConfig(key_rope=kr, key_layout="token")
    qkv = quantize_cache(ks, vs, controller="uniform", budget_bits=6.0, config=config)
    back = CacheCard.from_bytes(
        CacheCard.from_quantized(
            qkv, np.arange(200), {"model_type": "llama"}
        ).to_bytes()
    ).to_quantized()
    assert any(s.keys.dim == 80 for layer in back.layers for s in layer)  # padded
    k_np, _ = dequantize_cache_np(back)
    k_mx, _ = dequantize_cache(back)
    fast = dequantize_layers(back.layers, 200, key_rope=kr)
    for li in range(2):
        assert np.array_equal(k_np[li], np.array(k_mx[li]))
        assert np.array_equal(k_np[li], np.array(fast[li][0])[:, :, :200])
        # the real keys: far closer than the rows before RoPE are to them
        err = np.abs(k_np[li] - np.array(ks[li])).mean()
        unrotated = rope.rope_np(k_np[li], spec, inverse=True)
        assert err < 0.25 * np.abs(unrotated - np.array(ks[li])).mean()
