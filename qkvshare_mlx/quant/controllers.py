"""Controllers: which tokens matter, as weights for the allocator.

A controller turns token statistics into an *importance* per (layer, token)
(separate weights for key and value errors); :func:`run_controller` hands
them to :func:`~.allocator.allocate_bits`. ``uniform`` skips the allocator:
one format for all.

Everything here is numpy over plain arrays: no MLX, no model.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .allocator import AllocationProblem, allocate_bits, uniform_format, validate_budget

N_SINK = 4


class NoAttentionStatsWarning(UserWarning):
    """A saliency controller fell back to key norms (no attention probe)."""


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
        query_moments: (L, H_kv, D, D) mean of ``q q^T`` over the probe
            queries of each KV head's query heads (post-RoPE): what
            ``QuantConfig(key_error="query")`` weighs key errors by.
        layer_weights: (L, 2) multipliers of each layer's key and value
            error weights: how much a unit of error in that layer moves the
            model's output (:mod:`qkvshare_mlx.sensitivity`); None: every
            layer alike.
    """

    attention: np.ndarray | None = None
    key_norms: np.ndarray | None = None
    query_moments: np.ndarray | None = None
    layer_weights: np.ndarray | None = None


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


# ----------------------------------------------------------------------------
# Importance functions, one per adaptive controller.


@dataclass(frozen=True)
class TokenSpan:
    """The tokens an importance function weighs: cache positions ``start``
    to ``n_tokens - 1`` (earlier ones are inherited) in each of ``n_layers``
    layers."""

    n_layers: int
    n_tokens: int
    start: int = 0

    @classmethod
    def of(cls, problem) -> TokenSpan:
        """The span of an :class:`~.allocator.AllocationProblem`."""
        return cls(problem.errors.shape[0], problem.n_tokens, problem.start)


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


def _attention_mass(
    stats: TokenStats | None, source: str, span: TokenSpan
) -> np.ndarray:
    L, T = span.n_layers, span.n_tokens
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
    if not parts and source == "attention" and stats is not None:
        if stats.key_norms is not None:
            # the default settings never fail: no probe (e.g. a fused qkv_proj)
            warnings.warn(
                "saliency: no attention statistics for this model (its attention "
                "could not be probed); weighting tokens by key norms instead",
                NoAttentionStatsWarning,
                stacklevel=4,
            )
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
    return mass[:, span.start :]


def importance_sink_recent(span: TokenSpan, stats, plan, sink=N_SINK, recent=N_RECENT):
    """Attention sinks and a recent window get the attention mass, others none."""
    L, T = span.n_layers, span.n_tokens
    mask = _protected(span.start, T, sink, recent)
    mass = np.zeros((L, mask.size))
    if mask.any():
        mass[:, mask] = 1.0 / mask.sum()
    return kv_importance(mass, T)


def importance_saliency(span: TokenSpan, stats, plan, source="attention"):
    """Measured attention mass (or key norms) from the sender's probe queries."""
    return kv_importance(_attention_mass(stats, source, span), span.n_tokens)


def importance_topology(span: TokenSpan, stats, plan, source="attention"):
    """Saliency tempered by the handoff plan.

    The probe queries predict what the *next* agent attends to; agents further
    down the chain (or several receivers) ask other questions. So the
    measured mass is flattened (``mass ** gamma``) the more hops remain and
    the more receivers read the card, while attention sinks, which every
    query uses, keep their measured mass.
    """
    plan = plan or HandoffPlan()
    mass = _attention_mass(stats, source, span)
    gamma = 1.0 / (
        1.0 + 0.5 * max(plan.hops_remaining, 0) + 0.25 * (plan.receivers - 1)
    )
    tempered = _normalise(mass**gamma)
    sinks = _protected(span.start, span.n_tokens, N_SINK, 0)
    tempered[:, sinks] = np.maximum(tempered[:, sinks], mass[:, sinks])
    return kv_importance(_normalise(tempered), span.n_tokens)


CONTROLLERS = {
    "uniform": None,
    "sink-recent": importance_sink_recent,
    "saliency": importance_saliency,
    "saliency-keynorm": lambda sp, st, pl: importance_saliency(sp, st, pl, "keynorm"),
    "saliency-both": lambda sp, st, pl: importance_saliency(sp, st, pl, "both"),
    "topology": importance_topology,
}


