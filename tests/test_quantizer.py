"""Quantizer and reference codec: error bounds, packing, budgets, hop stability,
and typed errors on bad input."""

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import CacheShapeError, ConfigError
from qkvshare_mlx.formats import CODE_BITS, GROUP_SIZES, QuantConfig, validate_bits
from qkvshare_mlx.quant import mlx_backend as quantizer
from qkvshare_mlx.quant import numpy_backend as codec
from qkvshare_mlx.quant.controllers import CONTROLLERS, TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache

U16 = 2.0**-11  # unit roundoff of float16 (10 stored mantissa bits)
U32 = 2.0**-24  # unit roundoff of float32


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    x[..., 5] *= 20  # an outlier channel
    return x


def _per_element(a, group, layout, D):
    """Scales/biases (.., rows, groups) broadcast back to (B, H, n, D)."""
    a = np.repeat(np.asarray(a, dtype=np.float32), group, axis=-1)
    return np.swapaxes(a, -1, -2) if layout == "channel" else a


def _slack(x, s, z, bits):
    """Float rounding allowed on top of the quantization step.

    The quantizer rounds its input to float16 (<= U16 |x|); dequantization
    ``s*q + z`` in float32 rounds twice (<= 2 U32 (|s| q + |x| + |z|)).
    """
    levels = (1 << bits) - 1
    return U16 * np.abs(x) + 2 * U32 * (np.abs(s) * levels + np.abs(x) + np.abs(z))


@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("bits", CODE_BITS)
def test_codec_error_within_half_step(bits, group, layout):
    """Numpy reference codec: |x - dequant| <= |scale|/2 + float slack."""
    x = _data((1, 2, 128, 128), seed=bits * group)
    x16 = x.astype(np.float16).astype(np.float32)
    enc = codec.encode(x16, bits, layout, group, None)
    y = codec.decode(enc, bits)
    s = _per_element(enc.scales, group, layout, 128)
    z = _per_element(enc.biases, group, layout, 128)
    err = np.abs(y - x16)
    assert (err <= np.abs(s) / 2 + _slack(x16, s, z, bits)).all()
    # Not vacuous: the step is what the width implies for these ranges.
    assert np.abs(s).max() < (x16.max() - x16.min()) / ((1 << bits) - 1) * 1.01


@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("bits", CODE_BITS)
def test_mlx_error_within_one_step(bits, group, layout):
    """MLX path (mx.quantize): |x - dequant| <= |scale| (1 + levels U16) + slack.

    mx.quantize (MLX 0.32) makes the group's edge value exact (bias = edge,
    scale = edge / round(edge / step)), which can clip the other end of the
    group by up to about one step: the half-step bound of the reference codec
    does not hold here (see test_mlx_error_within_half_step).
    """
    x = _data((1, 2, 128, 128), seed=bits * group)
    enc = quantizer.encode(mx.array(x), bits, layout, group, None)
    y = np.array(quantizer.decode(enc, bits))
    s = _per_element(enc.scales, group, layout, 128)
    z = _per_element(enc.biases, group, layout, 128)
    levels = (1 << bits) - 1
    bound = np.abs(s) * (1 + levels * U16) + U16 * np.abs(z) + _slack(x, s, z, bits)
    assert (np.abs(y - x) <= bound).all()
    # The numpy codec decodes the MLX encoding identically (one format).
    assert np.array_equal(codec.decode(enc, bits), y)


@pytest.mark.xfail(
    strict=True,
    reason="mx.quantize's exact-edge scale clips up to ~1 step (issue 4 report)",
)
def test_mlx_error_within_half_step():
    x = _data((1, 2, 128, 128))
    enc = quantizer.encode(mx.array(x), 2, "token", 32, None)
    y = np.array(quantizer.decode(enc, 2))
    x16 = x.astype(np.float16).astype(np.float32)
    s = _per_element(enc.scales, 32, "token", 128)
    z = _per_element(enc.biases, 32, "token", 128)
    assert (np.abs(y - x16) <= np.abs(s) / 2 + _slack(x16, s, z, 2)).all()


