"""Controllers and the bit allocator: budget, optimality, determinism."""

import itertools

import numpy as np
import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.allocator import AllocationProblem, allocate_bits
from qkvshare_mlx.quant.controllers import (
    CONTROLLERS,
    N_RECENT,
    N_SINK,
    HandoffPlan,
    TokenStats,
    importance_topology,
    run_controller,
)

# allocate_bits accepts (L, 2, T) key/value weights in newer versions.
_SEPARATE_KV = "(L, 2, T)" in (allocate_bits.__doc__ or "")


def _weighted(importance, errors, assignment):
    if importance.ndim == 2:  # one weight for both K and V errors
        importance = importance[:, None, :]
    w = (importance[..., None] * errors).sum(axis=1)
    return float(np.take_along_axis(w, assignment[:, :, None], axis=2).sum())


def _brute_force(importance, errors, costs, max_mean_cost):
    """Least weighted error over every assignment of mean cost <= max_mean_cost."""
    L, _, T, F = errors.shape
    best = np.inf
    for combo in itertools.product(range(F), repeat=L * T):
        a = np.array(combo).reshape(L, T)
        if costs[a].mean() <= max_mean_cost + 1e-12:
            best = min(best, _weighted(importance, errors, a))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocator_is_optimal_for_the_cost_it_reaches(seed):
    rng = np.random.default_rng(seed)
    L, T = 1, 5
    F = int(rng.integers(3, 5))
    costs = np.sort(rng.uniform(2, 9, F))
    # Error falls with cost, like real formats, with per-token range factors.
    base = 4.0**-costs
    errors = rng.uniform(0.2, 3.0, (L, 2, T, 1)) * base[None, None, None, :]
    importance = rng.uniform(0.01, 1.0, (L, T))
    if seed % 2 and _SEPARATE_KV:  # separate key and value weights, (L, 2, T)
        importance = rng.uniform(0.01, 1.0, (L, 2, T))
    budget = float(rng.uniform(costs[0], costs[-1]))
    a = allocate_bits(importance, errors, costs, budget)
    achieved = costs[a].mean()
    assert a.shape == (L, T)
    assert achieved <= budget + 1e-12
    got = _weighted(importance, errors, a)
    assert got <= _brute_force(importance, errors, costs, achieved) + 1e-12


def test_allocator_edge_cases():
    errors = np.ones((2, 2, 3, 2)) * np.array([1.0, 0.1])
    costs = np.array([2.0, 8.0])
    imp = np.ones((2, 3))
    # Enough budget for the best format everywhere.
    assert (allocate_bits(imp, errors, costs, 8.0) == 1).all()
    # Budget below the cheapest format: the cheapest everywhere.
    assert (allocate_bits(imp, errors, costs, 1.0) == 0).all()
    # No tokens.
    assert allocate_bits(np.ones((2, 0)), errors[:, :, :0], costs, 4).shape == (2, 0)
    # Two tokens can be upgraded: the two most important are.
    imp = np.array([[1.0, 5.0, 1.0], [1.0, 1.0, 9.0]])
    a = allocate_bits(imp, errors, costs, 4.0)  # room for two upgrades
    assert a.tolist() == [[0, 1, 0], [0, 0, 1]]


# ---------------------------------------------------------------------------
# Controllers on a problem with the real format menu.


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
        imp = importance_topology(problem, stats, plan)
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