def token_importance(
    name: str,
    stats: TokenStats | None,
    n_layers: int,
    n_tokens: int,
    plan: HandoffPlan | None = None,
) -> np.ndarray:
    """(L, 2, T) key and value error weights of an adaptive controller over a
    whole cache (before any ``layer_weights``): what the allocator weighs
    each token's errors by."""
    check_controller(name)
    if CONTROLLERS[name] is None:
        raise ConfigError(f"controller {name!r} weighs no tokens (no allocation)")
    return CONTROLLERS[name](TokenSpan(n_layers, n_tokens), stats, plan)


def _weigh_layers(imp: np.ndarray, stats: TokenStats | None) -> np.ndarray:
    w = None if stats is None else stats.layer_weights
    if w is None:
        return imp
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (imp.shape[0], 2):
        raise ConfigError(
            f"layer_weights has shape {w.shape}, expected {(imp.shape[0], 2)} "
            "(a key and a value weight per layer)"
        )
    check_layer_weights(w, "layer_weights")
    return imp * w[:, :, None]


def with_sensitivity(stats: TokenStats | None, sensitivity, n_layers: int):
    """``stats`` carrying ``sensitivity``'s layer weights (a
    :class:`qkvshare_mlx.sensitivity.LayerSensitivity`, or anything with its
    ``layer_weights(n_layers)``); unchanged for None. Numpy only, for both
    runtimes' card makers."""
    if sensitivity is None:
        return stats
    weights = sensitivity.layer_weights(n_layers)
    return dataclasses.replace(stats or TokenStats(), layer_weights=weights)


# layer weights (measured multipliers are clipped into it): wider would let
# float32 weighted errors overflow or vanish in the allocator
WEIGHT_RANGE = (1e-3, 1e3)


def check_layer_weights(w: np.ndarray, what: str) -> None:
    """Raise ConfigError unless every weight is finite and in :data:`WEIGHT_RANGE`."""
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ConfigError(f"{what} must be finite and positive")
    lo, hi = WEIGHT_RANGE
    if w.min() < lo or w.max() > hi:
        raise ConfigError(
            f"{what} must lie in [{lo:g}, {hi:g}] but range over "
            f"[{w.min():g}, {w.max():g}]"
        )


def check_controller(name: str) -> str:
    if name not in CONTROLLERS:
        raise ConfigError(
            f"controller must be one of {sorted(CONTROLLERS)} but got {name!r}"
        )
    return name


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
    lossless = problem.lossless_format(budget_bits)
    if lossless is not None:  # every token fits in float: nothing to trade
        assignment = np.full((L, Tn), lossless, dtype=np.int64)
        if name == "uniform":
            return assignment, {"format": problem.formats[lossless].label()}
        eff = problem.effective_bits(assignment)
        return assignment, {"planned_effective_bits": eff, "target_bits": eff}
    if name == "uniform":
        f = uniform_format(problem, budget_bits)
        return problem.pin(np.full((L, Tn), f, dtype=np.int64)), {
            "format": problem.formats[f].label()
        }
    imp = _weigh_layers(CONTROLLERS[name](TokenSpan.of(problem), stats, plan), stats)
    costs = problem.costs
    free = problem.free()
    # Pinned float tokens take their share of the budget first.
    target = float(budget_bits)
    if free is not problem.held:  # pinned: held tokens, the rest are free
        n_pinned, n_free = int(problem.pinned.sum()), int(free.sum())
        pinned_cost = costs[problem.float_format] * n_pinned
        target = (target * (n_pinned + n_free) - pinned_cost) / max(n_free, 1)
        if n_free and target < costs.min() - 1e-9:
            raise ConfigError(
                f"budget_bits={budget_bits} cannot hold {n_pinned} pinned "
                f"float tokens (pin_sinks/pin_recent) and {n_free} others"
            )
    # The allocator plans with nominal costs; per-channel tails can cost a
    # little more, so tighten the target until the exact count fits.
    for _ in range(8):
        assignment = problem.pin(
            allocate_bits(imp, problem.errors, costs, target, held=free)
        )
        eff = problem.effective_bits(assignment)
        if eff <= budget_bits + 0.02:
            break
        target -= eff - budget_bits + 0.005
    return assignment, {"planned_effective_bits": eff, "target_bits": target}