def test_float32_storage_is_bit_exact():
    x = [mx.array(_data((1, 3, 70, 64), seed=i)) for i in range(3)]
    v = [mx.array(_data((1, 3, 70, 64), seed=10 + i)) for i in range(3)]
    config = QuantConfig(widths=(16,), float_dtype="float32")
    qkv = quantize_cache(x, v, controller="uniform", budget_bits=32, config=config)
    k2, v2 = dequantize_cache(qkv, mx.float32)
    for a, b in zip(x + v, k2 + v2):
        assert np.array(a).tobytes() == np.array(b).tobytes()
    assert qkv.effective_bits == 32.0


# ---------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("bits", CODE_BITS)
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (3, 5, 128)).astype(np.uint8)
    words = codec.pack_codes(q, bits)
    assert words.dtype == np.uint32 and words.shape == (3, 5, 128 * bits // 32)
    assert np.array_equal(codec.unpack_codes(words, bits), q)


@pytest.mark.parametrize("bits", CODE_BITS)
def test_packing_equals_mx_quantize(bits):
    """Codes from mx.quantize, unpacked by the codec, are the integer codes;
    codes packed by the codec dequantize in MLX as s*q + z."""
    rng = np.random.default_rng(bits)
    levels = (1 << bits) - 1
    q = rng.integers(0, levels + 1, (4, 64)).astype(np.float32)
    q[:, ::32] = 0  # each 32-group spans the full range, so |scale| = 1
    q[:, 1::32] = levels
    codes, s, z = mx.quantize(mx.array(q), group_size=32, bits=bits)
    s, z = np.array(s), np.array(z)
    assert np.allclose(np.abs(s), 1.0)
    expect = np.rint((q - np.repeat(z, 32, -1)) / np.repeat(s, 32, -1))
    assert np.array_equal(codec.unpack_codes(np.array(codes), bits), expect)

    mine = codec.pack_codes(q.astype(np.uint8), bits)
    ones, zeros = mx.ones((4, 2)), mx.zeros((4, 2))
    back = mx.dequantize(mx.array(mine), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(back), q)


# ---------------------------------------------------------------------------
# Budgets


def _realistic_cache(L=4, H=2, T=512, D=64, seed=0):
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for _ in range(L):
        k = rng.standard_normal((1, H, T, D)).astype(np.float32)
        k[..., [3, 17]] *= 15  # outlier channels, as RoPE'd keys have
        k[..., 40] += 8
        ks.append(mx.array(k))
        vs.append(mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)))
    stats = TokenStats(
        attention=rng.random((L, T)) ** 4, key_norms=np.abs(rng.standard_normal((L, T)))
    )
    return ks, vs, stats


@pytest.fixture(scope="module")
def realistic():
    return _realistic_cache()


@pytest.mark.parametrize("budget", [2.5, 3, 4, 4.5, 6])
@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
def test_effective_bits_meet_budget(realistic, controller, budget):
    ks, vs, stats = realistic
    qkv = quantize_cache(ks, vs, controller=controller, budget_bits=budget, stats=stats)
    assert abs(qkv.effective_bits - budget) <= 0.05
    assert "budget_note" not in qkv.info
    # The accounting is what is really stored.
    stored = sum(
        a.nbytes
        for layer in qkv.layers
        for s in layer
        for e in (s.keys, s.values)
        for a in e.arrays().values()
    )
    assert qkv.payload_bytes == stored


