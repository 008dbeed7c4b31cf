"""The bit allocator: one format per (layer, token) under an average-bit budget.

Solves

    minimize   sum_{l,t} importance[l,t] * (err_K[l,t,f] + err_V[l,t,f])
    subject to mean_{l,t} cost(f[l,t]) <= budget_bits

over a format menu, where ``err`` is the expected squared reconstruction
error of a token under format ``f`` (see :mod:`.error_model`) and ``cost``
its effective bits per element, scales included. The solver is a Lagrangian
sweep (optimal for the budget it reaches) followed by a greedy fill of the
remaining budget by best error reduction per bit.

Pure numpy: no MLX, no model, no notion of where the importance comes from
(:mod:`.controllers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..formats import Format, planned_bits


@dataclass
class AllocationProblem:
    """Errors and costs of the tokens to allocate.

    Attributes:
        errors: (L, 2, T', F) expected squared error of K and V per format.
        formats: the F formats of the menu.
        head_dims: (D_k, D_v).
        float_bits: storage bits of float tokens.
        start: index of the first token allocated here (earlier ones are
            inherited); statistics are sliced from it.
        n_tokens: T, the cache length.
        held: (L, T') bool, the tokens a layer keeps (False: before a
            sliding layer's window, not stored, not counted); None: all.
    """

    errors: np.ndarray
    formats: list[Format]
    head_dims: tuple[int, int]
    float_bits: int
    start: int
    n_tokens: int
    held: np.ndarray | None = None

    @property
    def costs(self) -> np.ndarray:
        return np.array([f.nominal_cost(self.float_bits) for f in self.formats])

    def effective_bits(self, assignment: np.ndarray) -> float:
        """Exact effective bits the (L, T') assignment stores (tails included)."""
        dk, dv = self.head_dims
        total, n = 0, 0
        for li, layer in enumerate(assignment):
            if self.held is not None:
                layer = layer[self.held[li]]
            counts = np.bincount(layer, minlength=len(self.formats))
            total += planned_bits(
                dict(zip(self.formats, counts.tolist())), dk, dv, self.float_bits
            )
            n += layer.size
        return total / max(n * (dk + dv), 1)


def allocate_bits(
    importance: np.ndarray,
    errors: np.ndarray,
    costs: np.ndarray,
    budget_bits: float,
    *,
    held: np.ndarray | None = None,
) -> np.ndarray:
    """Choose one format per (layer, token) minimising weighted error under a budget.

    Args:
        importance: (L, T) non-negative weights, or (L, 2, T) separate
            weights for the key and the value errors.
        errors: (L, 2, T, F) squared errors (K and V) per format.
        costs: (F,) bits per element of each format.
        budget_bits: the mean cost not to exceed.
        held: (L, T) bool: only these tokens are allocated and counted (the
            others get the cheapest format, to be dropped by the caller).

    Returns:
        (L, T) int format indices whose mean cost is <= ``budget_bits`` (when
        the cheapest format fits) and whose weighted error is minimal among
        assignments of at most the same cost found on the Lagrangian hull,
        then improved greedily with the leftover budget.
    """
    if importance.ndim == 2:
        importance = importance[:, None, :]
    w = (importance[..., None] * errors).sum(axis=1).astype(np.float64)
    L, T, F = w.shape
    if T == 0:
        return np.zeros((L, 0), dtype=np.int64)
    if held is not None:
        out = np.full((L, T), int(np.argmin(costs)), dtype=np.int64)
        rows = held.reshape(-1)
        if rows.any():
            sub = allocate_bits(
                np.ones((1, int(rows.sum()))),
                w.reshape(-1, F)[rows][None, None],
                costs,
                budget_bits,
            )
            out.reshape(-1)[rows] = sub[0]
        return out
    flat = w.reshape(-1, F)
    n = flat.shape[0]
    limit = budget_bits * n

    def choose(lam):
        return np.argmin(flat + lam * costs[None, :], axis=1)

    cheapest = int(np.argmin(costs))
    if costs[cheapest] * n > limit + 1e-9:
        return np.full((L, T), cheapest, dtype=np.int64)
    c0 = choose(0.0)
    if costs[c0].sum() <= limit:
        return c0.reshape(L, T)
    # Lagrangian sweep on log(lambda): hi is feasible, lo is not.
    scale = max(float(flat.max()), 1e-30)
    lo, hi = np.log(scale * 1e-16), np.log(scale * 1e6)
    a_hi = choose(np.exp(hi))
    if costs[a_hi].sum() > limit:
        a_hi = np.full(n, cheapest)
    a_lo = c0
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        a = choose(np.exp(mid))
        if costs[a].sum() <= limit:
            hi, a_hi = mid, a
        else:
            lo, a_lo = mid, a
    # Greedy fill: upgrade tokens towards the infeasible side, best gain per bit.
    out = a_hi.copy()
    diff = np.nonzero(a_lo != a_hi)[0]
    if diff.size:
        gain = flat[diff, a_hi[diff]] - flat[diff, a_lo[diff]]
        extra = costs[a_lo[diff]] - costs[a_hi[diff]]
        ok = extra > 0
        diff, gain, extra = diff[ok], gain[ok], extra[ok]
        order = np.argsort(-gain / extra, kind="stable")
        room = limit - costs[out].sum()
        take = np.cumsum(extra[order]) <= room + 1e-9
        chosen = diff[order[take]]
        out[chosen] = a_lo[chosen]
    return out.reshape(L, T)


# ----------------------------------------------------------------------------


def uniform_format(problem: AllocationProblem, budget_bits: float) -> int:
    """The one format with the largest cost within budget (least error on ties)."""
    L, _, Tn, F = problem.errors.shape
    best, best_key = None, None
    for f in range(F):
        eff = problem.effective_bits(np.full((L, Tn), f))
        if eff > budget_bits + 0.02:
            continue
        key = (round(eff, 6), -float(problem.errors[:, :, :, f].sum()))
        if best_key is None or key > best_key:
            best, best_key = f, key
    if best is None:
        raise ConfigError(f"no single format fits budget_bits={budget_bits}")
    return best


def validate_budget(budget_bits: float, formats: list[Format], float_bits: int) -> None:
    """Raise ConfigError when no assignment can meet ``budget_bits``."""
    try:
        budget = float(budget_bits)
    except (TypeError, ValueError):
        raise ConfigError(
            f"budget_bits must be a number, got {budget_bits!r}"
        ) from None
    cheapest = min(f.nominal_cost(float_bits) for f in formats)
    top = max(f.nominal_cost(float_bits) for f in formats)
    if not np.isfinite(budget) or budget < cheapest - 1e-9 or budget > top + 1e-9:
        raise ConfigError(
            f"budget_bits must be between {cheapest:g} (cheapest format) and "
            f"{top:g} effective bits but got {budget_bits!r}"
        )
