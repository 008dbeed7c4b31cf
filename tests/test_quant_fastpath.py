"""The fast receive path (quant/fastpath): fused dequantization into
preallocated room, and the same rows decoded on a background thread."""

import time

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx import blas
from qkvshare_mlx.errors import CacheShapeError
from qkvshare_mlx.quant import numpy_backend as codec
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.fastpath import dequantize_layers, stream_layers
from qkvshare_mlx.quant.mlx_backend import dequantize_layer, quantize_cache

T = 200  # not a multiple of 64: per-channel keys leave token-layout tails


def mixed_qkv(seed=0, n_layers=3, T=T, D=64, config=None, windows=None):
    """A saliency-quantized random cache: many widths, layouts and floats."""
    rng = np.random.default_rng(seed)
    shape = (1, 2, T, D)
    keys = [
        mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(n_layers)
    ]
    values = [
        mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(n_layers)
    ]
    stats = TokenStats(
        attention=rng.random((n_layers, T)) ** 4, key_norms=rng.random((n_layers, T))
    )
    return quantize_cache(
        keys,
        values,
        controller="saliency",
        budget_bits=4.0 if D % 32 == 0 else 4.5,
        stats=stats,
        config=config,
        windows=windows,
    )


@pytest.mark.parametrize(
    "kind", ["split-widths", "head-dim-80", "windowed", "windowed-split-rotated"]
)
def test_fused_and_streamed_equal_per_layer_for_version_3_cards(kind):
    """Keys wider than values, padded rows of 80, layers held from their
    window: the fast paths decode them as the reference does, bit for bit
    (rotation: the fused path un-rotates in numpy, to float32 rounding)."""
    from qkvshare_mlx.formats import QuantConfig

    config = {
        "split-widths": QuantConfig(split_kv=True),
        "head-dim-80": None,
        "windowed": None,
        "windowed-split-rotated": QuantConfig(split_kv=True, rotation="hadamard"),
    }[kind]
    D = 80 if kind == "head-dim-80" else 64
    windows = [64, None, 64] if kind.startswith("windowed") else None
    qkv = mixed_qkv(D=D, config=config, windows=windows)
    assert kind != "split-widths" or any(
        s.value_bits for layer in qkv.layers for s in layer
    )
    rot = qkv.config.rotation
    fused = dequantize_layers(
        qkv.layers, T, mx.float32, capacity=256, rotation=rot, starts=qkv.starts
    )
    streamed = stream_layers(
        qkv.layers, T, capacity=256, rotation=rot, starts=qkv.starts
    )
    for layer, start, (k, v), fut in zip(qkv.layers, qkv.starts, fused, streamed):
        rk, rv = dequantize_layer(layer, T, mx.float32, rotation=rot, start=start)
        sk, sv = fut.result()
        for got in ((k, v), (sk, sv)):
            for a, want in zip(got, (rk, rv)):
                assert a.shape == (1, 2, 256, D)
                a, want = np.array(a[:, :, :T]), np.array(want)
                if rot == "none":
                    assert np.array_equal(a, want)
                else:
                    assert np.abs(a - want).max() <= 1e-5 * np.abs(want).max()
                assert not a[:, :, :start].any()


def test_mixed_cache_has_many_formats():
    qkv = mixed_qkv()
    formats = {
        (s.bits, s.keys.layout, s.keys.group) for layer in qkv.layers for s in layer
    }
    assert len(formats) >= 4  # the fused path is exercised across buckets


@pytest.mark.parametrize("capacity", [0, T, 256, 300])
@pytest.mark.parametrize("layers_per_pass", [1, 2, 8])
def test_fused_equals_per_layer_bit_for_bit(capacity, layers_per_pass):
    qkv = mixed_qkv()
    fused = dequantize_layers(
        qkv.layers, T, mx.float32, capacity=capacity, layers_per_pass=layers_per_pass
    )
    assert len(fused) == len(qkv.layers)
    for layer, (k, v) in zip(qkv.layers, fused):
        rk, rv = dequantize_layer(layer, T, mx.float32)
        n = max(capacity, T)
        assert k.shape == (1, 2, n, 64) and v.shape == (1, 2, n, 64)
        assert np.array_equal(np.array(k[:, :, :T]), np.array(rk))
        assert np.array_equal(np.array(v[:, :, :T]), np.array(rv))
        assert not np.any(np.array(k[:, :, T:])) and not np.any(np.array(v[:, :, T:]))


def test_per_layer_capacity_matches_fused():
    qkv = mixed_qkv(seed=1)
    for layer, (k, v) in zip(
        qkv.layers, dequantize_layers(qkv.layers, T, capacity=256)
    ):
        pk, pv = dequantize_layer(layer, T, mx.float32, capacity=256)
        assert np.array_equal(np.array(pk), np.array(k))
        assert np.array_equal(np.array(pv), np.array(v))


