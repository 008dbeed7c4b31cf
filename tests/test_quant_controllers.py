"""Controllers (quant/controllers) on a problem with the real format menu:
budget, determinism, where the bits go."""

import numpy as np
import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.allocator import AllocationProblem
from qkvshare_mlx.quant.controllers import (
    CONTROLLERS,
    N_RECENT,
    N_SINK,
    HandoffPlan,
    TokenSpan,
    TokenStats,
    importance_topology,
    run_controller,
)


def _problem(L=3, T=80, seed=0):
    rng = np.random.default_rng(seed)
    formats = QuantConfig().menu(64)
    costs = np.array([f.nominal_cost() for f in formats])
    errors = rng.uniform(0.5, 2.0, (L, 2, T, 1)) * (4.0**-costs)[None, None, None]
    problem = AllocationProblem(
        errors=errors,
        formats=formats,
        head_dims=(64, 64),
        float_bits=16,
        start=0,
        n_tokens=T,
    )
    stats = TokenStats(attention=rng.random((L, T)) ** 4, key_norms=rng.random((L, T)))
    return problem, stats


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_controllers_are_deterministic_and_meet_budget(name):
    problem, stats = _problem()
    a1, _ = run_controller(name, problem, 4.0, stats=stats, plan=HandoffPlan(2, 1))
    problem2, stats2 = _problem()
    a2, _ = run_controller(name, problem2, 4.0, stats=stats2, plan=HandoffPlan(2, 1))
    assert np.array_equal(a1, a2)
    assert problem.effective_bits(a1) <= 4.0 + 0.02


def test_sink_recent_gives_sinks_and_recent_tokens_the_best_formats():
    T = 8 * N_RECENT  # long enough for the whole recent window
    problem, stats = _problem(T=T)
    a, _ = run_controller("sink-recent", problem, 3.0)
    cost = problem.costs[a]
    protected = np.r_[np.arange(N_SINK), np.arange(T - N_RECENT, T)]
    middle = np.arange(N_SINK, T - N_RECENT)
    assert cost[:, protected].min() >= cost[:, middle].max()


def test_saliency_follows_attention():
    problem, stats = _problem(T=200)
    a, _ = run_controller("saliency", problem, 4.0, stats=stats)
    cost = problem.costs[a]
    for li in range(cost.shape[0]):
        order = np.argsort(stats.attention[li])
        low, high = order[:40], order[-40:]
        assert cost[li, high].mean() > cost[li, low].mean()


def test_topology_flattens_importance_with_more_hops():
    problem, stats = _problem(T=200)

    def spread(plan):
        imp = importance_topology(TokenSpan.of(problem), stats, plan)
        imp = imp.reshape(-1, imp.shape[-1])[:, N_SINK:]  # (L[, 2], T) rows
        return float((imp.std(axis=1) / imp.mean(axis=1)).mean())

    spreads = [spread(HandoffPlan(h, 1)) for h in (0, 1, 3, 8)]
    assert all(a > b for a, b in zip(spreads, spreads[1:]))
    assert spread(HandoffPlan(0, 4)) < spreads[0]


def test_saliency_stats_of_wrong_shape_are_refused():
    problem, _ = _problem(L=3, T=80)
    with pytest.raises(ConfigError, match=r"\(3, 80\)"):
        run_controller(
            "saliency", problem, 4.0, stats=TokenStats(attention=np.ones((3, 79)))
        )


def test_unknown_controller_is_refused():
    problem, _ = _problem()
    with pytest.raises(ConfigError, match="'kivi'"):
        run_controller("kivi", problem, 4.0)


def test_saliency_without_attention_falls_back_to_key_norms_with_a_notice():
    from qkvshare_mlx.quant.controllers import NoAttentionStatsWarning
    from qkvshare_mlx.quant.numpy_backend import quantize_cache_np

    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((1, 2, 64, 32)).astype(np.float32) for _ in range(2)]
    norms = np.stack([np.linalg.norm(k, axis=-1).sum(axis=(0, 1)) for k in keys])
    with pytest.warns(NoAttentionStatsWarning, match="key norms instead"):
        got = quantize_cache_np(
            keys,
            keys,
            controller="saliency",
            budget_bits=4.0,
            stats=TokenStats(attention=None, key_norms=norms),
        )
    want = quantize_cache_np(
        keys,
        keys,
        controller="saliency-keynorm",
        budget_bits=4.0,
        stats=TokenStats(attention=None, key_norms=norms),
    )
    assert got.width_histogram() == want.width_histogram()
    with pytest.raises(ConfigError, match="needs token statistics"):
        quantize_cache_np(keys, keys, controller="saliency", budget_bits=4.0)


@pytest.mark.parametrize("controller", ["uniform", "saliency"])
def test_pinned_tokens_are_float_and_count_in_the_budget(controller):
    import mlx.core as mx

    from qkvshare_mlx.formats import FLOAT_BITS, QuantConfig, layer_index
    from qkvshare_mlx.quant.controllers import TokenStats
    from qkvshare_mlx.quant.mlx_backend import quantize_cache

    rng = np.random.default_rng(0)
    L, H, T, D = 2, 2, 300, 64
    ks = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    vs = [
        mx.array(rng.standard_normal((1, H, T, D)).astype(np.float32)) for _ in range(L)
    ]
    stats = TokenStats(attention=rng.random((L, T)))
    cfg = QuantConfig(pin_sinks=4, pin_recent=32)
    q = quantize_cache(
        ks, vs, controller=controller, budget_bits=4.5, stats=stats, config=cfg
    )
    plain = quantize_cache(ks, vs, controller=controller, budget_bits=4.5, stats=stats)
    for layer in q.layers:
        floats = np.concatenate(
            [s.index for s in layer if s.bits == FLOAT_BITS] or [np.zeros(0, int)]
        )
        pinned = set(range(4)) | set(range(T - 32, T))
        assert pinned <= set(floats.tolist())
        assert sorted(layer_index(layer).tolist()) == list(range(T))
    assert q.effective_bits <= 4.5 + 0.02
    if controller != "uniform":  # one format for the rest: at most the budget
        assert abs(q.effective_bits - 4.5) <= 0.05
    # the pins' bits come out of the other tokens
    assert q.nominal_bits != plain.nominal_bits
    with pytest.raises(ConfigError, match="pinned"):
        quantize_cache(
            ks,
            vs,
            controller=controller,
            budget_bits=2.5,
            stats=stats,
            config=QuantConfig(pin_recent=250),
        )


def test_pins_need_the_float_width():
    from qkvshare_mlx.formats import QuantConfig

    with pytest.raises(ConfigError, match="widths must include 16"):
        QuantConfig(pin_recent=8, widths=(2, 4))
    with pytest.raises(ConfigError, match="pin_sinks"):
        QuantConfig(pin_sinks=-1)
