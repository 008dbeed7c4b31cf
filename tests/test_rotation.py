"""Hadamard rotation of K/V before quantization (QuantConfig.rotation)."""

import hashlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import CARD_MODEL_CONFIG as CONFIG
from mlx_lm.models.cache import QuantizedKVCache

from qkvshare_mlx.caches import MixedQuantizedKVCache
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import CardFormatError, ConfigError
from qkvshare_mlx.fingerprint import fingerprint_from_config
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.inject import inject
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np, quantize_cache_np
from qkvshare_mlx.rotation import rotation_matrix
from qkvshare_mlx.testing import mutations as F

L, H, T, D = 2, 2, 96, 64


def outlier_kv(seed=0, T=T, D=D):
    """Per-layer (1, H, T, D) float32 K/V; keys with two loud channels."""
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for _ in range(L):
        k = rng.standard_normal((1, H, T, D)).astype(np.float32)
        k[..., [3, 17]] *= 25.0
        ks.append(k)
        vs.append(rng.standard_normal((1, H, T, D)).astype(np.float32))
    return ks, vs


def quantized(ks, vs, config=None, controller="uniform", budget=4.0, **kw):
    """quantize_cache of per-layer numpy K/V (as MLX arrays)."""
    return quantize_cache(
        [mx.array(k) for k in ks],
        [mx.array(v) for v in vs],
        controller=controller,
        budget_bits=budget,
        config=config,
        **kw,
    )


def mse(a, b):
    return float(np.mean((np.asarray(a, dtype=np.float64) - b) ** 2))


@pytest.mark.parametrize("dim", [1, 2, 64, 128])
def test_matrix_is_orthogonal_and_fixed(dim):
    r = rotation_matrix("hadamard", dim)
    assert r.dtype == np.float32 and r.shape == (dim, dim)
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-6)
    assert rotation_matrix("hadamard", dim) is r and not r.flags.writeable
    assert rotation_matrix("none", dim) is None


def test_matrix_is_pinned():
    # every reader must rebuild exactly this matrix: a change breaks old cards
    r = rotation_matrix("hadamard", 64)
    assert np.all(np.abs(r) == 0.125)
    digest = hashlib.sha256((r * 8).astype(np.int8).tobytes()).hexdigest()
    assert digest == PINNED_64, digest


PINNED_64 = "83e7783b21bcc0f2b56dcbcbfbee1e26649a90abe0b722d338660cb77ffb4921"


@pytest.mark.parametrize("kind, dims", [("bogus", (64,)), ("hadamard", (96,))])
def test_bad_rotation_is_a_config_error(kind, dims):
    with pytest.raises(ConfigError, match="rotation"):
        if kind == "bogus":
            QuantConfig(rotation=kind)
        else:
            k = mx.zeros((1, 1, 8, dims[0]))
            quantize_cache(
                [k],
                [k],
                controller="uniform",
                budget_bits=4.0,
                config=QuantConfig(rotation=kind, group_size=32, key_group=32),
            )


@pytest.mark.parametrize("layout", ["token", "channel"])
def test_rotation_lowers_key_error_with_outlier_channels(layout):
    ks, vs = outlier_kv()
    err = {}
    for rot in ("none", "hadamard"):
        cfg = QuantConfig(rotation=rot, key_layout=layout, adaptive_groups=False)
        # 4.0: 3-bit codes (at 2 bits zeroing quiet channels wins)
        q = quantized(ks, vs, cfg, budget=4.0)
        dk, dv = dequantize_cache(q)
        err[rot] = (mse(dk[0], ks[0]), mse(dv[0], vs[0]))
    # loud channels stretch per-token groups; per-channel groups suffer less
    assert err["hadamard"][0] < err["none"][0] / (1.8 if layout == "token" else 1.1)
    assert err["hadamard"][1] < err["none"][1] * 1.2  # gaussian values: a wash


def _card(qkv, seed=0):
    fp = fingerprint_from_config({**CONFIG, "num_hidden_layers": L})
    tokens = np.random.default_rng(seed).integers(0, 1000, qkv.n_tokens)
    return CacheCard.from_quantized(qkv, tokens, fp)


