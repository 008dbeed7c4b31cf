"""Pre-RoPE keys: the card's position-dependent rotation of key channel pairs.

A model's RoPE rotates each cached key's channel pairs by an angle that
grows with its position, so a channel's outlier magnitude is smeared over
its pair at a different phase per token: per-channel code groups then span
both. KVQuant (arXiv:2401.18079) quantizes keys before RoPE instead. A
card with ``quant.config.key_rope`` (format version 4) does the same: the
writer rotates row ``t`` of every layer's keys back by ``t * f_i`` per
channel pair ``i`` before quantizing, and every reader rotates the decoded
rows forward again (docs/cachecard-format.md, section 5.2).

The angles are the card's own, not the receiver's: sender and receiver
apply the same table, so the keys come back whatever the model's RoPE
computes in its own arithmetic. The writer takes the frequencies from the
model (:func:`from_mlx_model` probes each layer's ``self_attn.rope``, so
scaled variants, partial rotary factors and Gemma 3's per-layer bases need
no code of their own); an inexact frequency only makes the stored keys a
little less "pre-RoPE". Row ``t`` of a card is rotated by ``t * f``
whatever the card's RoPE offset.

The module knows the rotation and its parameters; it knows nothing about
cards or caches. Tables are computed in float64 and rounded to float32, and
the rotation is applied in float32 as ``x1*c - x2*s``, ``x1*s + x2*c``
(``s`` negated to undo it), in numpy and MLX alike: both give the same
bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import ConfigError

PAIRINGS = ("half", "interleaved")  # (i, i + R/2), as mlx-lm's default; (2i, 2i+1)
MAX_FREQ = math.pi  # radians per position; a larger one aliases to a smaller one
_PROBE_AT = (1, 4096)  # positions probed: coarse angle, then refined


@dataclass(frozen=True)
class RopeSpec:
    """One RoPE: channel pairs and their angle per position.

    Attributes:
        pairing: ``"half"`` (pairs ``(i, i + R/2)``) or ``"interleaved"``
            (pairs ``(2i, 2i + 1)``), over the first ``R = 2 * len(freqs)``
            channels; channels from ``R`` on are not rotated.
        freqs: (R/2,) radians per position of each pair, float32 values.
    """

    pairing: str
    freqs: tuple[float, ...]

    def __post_init__(self):
        if self.pairing not in PAIRINGS:
            raise ConfigError(
                f"pairing must be one of {list(PAIRINGS)} but got {self.pairing!r:.40}"
            )
        if not self.freqs:
            raise ConfigError("freqs must not be empty")
        for i, f in enumerate(self.freqs):
            # floats only: a card's JSON is rewritten as read when handed on
            ok = type(f) is float and math.isfinite(f) and abs(f) <= MAX_FREQ
            if not ok or float(np.float32(f)) != f:
                raise ConfigError(
                    f"freqs[{i}] must be a float32 value in [-pi, pi] but got {f!r:.40}"
                )

    @property
    def dims(self) -> int:
        """R, the channels rotated."""
        return 2 * len(self.freqs)

    def to_dict(self) -> dict:
        return {"pairing": self.pairing, "freqs": [float(f) for f in self.freqs]}


@dataclass(frozen=True)
class KeyRope:
    """Per layer, the RoPE its keys were rotated back by.

    Attributes:
        specs: the distinct RoPEs.
        layers: (L,) per layer, the index of its spec in ``specs``.
    """

    specs: tuple[RopeSpec, ...]
    layers: tuple[int, ...]

    def __post_init__(self):
        if not self.specs or not all(isinstance(s, RopeSpec) for s in self.specs):
            raise ConfigError("key_rope.specs: expected one or more RopeSpec")
        if not self.layers or not all(
            type(i) is int and 0 <= i < len(self.specs) for i in self.layers
        ):
            raise ConfigError(
                f"key_rope.layers: expected spec indices 0..{len(self.specs) - 1}, "
                f"got {list(self.layers)!r:.60}"
            )

    def spec(self, layer: int) -> RopeSpec:
        return self.specs[self.layers[layer]]

    def check(self, n_layers: int, head_dim: int) -> None:
        """Raise ConfigError unless this fits L layers of head size D_k."""
        if len(self.layers) != n_layers:
            raise ConfigError(
                f"key_rope.layers: expected {n_layers} entries (one per layer), "
                f"got {len(self.layers)}"
            )
        for i, s in enumerate(self.specs):
            if s.dims > head_dim:
                raise ConfigError(
                    f"key_rope.specs[{i}]: {s.dims} rotated channels, more than "
                    f"the keys' head size {head_dim}"
                )

    def to_dict(self) -> dict:
        return {"specs": [s.to_dict() for s in self.specs], "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: Any) -> KeyRope:
        """The inverse of :meth:`to_dict`; ConfigError names what is wrong."""
        if not isinstance(d, dict) or set(d) != {"specs", "layers"}:
            raise ConfigError(
                "key_rope: expected an object with keys ['layers', 'specs'], "
                f"got {d!r:.60}"
            )
        specs, layers = d["specs"], d["layers"]
        if not isinstance(specs, list) or not isinstance(layers, list):
            raise ConfigError("key_rope: specs and layers must be lists")
        out = []
        for i, s in enumerate(specs):
            if not isinstance(s, dict) or set(s) != {"pairing", "freqs"}:
                raise ConfigError(
                    f"key_rope.specs[{i}]: expected keys ['freqs', 'pairing'], "
                    f"got {s!r:.60}"
                )
            if not isinstance(s["freqs"], list):
                raise ConfigError(f"key_rope.specs[{i}].freqs: expected a list")
            try:
                out.append(RopeSpec(s["pairing"], tuple(s["freqs"])))
            except ConfigError as e:
                raise ConfigError(f"key_rope.specs[{i}]: {e}") from None
        return cls(tuple(out), tuple(layers))


def layer_spec(key_rope: KeyRope | None, layer: int) -> RopeSpec | None:
    """Layer ``layer``'s spec of ``key_rope``, None for keys as cached."""
    return None if key_rope is None else key_rope.spec(layer)


