"""The error model (quant/error_model): every range, straight from its definition."""

import mlx.core as mx
import numpy as np
import pytest

from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.allocator import allocate_bits
from qkvshare_mlx.quant.error_model import error_table, error_tables, query_weights
from qkvshare_mlx.rotation import rotation_matrix


def _reference(keys, values, formats, float_bits, key_weights=None):
    """(2, T, F) errors computed group by group: each per-token group's
    range over its real elements, each channel window's range over its
    tokens (a short last window counted for its whole width, as padding by
    repetition does), times 1 / (12 (2^b - 1)^2). ``key_weights`` (H, D):
    each key element's squared error times its channel's weight."""
    k, v = keys.astype(np.float64), values.astype(np.float64)
    B, H, T, D = k.shape
    ones = np.ones((H, D))
    kw = ones if key_weights is None else np.asarray(key_weights, np.float64)

    def token(x, group, w):
        out = np.zeros(T)
        for s in range(0, x.shape[3], group):
            g = x[..., s : s + group]
            n = w[:, s : s + group].sum(axis=1)[None, :, None]  # (1, H, 1)
            out += (n * (g.max(-1) - g.min(-1)) ** 2).sum(axis=(0, 1))
        return out

    def channel(x, group, w):
        out = np.zeros(T)
        for s in range(0, T, group):
            win = x[:, :, s : s + group]
            out[s : s + group] = (w[None] * (win.max(2) - win.min(2)) ** 2).sum()
        return out

    eps = 2.0 ** (-22) / 3 if float_bits == 16 else 0.0
    out = np.zeros((2, T, len(formats)))
    for i, f in enumerate(formats):
        if f.is_float:
            out[0, :, i] = eps * (kw[None, :, None, :] * k * k).sum(axis=(0, 1, 3))
            out[1, :, i] = eps * (v * v).sum(axis=(0, 1, 3))
            continue
        by = channel if f.key_layout == "channel" else token
        rk = by(k, f.key_group, kw)
        out[0, :, i] = rk / (12.0 * (2**f.bits - 1) ** 2)
        out[1, :, i] = token(v, f.value_group, ones) / (12.0 * (2**f.vbits - 1) ** 2)
    return out


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("T", [1, 37, 200])
@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(),
        QuantConfig(key_layout="token"),
        QuantConfig(split_kv=True, float_dtype="float32"),
    ],
    ids=["channel", "token", "split-fp32"],
)
def test_error_table_matches_its_definition(D, T, config):
    rng = np.random.default_rng(T * D)
    keys = rng.standard_normal((1, 2, T, D)) * rng.gamma(1, 1, (1, 2, 1, D))
    values = rng.standard_normal((1, 2, T, D))
    keys, values = keys.astype(np.float32), values.astype(np.float32)
    formats = config.menu(D, D)
    want = _reference(keys, values, formats, config.float_bits)
    got_np = error_table(keys, values, formats, config.float_bits, xp=np)
    got_mx = error_table(
        mx.array(keys), mx.array(values), formats, config.float_bits, xp=mx
    )
    np.testing.assert_allclose(got_np, want, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(got_mx, want, rtol=2e-5, atol=1e-12)


def _full_sweep(w, costs, budget):
    """The allocator's Lagrangian sweep re-solving every row at every step
    (what the active-set sweep must reproduce), then its greedy fill."""
    L, T, F = w.shape
    flat = w.reshape(-1, F)
    n = flat.shape[0]
    limit = budget * n

    def choose(lam):
        return np.argmin(flat + lam * costs[None, :], axis=1)

    scale = max(float(flat.max()), 1e-30)
    lo, hi = np.log(scale * 1e-16), np.log(scale * 1e6)
    a_hi, a_lo = choose(np.exp(hi)), choose(0.0)
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        a = choose(np.exp(mid))
        if costs[a].sum() <= limit:
            hi, a_hi = mid, a
        else:
            lo, a_lo = mid, a
    out = a_hi.copy()
    diff = np.nonzero(a_lo != a_hi)[0]
    gain = flat[diff, a_hi[diff]] - flat[diff, a_lo[diff]]
    extra = costs[a_lo[diff]] - costs[a_hi[diff]]
    ok = extra > 0
    diff, gain, extra = diff[ok], gain[ok], extra[ok]
    order = np.argsort(-gain / extra, kind="stable")
    take = np.cumsum(extra[order]) <= limit - costs[out].sum() + 1e-9
    out[diff[order[take]]] = a_lo[diff[order[take]]]
    return out.reshape(L, T)


@pytest.mark.parametrize(
    "seed, T",
    [(0, 700), (1, 700), (2, 700), (3, 17000), (4, 17000), (5, 30000)],
)
def test_active_set_sweep_equals_the_full_sweep(seed, T):
    # T=17000 and 30000: enough rows for the sampled bracket (allocator.SAMPLE_ROWS)
    rng = np.random.default_rng(seed)
    L, F = 4, 9
    costs = np.sort(rng.uniform(2, 9, F))
    base = rng.gamma(0.5, 1.0, (L, 2, T, 1))
    errors = base * 4.0 ** (-np.arange(F))[None, None, None, :]
    errors *= rng.uniform(0.5, 2, errors.shape)
    imp = rng.gamma(0.3, 1.0, (L, T))
    budget = float(rng.uniform(costs[0] + 0.2, costs[-1] - 0.2))
    got = allocate_bits(imp, errors, costs, budget)
    w = (imp[:, None, :, None] * errors).sum(axis=1)
    np.testing.assert_array_equal(got, _full_sweep(w, costs, budget))
    assert costs[got].mean() <= budget + 1e-9


def _layers(L=3, T=150, D=64, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((L, 1, 2, T, D)) * rng.gamma(1, 1, (L, 1, 2, 1, D))
    values = rng.standard_normal((L, 1, 2, T, D))
    return [(k.astype(np.float32), v.astype(np.float32)) for k, v in zip(keys, values)]


def test_factored_table_weighs_and_sums_like_the_dense_table():
    layers = _layers()
    formats = QuantConfig().menu(64, 64)
    table = error_tables(layers, formats, 16, xp=np)
    dense = table.dense()
    assert dense.shape == table.shape == (3, 2, 150, len(formats))
    for li, (k, v) in enumerate(layers):  # the dense table is the per-layer one
        np.testing.assert_array_equal(dense[li], error_table(k, v, formats, 16))
    imp = np.random.default_rng(1).gamma(0.3, 1.0, (3, 2, 150))
    want = np.einsum("lkt,lktf->ltf", imp, dense)
    np.testing.assert_allclose(table.weighted(imp), want, rtol=1e-12)
    np.testing.assert_allclose(table.weighted(imp, np.float32), want, rtol=1e-6)
    assert table.weighted(imp, np.float32).dtype == np.float32
    np.testing.assert_allclose(table.totals(), dense.sum(axis=(0, 1, 2)), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 3e38's ranges
@pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])
@pytest.mark.parametrize("key_layout", ["channel", "token"])
def test_the_tables_pass_finds_every_non_finite_element(xp, key_layout):
    formats = QuantConfig(key_layout=key_layout).menu(64, 64)
    layers = _layers(T=37)
    assert error_tables(
        [(xp.array(k), xp.array(v)) for k, v in layers], formats, 16, xp=xp
    ).finite.tolist() == [True, True, True]
    for bad in (np.nan, np.inf, -np.inf, 3e38):
        for li, half, t, d in ((0, 0, 0, 0), (1, 1, 36, 63), (2, 0, 20, 33)):
            broken = [[k.copy(), v.copy()] for k, v in layers]
            broken[li][half][0, 1, t, d] = bad
            table = error_tables(
                [(xp.array(k), xp.array(v)) for k, v in broken], formats, 16, xp=xp
            )
            want = [True] * 3
            want[li] = bad == 3e38  # large finite values are finite
            assert table.finite.tolist() == want, (bad, li, half, t, d)
    only_float = QuantConfig(widths=(16,)).menu(64, 64)
    assert error_tables(layers, only_float, 16).finite is None


def test_sampled_allocation_returns_the_unconstrained_optimum_when_it_fits():
    # enough rows for the sampled bracket, and a budget every row's best
    # format fits: the answer is that best format, row by row
    rng = np.random.default_rng(7)
    L, T, F = 2, 40000, 6
    costs = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    errors = rng.gamma(0.5, 1.0, (L, 2, T, 1)) * 4.0 ** (-np.arange(F))
    errors[:, :, : T // 2, 3:] = errors[:, :, : T // 2, 2:3] * 2  # best: 4 bits
    imp = rng.gamma(0.3, 1.0, (L, T))
    best = np.argmin((imp[:, None, :, None] * errors).sum(axis=1), axis=-1)
    fits = costs[best].mean()
    np.testing.assert_array_equal(allocate_bits(imp, errors, costs, fits), best)
    np.testing.assert_array_equal(allocate_bits(imp, errors, costs, 7.0), best)
    tight = allocate_bits(imp, errors, costs, fits - 0.25)
    assert costs[tight].mean() <= fits - 0.25 + 1e-9
    np.testing.assert_array_equal(
        tight, _full_sweep((imp[:, None, :, None] * errors).sum(1), costs, fits - 0.25)
    )


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("key_layout", ["channel", "token"])
@pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])
def test_query_weighted_key_errors_match_their_definition(D, key_layout, xp):
    rng = np.random.default_rng(D)
    keys = rng.standard_normal((1, 2, 45, D)) * rng.gamma(1, 1, (1, 2, 1, D))
    values = rng.standard_normal((1, 2, 45, D))
    keys, values = keys.astype(np.float32), values.astype(np.float32)
    weights = rng.gamma(0.5, 1.0, (2, D)).astype(np.float32)
    formats = QuantConfig(key_layout=key_layout).menu(D, D)
    want = _reference(keys, values, formats, 16, key_weights=weights)
    got = error_tables(
        [(xp.array(keys), xp.array(values))],
        formats,
        16,
        xp=xp,
        key_weights=weights[None],
    ).dense()[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
    # the weights matter (or the check above proves little); values do not move
    plain = _reference(keys, values, formats, 16)
    assert np.abs(want[0] - plain[0]).max() > 0.1 * np.abs(plain[0]).max()
    np.testing.assert_array_equal(want[1], plain[1])


def test_query_weights_are_the_queries_energy_in_the_keys_basis():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 40, 64)) * rng.gamma(0.5, 1, (2, 3, 1, 64))
    moments = np.einsum("lhnd,lhne->lhde", q, q) / 40  # (L, H, D, D)
    plain = query_weights(moments)
    energy = (q**2).mean(axis=2)  # (L, H, D)
    np.testing.assert_allclose(
        plain, energy / energy.mean(axis=(1, 2), keepdims=True), rtol=1e-5
    )
    # rotated keys k R meet rotated queries q R: the energy of q R per channel
    r = rotation_matrix("hadamard", 64)
    rotated = query_weights(moments, "hadamard")
    e_rot = ((q @ r) ** 2).mean(axis=2)
    np.testing.assert_allclose(
        rotated, e_rot / e_rot.mean(axis=(1, 2), keepdims=True), rtol=1e-4
    )
    np.testing.assert_allclose(rotated.mean(axis=(1, 2)), 1.0, rtol=1e-5)
    assert not np.allclose(rotated, plain)
    np.testing.assert_array_equal(query_weights(np.zeros((1, 2, 8, 8))), 1.0)