def test_fused_refuses_incomplete_layers():
    qkv = mixed_qkv()
    broken = [list(layer) for layer in qkv.layers]
    broken[1] = broken[1][1:]  # a layer missing a segment
    with pytest.raises(CacheShapeError):
        dequantize_layers(broken, T)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_fused_other_dtypes_equal_per_layer(dtype):
    qkv = mixed_qkv(seed=2)
    for layer, (k, v) in zip(
        qkv.layers, dequantize_layers(qkv.layers, T, dtype, capacity=256)
    ):
        rk, rv = dequantize_layer(layer, T, dtype)
        assert k.dtype == dtype and v.dtype == dtype
        assert mx.array_equal(k[:, :, :T], rk).item()
        assert mx.array_equal(v[:, :, :T], rv).item()
        assert not mx.any(k[:, :, T:]).item() and not mx.any(v[:, :, T:]).item()


def test_fused_equals_numpy_reference_decoder():
    """The fast path (numpy unpack + MLX affine) against codec.decode_layer."""
    qkv = mixed_qkv(seed=3)
    for layer, (k, v) in zip(qkv.layers, dequantize_layers(qkv.layers, T)):
        np_layer = [s.map_arrays(np.asarray) for s in layer]
        rk, rv = codec.decode_layer(np_layer, T)
        assert np.array_equal(np.array(k), rk) and np.array_equal(np.array(v), rv)


def test_fused_buffers_are_row_major():
    """Token-major buffers (what mx.take along tokens returns) made every
    attention step over the injected cache ~3x slower."""
    qkv = mixed_qkv(seed=4)
    for k, v in dequantize_layers(qkv.layers, T, capacity=256):
        for a in (k, v):
            view = np.array(a, copy=False)
            assert view.flags.c_contiguous and view.shape == (1, 2, 256, 64)


# ---------------------------------------------------------------------------
# mode="stream": the same rows, decoded on a background thread.


@pytest.mark.parametrize("capacity", [0, 256])
def test_stream_layers_equal_fused_bit_for_bit(capacity):
    qkv = mixed_qkv(seed=5)
    futures = stream_layers(qkv.layers, T, capacity=capacity)
    fused = dequantize_layers(qkv.layers, T, capacity=capacity)
    assert len(futures) == len(fused)
    for fut, (k, v) in zip(futures, fused):
        sk, sv = fut.result(timeout=60)
        assert mx.array_equal(sk, k).item() and mx.array_equal(sv, v).item()


@pytest.mark.skipif(
    blas.numpy_blas_threads_now() is None, reason="numpy without bundled OpenBLAS"
)
def test_decoders_keep_numpys_blas_narrow_only_while_they_run(monkeypatch):
    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.quant import fastpath

    qkv = mixed_qkv(seed=6, config=QuantConfig(rotation="hadamard"))
    seen = []
    fill = fastpath._fill_rows

    def spy(*args, **kwargs):  # the count the decode threads run under
        seen.append(blas.numpy_blas_threads_now())
        return fill(*args, **kwargs)

    monkeypatch.setattr(fastpath, "_fill_rows", spy)
    get, put = blas._numpy_openblas()
    before = get()
    put(2)
    try:
        dequantize_layers(qkv.layers, T, rotation="hadamard")
        assert seen and set(seen) == {1}
        assert blas.numpy_blas_threads_now() == 2
        seen.clear()
        for fut in stream_layers(qkv.layers, T, rotation="hadamard"):
            fut.result(timeout=60)
        assert seen and set(seen) == {1}
        # the last layer's callback restores it, on the worker thread, just
        # after that layer's result is set
        for _ in range(200):
            if blas.numpy_blas_threads_now() == 2:
                break
            time.sleep(0.01)
        assert blas.numpy_blas_threads_now() == 2
    finally:
        put(before)


def test_stream_layers_refuse_incomplete_layers_up_front():
    qkv = mixed_qkv()
    broken = [list(layer) for layer in qkv.layers]
    broken[2] = broken[2][1:]
    with pytest.raises(CacheShapeError):
        stream_layers(broken, T)


def test_scatter_rows_equals_fancy_assignment():
    from qkvshare_mlx.quant.fastpath import _scatter_rows

    rng = np.random.default_rng(3)
    index = np.sort(rng.choice(50, 17, replace=False))
    rows = rng.standard_normal((2, 3, 17, 8), dtype=np.float32)
    want = rng.standard_normal((2, 3, 64, 8), dtype=np.float32)
    got = want.copy()
    want[:, :, index] = rows
    _scatter_rows(got, index, rows)
    assert np.array_equal(got, want)


def test_mixed_cache_has_scattered_segments():
    # the fused path's scatter (tokens of one format spread over the layer)
    qkv = mixed_qkv()
    index = [np.asarray(s.index) for layer in qkv.layers for s in layer]
    assert any(len(i) > 1 and np.any(np.diff(i) != 1) for i in index)