def test_mixed_budget_beats_uniform_error(realistic):
    """At the same budget, the saliency allocation lowers attention-weighted error."""
    ks, vs, stats = realistic

    def weighted_error(qkv):
        k2, v2 = dequantize_cache(qkv)
        tot = 0.0
        for li in range(len(ks)):
            e = ((np.array(k2[li]) - np.array(ks[li])) ** 2).sum(axis=(0, 1, 3))
            e += ((np.array(v2[li]) - np.array(vs[li])) ** 2).sum(axis=(0, 1, 3))
            tot += float((stats.attention[li] * e).sum())
        return tot

    uni = quantize_cache(ks, vs, controller="uniform", budget_bits=3, stats=stats)
    sal = quantize_cache(ks, vs, controller="saliency", budget_bits=3, stats=stats)
    assert sal.effective_bits <= uni.effective_bits + 0.05
    assert weighted_error(sal) < weighted_error(uni)


# ---------------------------------------------------------------------------
# Hop stability


def _arrays(seg):
    out = [np.asarray(seg.index)]
    for e in (seg.keys, seg.values):
        out += [np.asarray(a) for a in e.arrays().values()]
    return out


def test_inherited_segments_survive_eight_hops_bit_identical():
    L, H, D = 3, 2, 64
    T0, step, hops = 96, 24, 8
    ks, vs, stats = _realistic_cache(L=L, H=H, T=T0 + step * hops, D=D, seed=3)
    qkv = quantize_cache(
        [k[:, :, :T0] for k in ks],
        [v[:, :, :T0] for v in vs],
        controller="saliency",
        budget_bits=4,
        stats=TokenStats(attention=stats.attention[:, :T0]),
    )
    first = [[_arrays(s) for s in layer] for layer in qkv.layers]
    first_dq = [np.array(k) for k in dequantize_cache(qkv)[0]]
    controllers = ["saliency", "topology", "uniform", "sink-recent"]
    for hop in range(hops):
        # Each hop goes through a card file, as between agents.
        card = CacheCard.from_quantized(qkv, np.zeros(qkv.n_tokens), {})
        prev = CacheCard.from_bytes(card.to_bytes()).to_quantized()
        T = prev.n_tokens + step
        before = [[_arrays(s) for s in layer] for layer in prev.layers]
        qkv = quantize_cache(
            [k[:, :, :T] for k in ks],
            [v[:, :, :T] for v in vs],
            controller=controllers[hop % 4],
            budget_bits=3 + hop % 3,
            stats=TokenStats(attention=stats.attention[:, :T]),
            inherited=prev,
        )
        assert qkv.n_tokens == T
        for li, layer in enumerate(qkv.layers):
            kept = len(before[li])
            for old, new in zip(before[li], layer[:kept]):
                assert all(
                    a.tobytes() == b.tobytes() for a, b in zip(old, _arrays(new))
                )
            new_index = np.concatenate([np.asarray(s.index) for s in layer[kept:]])
            assert np.array_equal(np.sort(new_index), np.arange(T - step, T))
    for li, layer in enumerate(qkv.layers):
        for old, new in zip(first[li], layer):
            assert all(a.tobytes() == b.tobytes() for a, b in zip(old, _arrays(new)))
    k_last = dequantize_cache(qkv)[0]
    for li in range(L):
        assert np.array_equal(np.array(k_last[li])[:, :, :T0], first_dq[li])


# ---------------------------------------------------------------------------
# Bad input


def _kv(shape=(1, 2, 8, 64), n=2):
    return [mx.zeros(shape) for _ in range(n)], [mx.zeros(shape) for _ in range(n)]


@pytest.mark.parametrize(
    "keys,values,needle",
    [
        ([mx.zeros((2, 8, 64))], [mx.zeros((2, 8, 64))], "(B, H, T, D)"),
        ([mx.zeros((1, 2, 8, 64))], [mx.zeros((1, 2, 9, 64))], "differ in (B, H, T)"),
        (
            [mx.zeros((1, 2, 8, 64)), mx.zeros((1, 3, 8, 64))],
            [mx.zeros((1, 2, 8, 64)), mx.zeros((1, 3, 8, 64))],
            "layer 1",
        ),
        ([mx.zeros((1, 2, 8, 64))], [], "0"),
        ([], [], "non-zero"),
    ],
)
def test_bad_shapes_are_cache_shape_errors(keys, values, needle):
    with pytest.raises(CacheShapeError) as err:
        quantize_cache(keys, values, controller="uniform", budget_bits=4.5)
    assert needle in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(bad):
    keys, values = _kv()
    values[1] = mx.array(np.where(np.arange(64) == 7, bad, 0.0).astype(np.float32))
    values[1] = mx.broadcast_to(values[1], (1, 2, 8, 64))
    with pytest.raises(CacheShapeError, match="layer 1.*NaN or Inf"):
        quantize_cache(keys, values, controller="uniform", budget_bits=4.5)


