"""The numpy reference codec (quant/numpy_backend): error bounds, packing,
fast unpacking, row-wise decoding, and its own quantize_cache_np."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import element_steps, outlier_data, per_element, rounding_slack

from qkvshare_mlx.errors import CacheShapeError, ConfigError
from qkvshare_mlx.formats import CODE_BITS, GROUP_SIZES
from qkvshare_mlx.quant import numpy_backend as codec
from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np, quantize_cache_np


@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("bits", CODE_BITS)
def test_codec_error_within_half_step(bits, group, layout):
    """Numpy reference codec: |x - dequant| <= |scale|/2 + float slack."""
    x = outlier_data((1, 2, 128, 128), seed=bits * group)
    x16 = x.astype(np.float16).astype(np.float32)
    enc = codec.encode(x16, bits, layout, group, None)
    y = codec.decode(enc, bits)
    s = per_element(enc.scales, group, layout, 128)
    z = per_element(enc.biases, group, layout, 128)
    err = np.abs(y - x16)
    assert (err <= np.abs(s) / 2 + rounding_slack(x16, s, z, bits)).all()
    # Not vacuous: the step is what the width implies for these ranges.
    assert np.abs(s).max() < (x16.max() - x16.min()) / ((1 << bits) - 1) * 1.01


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


# ---------------------------------------------------------------------------
# quantize_cache_np


@pytest.mark.parametrize("D, budget", [(64, 3.5), (80, 4.5)])
def test_numpy_quantizer_error_is_at_most_half_a_step(D, budget):
    """Head size 80 (no group size divides it) too: rows padded to 96."""
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((1, 2, 100, D)).astype(np.float32) for _ in range(2)]
    values = [rng.standard_normal((1, 2, 100, D)).astype(np.float32) for _ in range(2)]
    qkv = quantize_cache_np(keys, values, controller="sink-recent", budget_bits=budget)
    assert len(qkv.width_histogram()) > 1
    assert qkv.effective_bits <= budget + 0.02  # the pad counted
    dk, dv = dequantize_cache_np(qkv)
    assert dk[0].shape == dv[0].shape == (1, 2, 100, D)
    for li in range(2):
        sk, sv = element_steps(qkv.layers[li], 100)
        assert (np.abs(dk[li] - keys[li]) <= sk / 2 * (1 + 1e-3) + 1e-6).all()
        assert (np.abs(dv[li] - values[li]) <= sv / 2 * (1 + 1e-3) + 1e-6).all()


def test_numpy_quantizer_validates_input():
    ok = np.zeros((1, 2, 8, 64), np.float32)
    bad = ok.copy()
    bad[0, 1, 3, 5] = np.nan
    with pytest.raises(CacheShapeError, match="NaN"):
        quantize_cache_np([ok], [bad], controller="uniform")
    with pytest.raises(CacheShapeError, match=r"\(B, H, T, D\)"):
        quantize_cache_np([ok[0]], [ok[0]], controller="uniform")
    with pytest.raises(CacheShapeError, match="differ"):
        quantize_cache_np([ok], [ok[:, :1]], controller="uniform")
    with pytest.raises(ConfigError, match="budget_bits"):
        quantize_cache_np([ok], [ok], controller="uniform", budget_bits=99)


def test_numpy_quantizer_keeps_inherited_segments():
    rng = np.random.default_rng(1)
    k = [rng.standard_normal((1, 2, 70, 64)).astype(np.float32)]
    v = [rng.standard_normal((1, 2, 70, 64)).astype(np.float32)]
    first = quantize_cache_np(
        [x[:, :, :40] for x in k],
        [x[:, :, :40] for x in v],
        controller="uniform",
        budget_bits=4.5,
    )
    both = quantize_cache_np(
        k, v, controller="uniform", budget_bits=8.5, inherited=first
    )
    assert both.layers[0][: len(first.layers[0])] == first.layers[0]
    assert both.n_tokens == 70
