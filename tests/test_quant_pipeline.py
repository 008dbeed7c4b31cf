"""The quantization pipeline (quant/pipeline), through the MLX backend's
quantize_cache: budgets, hop stability, and typed errors on bad input."""

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import CacheShapeError, ConfigError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.controllers import CONTROLLERS, TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
from qkvshare_mlx.quant.numpy_backend import quantize_cache_np
from qkvshare_mlx.quant.pipeline import check_kv

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
@pytest.mark.parametrize(
    "budget,config",
    [
        (4.5, QuantConfig()),
        (3.0, QuantConfig(rotation="hadamard")),
        (4.5, QuantConfig(key_layout="token")),
        (16.0, QuantConfig()),  # lossless: no error model pass
        (16.0, QuantConfig(widths=(16,))),  # float-only menu
    ],
    ids=["channel", "rotated", "token", "lossless", "float-only"],
)
@pytest.mark.parametrize("runtime", ["mlx", "numpy"])
def test_non_finite_values_are_refused(bad, budget, config, runtime):
    # one bad element in one token, in each position of the error model's
    # groups: found whichever pass scans it
    keys, values = _kv()
    quantize = quantize_cache if runtime == "mlx" else quantize_cache_np
    for t in (0, 5, 7):
        row = np.zeros((1, 2, 8, 64), np.float32)
        row[0, 1, t, 7 + t] = bad
        vals = list(values)
        vals[1] = mx.array(row) if runtime == "mlx" else row
        ks = keys if runtime == "mlx" else [np.array(k) for k in keys]
        vals = vals if runtime == "mlx" else [np.array(v) for v in vals]
        with pytest.raises(CacheShapeError, match="layer 1.*NaN or Inf"):
            quantize(
                ks,
                vals,
                controller="saliency-keynorm",
                budget_bits=budget,
                config=config,
                stats=TokenStats(key_norms=np.ones((2, 8))),
            )


def test_non_finite_values_before_the_inherited_tokens_end_are_not_rescanned():
    # the inherited tokens are kept from the earlier card, never re-encoded:
    # only the new tokens are checked (and a bad new token is still refused)
    keys, values = _kv()
    first = quantize_cache(
        [k[:, :, :4] for k in keys],
        [v[:, :, :4] for v in values],
        controller="uniform",
        budget_bits=4.5,
    )
    bad = np.array(keys[0])
    bad[0, 0, 2, 3] = np.nan
    keys[0] = mx.array(bad)
    out = quantize_cache(
        keys, values, controller="uniform", budget_bits=4.5, inherited=first
    )
    assert out.layers[0][0].keys is first.layers[0][0].keys
    bad[0, 0, 6, 3] = np.inf
    keys[0] = mx.array(bad)
    with pytest.raises(CacheShapeError, match="layer 0.*NaN or Inf"):
        quantize_cache(
            keys, values, controller="uniform", budget_bits=4.5, inherited=first
        )


def test_large_finite_values_whose_sum_overflows_are_accepted():
    # the finiteness check sums each tensor first; an overflowing sum of
    # finite values must still pass (checked element by element)
    keys, values = _kv()
    keys[0] = mx.full((1, 2, 8, 64), 3e38)
    assert check_kv(keys, values, xp=mx) == (1, 2, 8, 64, 64)
    host = [[np.array(x) for x in kv] for kv in (keys, values)]
    assert check_kv(*host, xp=np) == (1, 2, 8, 64, 64)
    keys[0] = mx.array(np.where(np.arange(64) == 3, np.inf, 3e38).astype(np.float32))
    keys[0] = mx.broadcast_to(keys[0], (1, 2, 8, 64))
    with pytest.raises(CacheShapeError, match="layer 0.*NaN or Inf"):
        check_kv(keys, values, xp=mx)


def test_unknown_controller_is_named():
    keys, values = _kv()
    with pytest.raises(ConfigError, match="'greedy'"):
        quantize_cache(keys, values, controller="greedy", budget_bits=4.5)


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


def test_query_aware_key_errors_need_the_probe_queries():
    keys, values, stats = _realistic_cache(L=2, T=64)
    cfg = QuantConfig(key_error="query")
    with pytest.raises(ConfigError, match="query_moments"):
        quantize_cache(keys, values, budget_bits=4.5, config=cfg, stats=stats)
    stats.query_moments = np.zeros((2, 2, 32, 32))
    with pytest.raises(ConfigError, match=r"expected shape \(2, 2, 64, 64\)"):
        quantize_cache(keys, values, budget_bits=4.5, config=cfg, stats=stats)
    with pytest.raises(ConfigError, match="key_error must be one of"):
        QuantConfig(key_error="attention")


def test_query_aware_key_errors_spend_bits_where_the_queries_look():
    # two identical layers whose keys have outlier channels; the probe
    # queries of layer 0 read the outlier channels, those of layer 1 none of
    # them. Measured on the key vectors both layers look the same; measured
    # on the logits, layer 1's outlier errors cost nothing, so it gets fewer
    # key bits
    keys, values, stats = _realistic_cache(L=1, T=512)
    keys, values = keys * 2, values * 2  # the same layer, twice
    stats.attention = np.repeat(stats.attention, 2, axis=0)
    stats.key_norms = np.repeat(stats.key_norms, 2, axis=0)
    reads = np.diag(np.where(np.isin(np.arange(64), [3, 17, 40]), 1.0, 0.01))
    ignores = np.diag(np.where(np.isin(np.arange(64), [3, 17, 40]), 0.0, 1.0))
    stats.query_moments = np.stack([np.stack([reads] * 2), np.stack([ignores] * 2)])

    def key_bits(config):
        qkv = quantize_cache(keys, values, budget_bits=3.0, config=config, stats=stats)
        per_layer = []
        for layer in qkv.layers:
            n = sum(len(s.index) for s in layer)
            per_layer.append(sum(s.bits * len(s.index) for s in layer) / n)
        return per_layer, qkv

    (mse0, mse1), _ = key_bits(QuantConfig())
    assert mse0 == pytest.approx(mse1)
    (q0, q1), qkv = key_bits(QuantConfig(key_error="query"))
    assert q0 > q1 + 0.5
    assert qkv.effective_bits == pytest.approx(3.0, abs=0.05)