# ----------------------------------------------------------------------------
# The rotation


@lru_cache(maxsize=4)  # T * R/2 * 8 bytes each (2 MB at 8000 tokens, R 64)
def tables(spec: RopeSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, R/2) float32 ``cos(t * f)`` and ``sin(t * f)`` for rows t < n
    (computed in float64). Read-only."""
    theta = np.arange(n, dtype=np.float64)[:, None] * np.asarray(spec.freqs, np.float64)
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    c.setflags(write=False)
    s.setflags(write=False)
    return c, s


def _halves(x, spec: RopeSpec):
    h, R = len(spec.freqs), spec.dims
    if spec.pairing == "half":
        return x[..., :h], x[..., h:R]
    return x[..., 0:R:2], x[..., 1:R:2]


def rope_rows(
    x: np.ndarray,
    spec: RopeSpec,
    *,
    inverse: bool = False,
    first: int = 0,
    chunk: int = 1024,
) -> None:
    """Rotate (..., n, D) float32 rows in place: row j by ``(first + j) * f``
    (back by it with ``inverse``). Chunk by chunk along the rows, so the
    temporaries stay cache-sized."""
    n = x.shape[-2]
    c_all, s_all = tables(spec, first + n)
    if inverse:
        s_all = -s_all
    lead = x.shape[:-2]
    h = len(spec.freqs)
    t1 = np.empty((*lead, min(chunk, n), h), np.float32)
    t2 = np.empty_like(t1)
    for a in range(0, n, chunk):
        rows = x[..., a : a + chunk, :]
        m = rows.shape[-2]
        c, s = c_all[first + a : first + a + m], s_all[first + a : first + a + m]
        x1, x2 = _halves(rows, spec)
        y1, y2 = t1[..., :m, :], t2[..., :m, :]
        # y1 = x1*c - x2*s and y2 = x1*s + x2*c, each product rounded, no temporaries
        np.multiply(x1, c, out=y1)
        np.multiply(x2, s, out=y2)
        np.subtract(y1, y2, out=y1)
        np.multiply(x1, s, out=y2)
        np.multiply(x2, c, out=x2)
        np.add(y2, x2, out=x2)
        x1[...] = y1


def rope_np(x: np.ndarray, spec: RopeSpec, *, inverse: bool = False) -> np.ndarray:
    """(..., T, D) rows rotated as :func:`rope_rows` does, as a new float32 array."""
    out = np.array(x, dtype=np.float32, copy=True)
    rope_rows(out, spec, inverse=inverse)
    return out


def rope_mx(x, spec: RopeSpec, *, inverse: bool = False):
    """(..., T, D) MLX rows rotated as :func:`rope_rows` does (float32), the
    same bits."""
    import mlx.core as mx

    x = x.astype(mx.float32)
    c, s = tables(spec, x.shape[-2])
    c, s = mx.array(c), mx.array(-s if inverse else s)
    h, R = len(spec.freqs), spec.dims
    if spec.pairing == "half":
        x1, x2 = x[..., :h], x[..., h:R]
        parts = [x1 * c - x2 * s, x1 * s + x2 * c]
        return mx.concatenate(parts + ([x[..., R:]] if R < x.shape[-1] else []), -1)
    pairs = x[..., :R].reshape(*x.shape[:-1], h, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rot = mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(*x.shape[:-1], R)
    return mx.concatenate([rot, x[..., R:]], -1) if R < x.shape[-1] else rot


# ----------------------------------------------------------------------------
# From a model


def probe(rope_at, head_dim: int) -> RopeSpec:
    """The RoPE a function applies, from how it moves the unit vectors.

    Args:
        rope_at: ``rope_at(x, p)`` returns the (D, D) rows ``x`` rotated as
            keys at position ``p`` (row j is ``e_j`` rotated).
        head_dim: D.

    Raises:
        ConfigError: the function is not a RoPE of channel pairs (a single
            rotation angle per pair, the same scale on every channel).
    """
    D = head_dim
    eye = np.eye(D, dtype=np.float32)
    at = {p: np.asarray(rope_at(eye, p), np.float64).T for p in (0, *_PROBE_AT)}
    scale = at[0][0, 0]
    if not scale > 0 or np.abs(at[0] - scale * np.eye(D)).max() > 1e-5 * scale:
        raise ConfigError("RoPE at position 0 is not a multiple of the identity")
    for p in _PROBE_AT:
        at[p] = at[p] / scale
    moved = np.maximum(*(np.abs(at[p] - np.eye(D)) for p in _PROBE_AT))
    rotated = [j for j in range(D) if moved[:, j].max() > 1e-5]
    R = len(rotated)
    if R == 0 or R % 2 or rotated != list(range(R)):
        raise ConfigError(
            f"RoPE rotates channels {rotated[:8]}..., not the first R of {D} in pairs"
        )
    h = R // 2
    pairing = None
    for name, a, b in (
        ("half", np.arange(h), np.arange(h) + h),
        ("interleaved", np.arange(0, R, 2), np.arange(1, R, 2)),
    ):
        mask = np.zeros((D, D), bool)
        mask[a, a] = mask[b, b] = mask[a, b] = mask[b, a] = True
        mask[np.arange(R, D), np.arange(R, D)] = True
        if all(np.abs(at[p][~mask]).max(initial=0) <= 1e-5 for p in _PROBE_AT):
            pairing = name
            break
    if pairing is None:
        raise ConfigError(
            "RoPE mixes channels other than in (i, i+R/2) or (2i, 2i+1) pairs"
        )
    # the angle of pair i at position p: out[b] = sin * in[a], out[a] = cos * in[a]
    coarse = np.arctan2(at[1][b, a], at[1][a, a])
    far = _PROBE_AT[1]
    wrapped = np.arctan2(at[far][b, a], at[far][a, a])
    turns = np.round((far * coarse - wrapped) / (2 * np.pi))
    freqs = ((wrapped + 2 * np.pi * turns) / far).astype(np.float32)
    spec = RopeSpec(pairing, tuple(float(f) for f in freqs))
    c, s = tables(spec, far + 1)
    for p in _PROBE_AT:
        ref = np.eye(D)
        ref[a, a], ref[b, b], ref[b, a], ref[a, b] = c[p], c[p], s[p], -s[p]
        if np.abs(ref - at[p]).max() > 1e-3:
            raise ConfigError(f"RoPE at position {p} is not one angle per channel pair")
    return spec


def from_mlx_model(model, head_dim: int | None = None) -> KeyRope:
    """Per layer, the RoPE of an mlx-lm model's ``self_attn.rope``.

    Args:
        model: an mlx-lm model (``model.layers[i].self_attn.rope``).
        head_dim: D_k (default: what the model's modules say).

    Raises:
        ConfigError: a layer has no ``self_attn.rope``, or it is not a RoPE
            of channel pairs, or the head size is unknown.
    """
    import mlx.core as mx

    from .fingerprint import module_shape

    layers = getattr(model, "layers", None) or []
    head_dim = head_dim or module_shape(model).get("head_dim")
    if not layers or not head_dim:
        raise ConfigError(
            "pre-RoPE keys need a model with layers and a known head size"
        )
    ropes = []
    for li, layer in enumerate(layers):
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is None:
            raise ConfigError(
                f"layer {li} has no self_attn.rope: pre-RoPE keys need the model's RoPE"
            )

        def rope_at(x, p, rope=rope):
            out = rope(mx.array(x)[None, :, None, :], offset=p)
            return np.array(out.astype(mx.float32))[0, :, 0, :]

        ropes.append(rope_at)
    return probe_layers(ropes, head_dim)


def probe_layers(ropes, head_dim: int) -> KeyRope:
    """:func:`probe` of each layer's ``rope_at`` function, equal specs shared.

    Raises:
        ConfigError: naming the first layer whose function is not a RoPE.
    """
    specs: list[RopeSpec] = []
    index = []
    for li, rope_at in enumerate(ropes):
        try:
            spec = probe(rope_at, head_dim)
        except ConfigError as e:
            raise ConfigError(f"layer {li}: {e}") from None
        if spec not in specs:
            specs.append(spec)
        index.append(specs.index(spec))
    return KeyRope(tuple(specs), tuple(index))
