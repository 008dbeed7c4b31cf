"""The bit allocator (quant/allocator): budget, optimality, edge cases."""

import itertools

import numpy as np
import pytest

from qkvshare_mlx.quant.allocator import allocate_bits

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