def test_unknown_controller_is_named():
    keys, values = _kv()
    with pytest.raises(ConfigError, match="'greedy'"):
        quantize_cache(keys, values, controller="greedy", budget_bits=4.5)


@pytest.mark.parametrize("bits", [1, 7, 9, 32, 0])
def test_bits_outside_the_set_are_named(bits):
    with pytest.raises(ConfigError, match=f"but got {bits}"):
        validate_bits(bits)
    with pytest.raises(ConfigError, match=f"but got {bits}"):
        QuantConfig(widths=(4, bits))


@pytest.mark.parametrize("group", [16, 48, 256])
def test_bad_group_sizes_are_named(group):
    with pytest.raises(ConfigError, match=f"group_size.*{group}"):
        QuantConfig(group_size=group)


@pytest.mark.parametrize(
    "budget,float_dtype",
    [
        (1.0, "float16"),
        (2.0, "float16"),
        (16.5, "float16"),
        (32.5, "float32"),
        (float("nan"), "float16"),
        ("lots", "float16"),
    ],
)
def test_budget_outside_reach_is_named(budget, float_dtype):
    keys, values = _kv()
    config = QuantConfig(float_dtype=float_dtype)
    for controller in ("uniform", "saliency"):
        with pytest.raises(ConfigError) as err:
            quantize_cache(
                keys,
                values,
                controller=controller,
                budget_bits=budget,
                config=config,
                stats=TokenStats(attention=np.ones((2, 8))),
            )
        assert "budget_bits" in str(err.value) and repr(budget) in str(err.value)


def test_saliency_without_stats_is_a_config_error():
    keys, values = _kv()
    with pytest.raises(ConfigError, match="statistics"):
        quantize_cache(keys, values, controller="saliency", budget_bits=4.5)


@pytest.mark.parametrize("bits", CODE_BITS)
def test_fast_unpack_equals_shifting_out_each_code(bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, (2, 3, 5 * bits), dtype=np.uint32)
    # the stream, one bit at a time: code i is bits [i*bits, (i+1)*bits)
    stream = (words[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    stream = stream.reshape(2, 3, -1, bits).astype(np.uint32)
    expect = (stream << np.arange(bits, dtype=np.uint32)).sum(-1)
    assert np.array_equal(codec.unpack_codes(words, bits), expect)
    as_float = codec.unpack_codes(words, bits, np.float32)
    assert as_float.dtype == np.float32 and np.array_equal(as_float, expect)


@pytest.mark.parametrize("bits", CODE_BITS)
@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("group", [32, 64])
def test_dequantize_rows_into_a_view_equals_decode(bits, layout, group):
    rng = np.random.default_rng(bits * group)
    x = rng.standard_normal((1, 2, 128, 64)).astype(np.float32) * 3
    enc = codec.encode(x, bits, layout, group, None)
    ref = codec.decode(enc, bits)
    assert np.array_equal(codec.dequantize_rows(enc, bits), ref)
    cache = np.zeros((1, 2, 200, 64), np.float32)  # rows 10..137 of a bigger buffer
    scratch = np.full(2 * 128 * 64 + 7, np.nan, np.float32)
    codec.dequantize_rows(enc, bits, out=cache[:, :, 10:138], scratch=scratch)
    assert np.array_equal(cache[:, :, 10:138], ref)
    assert not cache[:, :, :10].any() and not cache[:, :, 138:].any()
