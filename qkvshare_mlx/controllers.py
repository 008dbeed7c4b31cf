"""Bit-allocation controllers: which format each token gets, under a budget.

A controller turns token statistics into an *importance* per (layer, token);
one allocator then solves

    minimize   sum_{l,t} importance[l,t] * (err_K[l,t,f] + err_V[l,t,f])
    subject to mean_{l,t} cost(f[l,t]) <= budget_bits

over the format menu, where ``err`` is the expected squared reconstruction
error of the token under format ``f`` (measured group ranges, see
``error_table``) and ``cost`` the effective bits per element,
scales included. The solver is a Lagrangian sweep (optimal for the budget it
reaches) followed by a greedy fill of the remaining budget by best error
reduction per bit. ``uniform`` skips the allocator: one format for all.

Everything here is numpy over plain arrays: no MLX, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CacheShapeError, ConfigError
from .formats import Format, QuantizedKV, Segment, planned_bits

N_SINK = 4
N_RECENT = 32
KEY_FLOOR = 1.0  # flat share of key-error weight (see kv_importance)
VALUE_FLOOR = 0.1  # flat share of value-error weight


@dataclass
class TokenStats:
    """Statistics a saliency controller reads, per layer and token.

    Attributes:
        attention: (L, T) attention mass each cached token receives from the
            probe queries (the sender's last queries), summed over heads.
        key_norms: (L, T) L2 norm of each token's keys, summed over heads.
    """

    attention: np.ndarray | None = None
    key_norms: np.ndarray | None = None


@dataclass(frozen=True)
class HandoffPlan:
    """What happens to the card after this hop.

    Attributes:
        hops_remaining: how many more times the card will be handed on
            after its receiver (0: the receiver is the last agent).
        receivers: how many agents receive this card.
    """

    hops_remaining: int = 0
    receivers: int = 1


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
    """

    errors: np.ndarray
    formats: list[Format]
    head_dims: tuple[int, int]
    float_bits: int
    start: int
    n_tokens: int

    @property
    def costs(self) -> np.ndarray:
        return np.array([f.nominal_cost(self.float_bits) for f in self.formats])

    def effective_bits(self, assignment: np.ndarray) -> float:
        """Exact effective bits the (L, T') assignment stores (tails included)."""
        dk, dv = self.head_dims
        total = 0
        for layer in assignment:
            counts = np.bincount(layer, minlength=len(self.formats))
            total += planned_bits(
                dict(zip(self.formats, counts.tolist())), dk, dv, self.float_bits
            )
        return total / max(assignment.size * (dk + dv), 1)


def allocate_bits(
    importance: np.ndarray,
    errors: np.ndarray,
    costs: np.ndarray,
    budget_bits: float,
) -> np.ndarray:
    """Choose one format per (layer, token) minimising weighted error under a budget.

    Args:
        importance: (L, T) non-negative weights, or (L, 2, T) separate
            weights for the key and the value errors.
        errors: (L, 2, T, F) squared errors (K and V) per format.
        costs: (F,) bits per element of each format.
        budget_bits: the mean cost not to exceed.

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
# Importance functions, one per adaptive controller.


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    s = x.sum(axis=-1, keepdims=True)
    return x / np.where(s > 0, s, 1.0)


def kv_importance(mass: np.ndarray, n_tokens: int) -> np.ndarray:
    """(L, T') attention mass per token -> (L, 2, T') key and value weights.

    A value error reaches the output in proportion to the attention its
    token receives. A key error shifts the token's logit, and the softmax
    can turn a shifted logit into attention for *any* token, so keys also get
    a flat floor (``KEY_FLOOR`` of the total mass, spread evenly).
    """
    flat = np.full_like(mass, 1.0 / max(n_tokens, 1))
    return np.stack([mass + KEY_FLOOR * flat, mass + VALUE_FLOOR * flat], axis=1)


def _protected(start: int, n_tokens: int, sink: int, recent: int) -> np.ndarray:
    pos = np.arange(start, n_tokens)
    recent = min(recent, n_tokens // 8)
    return (pos < sink) | (pos >= n_tokens - recent)


def _attention_mass(stats: TokenStats | None, source: str, problem) -> np.ndarray:
    L, T = problem.errors.shape[0], problem.n_tokens
    parts = []
    if (
        stats is not None
        and source in ("attention", "both")
        and stats.attention is not None
    ):
        parts.append(_normalise(stats.attention))
    if (
        stats is not None
        and source in ("keynorm", "both")
        and stats.key_norms is not None
    ):
        parts.append(_normalise(stats.key_norms))
    if not parts:
        raise ConfigError(
            f"controller needs token statistics ({source}) but none were given"
        )
    mass = sum(parts) / len(parts)
    if mass.shape != (L, T):
        raise ConfigError(
            f"token statistics have shape {mass.shape}, expected {(L, T)}"
        )
    return mass[:, problem.start :]


def importance_sink_recent(problem, stats, plan, sink=N_SINK, recent=N_RECENT):
    """Attention sinks and a recent window get the attention mass, others none."""
    L, T = problem.errors.shape[0], problem.n_tokens
    mask = _protected(problem.start, T, sink, recent)
    mass = np.zeros((L, mask.size))
    if mask.any():
        mass[:, mask] = 1.0 / mask.sum()
    return kv_importance(mass, T)


def importance_saliency(problem, stats, plan, source="attention"):
    """Measured attention mass (or key norms) from the sender's probe queries."""
    return kv_importance(_attention_mass(stats, source, problem), problem.n_tokens)


def importance_topology(problem, stats, plan, source="attention"):
    """Saliency tempered by the handoff plan.

    The probe queries predict what the *next* agent attends to; agents further
    down the chain (or several receivers) ask other questions. So the
    measured mass is flattened (``mass ** gamma``) the more hops remain and
    the more receivers read the card, while attention sinks, which every
    query uses, keep their measured mass.
    """
    plan = plan or HandoffPlan()
    mass = _attention_mass(stats, source, problem)
    gamma = 1.0 / (
        1.0 + 0.5 * max(plan.hops_remaining, 0) + 0.25 * (plan.receivers - 1)
    )
    tempered = _normalise(mass**gamma)
    sinks = _protected(problem.start, problem.n_tokens, N_SINK, 0)
    tempered[:, sinks] = np.maximum(tempered[:, sinks], mass[:, sinks])
    return kv_importance(_normalise(tempered), problem.n_tokens)


CONTROLLERS = {
    "uniform": None,
    "sink-recent": importance_sink_recent,
    "saliency": importance_saliency,
    "saliency-keynorm": lambda p, s, pl: importance_saliency(p, s, pl, "keynorm"),
    "saliency-both": lambda p, s, pl: importance_saliency(p, s, pl, "both"),
    "topology": importance_topology,
}


def check_controller(name: str) -> str:
    if name not in CONTROLLERS:
        raise ConfigError(
            f"controller must be one of {sorted(CONTROLLERS)} but got {name!r}"
        )
    return name


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


def run_controller(
    name: str,
    problem: AllocationProblem,
    budget_bits: float,
    *,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    config=None,
) -> tuple[np.ndarray, dict]:
    """Assign a format to every (layer, new token).

    Returns:
        (L, T') format indices and a dict of diagnostics.
    """
    check_controller(name)
    validate_budget(budget_bits, problem.formats, problem.float_bits)
    L, _, Tn, _ = problem.errors.shape
    if name == "uniform":
        f = uniform_format(problem, budget_bits)
        return np.full((L, Tn), f, dtype=np.int64), {
            "format": problem.formats[f].label()
        }
    imp = CONTROLLERS[name](problem, stats, plan)
    costs = problem.costs
    # The allocator plans with nominal costs; per-channel tails can cost a
    # little more, so tighten the target until the exact count fits.
    target = float(budget_bits)
    for _ in range(8):
        assignment = allocate_bits(imp, problem.errors, costs, target)
        eff = problem.effective_bits(assignment)
        if eff <= budget_bits + 0.02:
            break
        target -= eff - budget_bits + 0.005
    return assignment, {"planned_effective_bits": eff, "target_bits": target}


def quantize_with(
    keys,
    values,
    dims: tuple[int, int, int, int, int],
    *,
    error_table,
    quantize_layer,
    controller: str,
    budget_bits: float,
    config,
    stats: TokenStats | None = None,
    plan: HandoffPlan | None = None,
    inherited: QuantizedKV | None = None,
) -> QuantizedKV:
    """The quantization pipeline, independent of the array library.

    The MLX quantizer and the numpy one (``np_quantizer``) both call this with
    their own ``error_table(k, v, formats, float_bits) -> (2, T, F)`` and
    ``quantize_layer(k, v, formats, assignment, *, config, start)``.

    Args:
        keys, values: per layer, (B, H, T, D) arrays, already validated.
        dims: (B, H, T, D_k, D_v).
        controller, budget_bits, config, stats, plan, inherited: see
            ``quantizer.quantize_cache``.
    """
    B, H, T, dk, dv = dims
    check_controller(controller)
    start = 0
    if inherited is not None:
        if len(inherited.layers) != len(keys) or inherited.shape != (B, H, dk, dv):
            raise CacheShapeError(
                f"inherited cache has {len(inherited.layers)} layers of shape "
                f"{inherited.shape}, new cache {len(keys)} of {(B, H, dk, dv)}"
            )
        start = inherited.n_tokens
        if inherited.config.rotation != config.rotation:
            raise ConfigError(
                f"inherited cache has rotation {inherited.config.rotation!r}, "
                f"new tokens {config.rotation!r}: a card keeps one rotation"
            )
        if start > T:
            raise CacheShapeError(f"inherited cache covers {start} tokens but T={T}")
    formats = config.menu(dk)
    new_layers: list[list[Segment]] = [[] for _ in keys]
    info = {}
    if T > start:
        errors = np.stack(
            [
                error_table(
                    k[:, :, start:], v[:, :, start:], formats, config.float_bits
                )
                for k, v in zip(keys, values)
            ]
        )  # (L, 2, T', F)
        problem = AllocationProblem(
            errors=errors,
            formats=formats,
            head_dims=(dk, dv),
            float_bits=config.float_bits,
            start=start,
            n_tokens=T,
        )
        assignment, info = run_controller(
            controller, problem, budget_bits, stats=stats, plan=plan, config=config
        )
        for li, (k, v) in enumerate(zip(keys, values)):
            new_layers[li] = quantize_layer(
                k, v, formats, assignment[li], config=config, start=start
            )
    layers = [
        (list(inherited.layers[i]) if inherited is not None else []) + new_layers[i]
        for i in range(len(keys))
    ]
    qkv = QuantizedKV(layers, T, (B, H, dk, dv), config, controller, budget_bits, info)
    if inherited is None and T > 0 and abs(qkv.effective_bits - budget_bits) > 0.05:
        info["budget_note"] = (
            f"effective bits {qkv.effective_bits:.3f} differ from budget {budget_bits}"
        )
    return qkv


# ----------------------------------------------------------------------------
# Error model: expected squared error of each token under each format. Written
# once for any array namespace with numpy's spelling (numpy or mlx.core).


def _token_group_sq_range(x, group: int):
    """Sum over (B, H, groups) of group * range^2 for per-token groups -> (T,)."""
    B, H, T, D = x.shape
    g = x.reshape(B, H, T, D // group, group)
    r = g.max(axis=-1) - g.min(axis=-1)
    return (group * r * r).sum(axis=(0, 1, 3))


def _channel_sq_range(x, group: int, xp):
    """Sum over channels of range^2 in windows of ``group`` tokens, per token."""
    B, H, T, D = x.shape
    pad = (-T) % group
    if pad:
        x = xp.concatenate([x, xp.repeat(x[:, :, -1:], pad, axis=2)], axis=2)
    w = x.reshape(B, H, (T + pad) // group, group, D)
    r = w.max(axis=3) - w.min(axis=3)  # (B, H, W, D)
    per_window = (r * r).sum(axis=(0, 1, 3))  # (W,)
    return xp.repeat(per_window, group)[:T]


def error_table(keys, values, formats: list[Format], float_bits: int = 16, *, xp=np):
    """Expected squared reconstruction error per token and format.

    Uses the uniform-rounding model ``(range / (2^b - 1))^2 / 12`` per element
    with the group ranges measured on this cache.

    Args:
        keys, values: (B, H, T, D) arrays of one layer (of namespace ``xp``).
        formats: the format menu.
        float_bits: storage bits of float tokens (16 or 32).
        xp: the array namespace (``numpy`` or ``mlx.core``).

    Returns:
        (2, T, F) float64 numpy array: key errors and value errors.
    """
    xk, xv = keys.astype(xp.float32), values.astype(xp.float32)
    ranges = {}
    for f in formats:
        if f.is_float:
            continue
        kk = ("kc" if f.key_layout == "channel" else "kt", f.key_group)
        if kk not in ranges:
            if kk[0] == "kc":
                ranges[kk] = _channel_sq_range(xk, f.key_group, xp)
            else:
                ranges[kk] = _token_group_sq_range(xk, f.key_group)
        if ("vt", f.value_group) not in ranges:
            ranges[("vt", f.value_group)] = _token_group_sq_range(xv, f.value_group)
    ranges = {k: np.asarray(v, dtype=np.float64) for k, v in ranges.items()}
    T = keys.shape[2]
    out = np.zeros((2, T, len(formats)), dtype=np.float64)
    fl_eps = 2.0 ** (-2 * 11) / 3 if float_bits == 16 else 0.0
    k2 = np.asarray((xk * xk).sum(axis=(0, 1, 3)), dtype=np.float64)
    v2 = np.asarray((xv * xv).sum(axis=(0, 1, 3)), dtype=np.float64)
    for i, f in enumerate(formats):
        if f.is_float:
            out[0, :, i] = k2 * fl_eps
            out[1, :, i] = v2 * fl_eps
            continue
        denom = 12.0 * ((1 << f.bits) - 1) ** 2
        kk = ("kc" if f.key_layout == "channel" else "kt", f.key_group)
        out[0, :, i] = ranges[kk] / denom
        out[1, :, i] = ranges[("vt", f.value_group)] / denom
    return out


def check_kv(keys, values, *, xp=np) -> tuple[int, ...]:
    """Validate per-layer (B, H, T, D) K/V lists of namespace ``xp``.

    Returns:
        (B, H, T, D_k, D_v).

    Raises:
        CacheShapeError: lists of different lengths, a tensor that is not
            (B, H, T, D), layers of different shapes, or NaN/Inf values.
    """
    if len(keys) != len(values) or not keys:
        raise CacheShapeError(
            f"expected the same non-zero number of key and value layers, "
            f"got {len(keys)} and {len(values)}"
        )
    ref = None
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.ndim != 4 or v.ndim != 4:
            raise CacheShapeError(
                f"layer {i}: expected (B, H, T, D) arrays, got shapes "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.shape[:3] != v.shape[:3]:
            raise CacheShapeError(
                f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} "
                "differ in (B, H, T)"
            )
        dims = (*k.shape, v.shape[3])
        if ref is None:
            ref = dims
        elif dims != ref:
            raise CacheShapeError(f"layer {i}: shape {dims} differs from layer 0 {ref}")
        if not (bool(xp.isfinite(k).all()) and bool(xp.isfinite(v).all())):
            raise CacheShapeError(f"layer {i}: keys or values contain NaN or Inf")
    return ref