def test_rotated_card_reads_the_same_everywhere():
    """MLX and numpy quantizers, the card, both injection modes and the
    numpy decoder agree on a rotated cache."""
    ks, vs = outlier_kv(1)
    stats = TokenStats(attention=np.random.default_rng(1).random((L, T)) ** 3)
    cfg = QuantConfig(rotation="hadamard")
    q = quantized(ks, vs, cfg, "saliency", 3.5, stats=stats)
    card = CacheCard.from_bytes(_card(q).to_bytes())
    assert card.quant["config"]["rotation"] == "hadamard" and card.version == 2
    ref_k, ref_v = dequantize_cache(card.to_quantized())
    np_k, np_v = dequantize_cache_np(card.to_quantized())
    dense = inject(card, mode="dequantize")
    packed = inject(card, mode="compressed")
    for li in range(L):
        want_k, want_v = np.asarray(ref_k[li]), np.asarray(ref_v[li])
        np.testing.assert_allclose(np_k[li], want_k, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np_v[li], want_v, rtol=1e-5, atol=1e-5)
        got = dense[li].keys[..., :T, :], dense[li].values[..., :T, :]
        np.testing.assert_allclose(np.asarray(got[0]), want_k, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got[1]), want_v, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(dense[li].keys[..., T:, :]) == 0)
        pk, pv = packed[li].dequantized(mx.float32)
        np.testing.assert_allclose(np.asarray(pk), want_k, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(pv), want_v, rtol=1e-5, atol=1e-5)
        # decoded in the original basis: close to the input, not to its rotation
        assert mse(want_k, ks[li]) < 0.05 * mse(ks[li], 0)

    # the numpy quantizer writes the same kind of card
    qn = quantize_cache_np(ks, vs, controller="uniform", budget_bits=4.0, config=cfg)
    back = CacheCard.from_bytes(_card(qn).to_bytes())
    k0 = np.asarray(inject(back, mode="dequantize")[0].keys[..., :T, :])
    assert mse(k0, ks[0]) < 0.05 * mse(ks[0], 0)


def test_rotated_uniform_card_does_not_use_mlx_quantized_attention():
    ks, vs = outlier_kv(2)
    cfg = QuantConfig(rotation="hadamard", key_layout="token", adaptive_groups=False)
    for rot, cls in (("none", QuantizedKVCache), ("hadamard", MixedQuantizedKVCache)):
        q = quantized(ks, vs, QuantConfig(**{**cfg.__dict__, "rotation": rot}))
        assert isinstance(inject(_card(q), mode="compressed")[0], cls)


def test_unrotated_cards_keep_the_old_metadata():
    ks, vs = outlier_kv(4)
    card = _card(quantized(ks, vs))
    assert "rotation" not in card.quant["config"] and card.version == 1


def test_inheritance_keeps_codes_and_one_rotation():
    ks, vs = outlier_kv(5)
    cfg = QuantConfig(rotation="hadamard")
    first = quantized([k[..., :60, :] for k in ks], [v[..., :60, :] for v in vs], cfg)
    later = quantized(ks, vs, cfg, budget=3.0, inherited=first)
    a, b = dequantize_cache(first), dequantize_cache(later)
    assert np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0][..., :60, :]))
    with pytest.raises(ConfigError, match="rotation"):
        quantized(ks, vs, QuantConfig(), budget=3.0, inherited=first)


@pytest.mark.parametrize(
    "value, version", [("bogus", 2), (3, 2), (None, 2), ("none", 1)]
)
def test_forged_rotation_is_refused(value, version):
    _, m, t = F.parts(F.small_card_bytes(0))
    m["quant"]["config"]["rotation"] = value
    m["version"] = version
    with pytest.raises(CardFormatError, match="rotation"):
        CacheCard.from_bytes(F.forge(m, t))


def test_forged_rotation_for_a_non_power_of_two_head_dim_is_refused():
    rng = np.random.default_rng(0)
    k = [rng.standard_normal((1, 1, 50, 96)).astype(np.float32) for _ in range(L)]
    q = quantize_cache_np(
        k,
        k,
        controller="uniform",
        budget_bits=4.0,
        config=QuantConfig(group_size=32, key_group=32),
    )
    fp = fingerprint_from_config(
        {
            **CONFIG,
            "num_hidden_layers": L,
            "num_key_value_heads": 1,
            "num_attention_heads": 8,
            "hidden_size": 384,
        }
    )
    data = CacheCard.from_quantized(q, list(range(50)), fp).to_bytes()
    _, m, t = F.parts(data)
    m["quant"]["config"]["rotation"] = "hadamard"
    m["version"] = 2
    with pytest.raises(CardFormatError, match="power-of-two"):
        CacheCard.from_bytes(F.forge(m, t))
