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
from .error_model import ErrorTable


@dataclass
class AllocationProblem:
    """Errors and costs of the tokens to allocate.

    Attributes:
        errors: (L, 2, T', F) expected squared error of K and V per format
            (an array, or the error model's factored :class:`ErrorTable`).
        formats: the F formats of the menu.
        head_dims: (D_k, D_v).
        float_bits: storage bits of float tokens.
        start: index of the first token allocated here (earlier ones are
            inherited); statistics are sliced from it.
        n_tokens: T, the cache length.
        held: (L, T') bool, the tokens a layer keeps (False: before a
            sliding layer's window, not stored, not counted); None: all.
        pinned: (L, T') bool, held tokens stored in float whatever the
            controller chooses (``QuantConfig.pin_sinks``/``pin_recent``;
            counted in the budget); None: none.
    """

    errors: np.ndarray | ErrorTable
    formats: list[Format]
    head_dims: tuple[int, int]
    float_bits: int
    start: int
    n_tokens: int
    held: np.ndarray | None = None
    pinned: np.ndarray | None = None

    @property
    def float_format(self) -> int | None:
        return float_format(self.formats)

    def free(self) -> np.ndarray | None:
        """(L, T') bool: the held tokens the controller allocates (not
        pinned); None when that is every token."""
        if self.pinned is None or not self.pinned.any():
            return self.held
        held = np.ones_like(self.pinned) if self.held is None else self.held
        return held & ~self.pinned

    def pin(self, assignment: np.ndarray) -> np.ndarray:
        """``assignment`` with the pinned tokens in the float format."""
        if self.pinned is not None and self.pinned.any():
            assignment = np.where(self.pinned, self.float_format, assignment)
        return assignment

    @property
    def costs(self) -> np.ndarray:
        return np.array([f.nominal_cost(self.float_bits) for f in self.formats])

    def lossless_format(self, budget_bits: float) -> int | None:
        """See :func:`lossless_format`."""
        return lossless_format(self.formats, self.float_bits, budget_bits)

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


def float_format(formats: list[Format]) -> int | None:
    """Index of the menu's float format, or None."""
    floats = [i for i, f in enumerate(formats) if f.is_float]
    return floats[0] if floats else None


def lossless_format(formats: list[Format], float_bits: int, budget_bits) -> int | None:
    """The float format's index when ``budget_bits`` affords it for every
    token (no error table is needed then), else None (also for a budget that
    is not a number: :func:`validate_budget` names that problem)."""
    f = float_format(formats)
    try:
        affords = float(budget_bits) >= float_bits
    except (TypeError, ValueError):
        return None
    return f if f is not None and affords else None


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
    importance = np.broadcast_to(importance, errors.shape[:3])
    if isinstance(errors, ErrorTable):
        # float32 choices: half the memory traffic of the sweep's passes, and
        # float32 resolves weighted errors far finer than formats differ
        w = errors.weighted(importance, np.float32)
    else:
        w = np.einsum("lkt,lktf->ltf", importance, errors, dtype=np.float64)
    L, T, F = w.shape
    if T == 0:
        return np.zeros((L, 0), dtype=np.int64)
    if held is None:
        return _allocate(w.reshape(-1, F), costs, budget_bits).reshape(L, T)
    out = np.full((L, T), int(np.argmin(costs)), dtype=np.int64)
    rows = held.reshape(-1)
    if rows.any():
        out.reshape(-1)[rows] = _allocate(w.reshape(-1, F)[rows], costs, budget_bits)
    return out


def _allocate(flat: np.ndarray, costs: np.ndarray, budget_bits: float) -> np.ndarray:
    """:func:`allocate_bits` on (n, F) weighted errors (float32 or float64):
    (n,) format indices. Costs are summed in float64 (exact: multiples of
    1/8), and added to errors in the errors' dtype."""
    n = flat.shape[0]
    limit = budget_bits * n

    buf = np.empty_like(flat)  # one (n, F) scratch for every full solve

    def choose(lam):
        np.multiply(costs[None, :], lam, out=buf, casting="same_kind")
        return np.argmin(np.add(flat, buf, out=buf), axis=1)

    cheapest = int(np.argmin(costs))
    if costs[cheapest] * n > limit + 1e-9:
        return np.full(n, cheapest, dtype=np.int64)
    sampled = n >= 8 * SAMPLE_ROWS
    c0 = None if sampled else np.argmin(flat, axis=1)  # the choice at lambda = 0
    if c0 is not None and costs[c0].sum() <= limit:
        return c0

    def unconstrained():
        # A sampled bracket whose low end is infeasible proves c0 infeasible
        # (cost falls as lambda grows): one full pass saved, solved only if
        # the bracket reaches the bottom of the sweep.
        nonlocal c0
        if c0 is None:
            c0 = np.argmin(flat, axis=1)
        return c0

    # Lagrangian sweep on log(lambda): hi is feasible, lo is not.
    scale = max(float(flat.max()), 1e-30)
    lo, hi = np.log(scale * 1e-16), np.log(scale * 1e6)

    def top():  # the choice at hi (the cheapest format if even that overflows)
        a = choose(np.exp(hi))
        return a if costs[a].sum() <= limit else np.full(n, cheapest)

    known = None
    if sampled:
        known = _confirmed_bracket(
            flat, costs, budget_bits, lo, hi, unconstrained, top, choose
        )
        if c0 is not None and costs[c0].sum() <= limit:
            return c0
        a_hi = top  # solved only if the sweep's bracket ends up outside known
        a_lo = unconstrained
    else:
        a_hi, a_lo = top(), c0
    lo, hi, a_lo, a_hi = _sweep(flat, costs, limit, lo, hi, a_lo, a_hi, known, choose)
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
    return out


