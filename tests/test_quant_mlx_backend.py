"""The MLX quantizer backend (quant/mlx_backend): error bounds of mx.quantize,
one format with the numpy codec, lossless float32 storage."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import U16, outlier_data, per_element, rounding_slack

from qkvshare_mlx.formats import CODE_BITS, GROUP_SIZES, QuantConfig
from qkvshare_mlx.quant import mlx_backend as quantizer
from qkvshare_mlx.quant import numpy_backend as codec
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache


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
    x = outlier_data((1, 2, 128, 128), seed=bits * group)
    enc = quantizer.encode(mx.array(x), bits, layout, group, None)
    y = np.array(quantizer.decode(enc, bits))
    s = per_element(enc.scales, group, layout, 128)
    z = per_element(enc.biases, group, layout, 128)
    levels = (1 << bits) - 1
    bound = (
        np.abs(s) * (1 + levels * U16) + U16 * np.abs(z) + rounding_slack(x, s, z, bits)
    )
    assert (np.abs(y - x) <= bound).all()
    # The numpy codec decodes the MLX encoding identically (one format).
    assert np.array_equal(codec.decode(enc, bits), y)


@pytest.mark.xfail(
    strict=True,
    reason="mx.quantize's exact-edge scale clips up to ~1 step (issue 4 report)",
)
def test_mlx_error_within_half_step():
    x = outlier_data((1, 2, 128, 128))
    enc = quantizer.encode(mx.array(x), 2, "token", 32, None)
    y = np.array(quantizer.decode(enc, 2))
    x16 = x.astype(np.float16).astype(np.float32)
    s = per_element(enc.scales, 32, "token", 128)
    z = per_element(enc.biases, 32, "token", 128)
    assert (np.abs(y - x16) <= np.abs(s) / 2 + rounding_slack(x16, s, z, 2)).all()


def test_float32_storage_is_bit_exact():
    x = [mx.array(outlier_data((1, 3, 70, 64), seed=i)) for i in range(3)]
    v = [mx.array(outlier_data((1, 3, 70, 64), seed=10 + i)) for i in range(3)]
    config = QuantConfig(widths=(16,), float_dtype="float32")
    qkv = quantize_cache(x, v, controller="uniform", budget_bits=32, config=config)
    k2, v2 = dequantize_cache(qkv, mx.float32)
    for a, b in zip(x + v, k2 + v2):
        assert np.array(a).tobytes() == np.array(b).tobytes()
    assert qkv.effective_bits == 32.0