# Above this many rows (x8), a sample of the rows finds the sweep's bracket
# first, so the full sweep re-solves only the rows that change inside it.
SAMPLE_ROWS = 8192


def _sweep(flat, costs, limit, lo, hi, a_lo, a_hi, known=None, choose=None):
    """48 bisection steps on log(lambda) between infeasible ``lo`` (choice
    ``a_lo``) and feasible ``hi`` (``a_hi``, or a function solving it when
    needed); returns the final ``(lo, hi, a_lo, a_hi)``.

    Only rows whose choice differs between the bracket's ends can change
    inside it: each row's objective is linear in lambda, so a format that is
    the argmin at both ends is the argmin everywhere between. Each step
    re-solves those rows only (a shrinking set), not all of them.

    ``known``: ``(log_a, a_a, log_b, a_b)``, a bracket already confirmed on
    every row (cost at ``a`` over the limit, at ``b`` within it). The steps
    are the same, but those at or below ``log_a`` are infeasible and those
    at or above ``log_b`` feasible without solving anything (the cost falls
    as lambda grows); ``choose`` solves all rows at the end when the final
    bracket lies outside the known one.
    """
    lo0, hi0 = lo, hi
    log_a, a_a, log_b, a_b = known if known is not None else (lo, a_lo, hi, a_hi)
    cur_lo, cur_hi = a_a.copy(), a_b.copy()
    active = np.nonzero(cur_lo != cur_hi)[0]
    rows = flat[active]  # the active rows, compacted as the set shrinks
    fixed = costs[cur_hi].sum() - costs[cur_hi[active]].sum()
    moved_lo = moved_hi = False
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if mid <= log_a:
            lo = mid
            continue
        if mid >= log_b:
            hi = mid
            continue
        sub = np.argmin(rows + (np.exp(mid) * costs).astype(rows.dtype), axis=1)
        if fixed + costs[sub].sum() <= limit:
            hi, moved_hi = mid, True
            cur_hi[active] = sub
        else:
            lo, moved_lo = mid, True
            cur_lo[active] = sub
        moving = cur_lo[active] != cur_hi[active]
        if not moving.all():
            fixed += costs[cur_hi[active[~moving]]].sum()
            active, rows = active[moving], rows[moving]
    if known is None:
        return lo, hi, cur_lo, cur_hi
    if not moved_lo:
        if lo == lo0:
            cur_lo = a_lo() if callable(a_lo) else a_lo
        else:
            cur_lo = a_a if lo == log_a else choose(np.exp(lo))
    if not moved_hi:
        if hi == hi0:
            cur_hi = a_hi() if callable(a_hi) else a_hi
        else:
            cur_hi = a_b if hi == log_b else choose(np.exp(hi))
    return lo, hi, cur_lo, cur_hi


def _confirmed_bracket(flat, costs, budget_bits, lo, hi, a_lo, top, choose):
    """A narrow bracket of the sweep's lambda, found on every
    ``n // SAMPLE_ROWS``-th row and confirmed (widened if need be) on all;
    ``top()`` solves all rows at ``hi``, ``a_lo()`` at lambda = 0."""
    n = flat.shape[0]
    sample = flat[:: n // SAMPLE_ROWS]
    s_lo, s_hi = (
        np.argmin(sample + (lam * costs).astype(sample.dtype), axis=1)
        for lam in (0.0, np.exp(hi))
    )
    limit_s = budget_bits * sample.shape[0]
    _, guess, _, _ = _sweep(sample, costs, limit_s, lo, hi, s_lo, s_hi)
    limit = budget_bits * n
    # a narrow bracket leaves few rows to re-solve; widened (doubling) when
    # the sample's guess misses
    width = 0.1
    log_a, log_b = guess - width, guess + width
    a_a = a_b = None
    while a_a is None:
        if log_a <= lo:
            log_a, a_a = lo, a_lo()
            break
        a = choose(np.exp(log_a))
        if costs[a].sum() > limit:
            a_a = a
        else:  # feasible: the bracket's new top, look lower
            log_b, a_b = log_a, a
            width *= 2
            log_a -= width
    width = 0.1
    while a_b is None:
        if log_b >= hi:
            log_b, a_b = hi, top()
            break
        b = choose(np.exp(log_b))
        if costs[b].sum() <= limit:
            a_b = b
        else:
            log_a, a_a = log_b, b
            width *= 2
            log_b += width
    return log_a, a_a, log_b, a_b


# ----------------------------------------------------------------------------


def uniform_format(problem: AllocationProblem, budget_bits: float) -> int:
    """The one format with the largest cost within budget (least error on ties)."""
    L, _, Tn, F = problem.errors.shape
    errors = problem.errors
    if isinstance(errors, ErrorTable):
        totals = errors.totals()
    else:
        totals = errors.sum(axis=(0, 1, 2))
    best, best_key = None, None
    for f in range(F):
        eff = problem.effective_bits(problem.pin(np.full((L, Tn), f)))
        if eff > budget_bits + 0.02:
            continue
        key = (round(eff, 6), -float(totals[f]))
        if best_key is None or key > best_key:
            best, best_key = f, key
    if best is None:
        n_pin = 0 if problem.pinned is None else int(problem.pinned.sum())
        beside = f" beside {n_pin} pinned float tokens" if n_pin else ""
        raise ConfigError(f"no single format fits budget_bits={budget_bits}{beside}")
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
