"""Storage formats for quantized K/V tokens, and the honest bit accounting.

A *format* is how one token's keys and values are stored: a code width
(2-8 bits, or 16 = a float copy) plus the grouping of the affine
scale/bias pairs. Keys may be grouped per token (along head_dim, like
``mx.quantize``) or per channel (along tokens, as in KIVI); values are
always grouped per token. A head size no group size divides (80) is
grouped per token in groups of 32 over its row padded to a multiple of 32
(:func:`padded_dim`; format version 3), the padding counted in every bit
figure.

A quantized layer is a list of *segments*: each segment holds the tokens of
one format, their positions in the sequence (``index``) and the encoded K and
V. Segments are immutable once written; a cache handed on keeps its
inherited segments bit for bit and only appends new ones (hop stability).

This module knows nothing about MLX, torch or files: it is shared by the MLX
quantizer, the numpy reference codec and the card container.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, SegmentCoverageError
from .groups import (  # noqa: F401  (re-exported: the formats' row geometry)
    GROUP_SIZES,
    PAD_GROUP,
    fixed_group,
    pad_rows,
    padded,
    padded_dim,
    token_groups,
)
from .rope import KeyRope
from .rotation import check_rotation

CODE_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = 16
KEY_ERRORS = ("mse", "query")  # QuantConfig.key_error
ALL_BITS = CODE_BITS + (FLOAT_BITS,)
KEY_LAYOUTS = ("token", "channel")
FLOAT_DTYPES = {"float16": 16, "float32": 32}
SCALE_BITS = 16  # scales and biases are stored as float16


@dataclass(frozen=True)
class Format:
    """How one token's K and V are stored.

    Attributes:
        bits: code width (2, 3, 4, 5, 6, 8) or 16 for a float copy; the
            keys' width when ``value_bits`` is set.
        key_layout: ``"token"`` (groups along head_dim) or ``"channel"``
            (groups of ``key_group`` tokens per channel).
        key_group: group size for keys (elements or tokens, by layout).
        value_group: group size for values along head_dim.
        value_bits: the values' code width when it differs from the keys'
            (a split format, format version 3); None: ``bits`` for both.
    """

    bits: int
    key_layout: str = "token"
    key_group: int = 64
    value_group: int = 64
    value_bits: int | None = None

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    @property
    def vbits(self) -> int:
        """The values' code width."""
        return self.bits if self.value_bits is None else self.value_bits

    def nominal_cost(self, float_bits: int = 16) -> float:
        """Bits per K/V element, scales and biases included (K and V averaged)."""
        if self.is_float:
            return float(float_bits)
        k = self.bits + 2 * SCALE_BITS / self.key_group
        v = self.vbits + 2 * SCALE_BITS / self.value_group
        return (k + v) / 2

    def label(self) -> str:
        if self.is_float:
            return "f16"
        k = "c" if self.key_layout == "channel" else "t"
        b = self.bits if self.value_bits is None else f"{self.bits}/{self.vbits}"
        return f"{b}b/k{k}{self.key_group}/v{self.value_group}"


def validate_bits(bits: int) -> int:
    if bits not in ALL_BITS:
        raise ConfigError(f"bits must be one of {list(ALL_BITS)} but got {bits!r}")
    return bits


def widths_from(min_bits: int) -> tuple[int, ...]:
    """The widths a controller may choose when no token gets fewer than
    ``min_bits`` code bits (a value of :data:`CODE_BITS`), float included."""
    if isinstance(min_bits, bool) or min_bits not in CODE_BITS:
        raise ConfigError(
            f"min bits must be one of {list(CODE_BITS)} but got {min_bits!r}"
        )
    return tuple(b for b in ALL_BITS if b >= min_bits)


def validate_group(group: int, what: str = "group_size") -> int:
    if group not in GROUP_SIZES:
        raise ConfigError(
            f"{what} must be one of {list(GROUP_SIZES)} but got {group!r}"
        )
    return group


@dataclass(frozen=True)
class QuantConfig:
    """Quantizer settings shared by every controller.

    Attributes:
        group_size: group size along head_dim for per-token groups (values,
            and keys in ``token`` layout).
        key_layout: ``"channel"`` (default, KIVI-style, see bench/quantize.py)
            or ``"token"``.
        key_group: token-group size for per-channel keys.
        float_dtype: storage of width-16 tokens: ``"float16"`` or ``"float32"``
            (a lossless copy of an fp32 cache, counted as 32 bits).
        widths: the code widths a controller may choose from.
        adaptive_groups: let controllers also pick the group sizes per token
            (cheaper or finer scales), not only the width.
        rotation: ``"none"`` or ``"hadamard"``: rotate each token's K/V
            vectors before quantizing (see :mod:`qkvshare_mlx.rotation`;
            needs power-of-two head dims). Width-16 tokens are then exact up
            to float32 rounding of the rotation, not bit for bit.
        split_kv: let controllers give a token's keys more bits than its
            values (formats ``k/v``: every pair of code widths with the keys'
            at least the values'; format version 3). On the default model
            the keys carry most of the error (bench/fidelity_search.py).
        pin_sinks, pin_recent: tokens stored in float whatever the
            controller chooses: the cache's first ``pin_sinks`` positions
            (attention sinks) and the last ``pin_recent`` tokens quantized at
            this hop (the newest context: KIVI's full-precision window).
            They count in the budget, so the other tokens get fewer bits. A
            sender-side allocation policy, like the controller: not written
            to the card (whose float tokens are ordinary width-16 segments).
        key_error: how the allocator measures a key's error: ``"mse"``, the
            squared error of the key vector, or ``"query"``, the squared
            error of its attention logits for the sender's probe queries
            (each channel weighted by their mean energy in it, see
            :func:`qkvshare_mlx.quant.error_model.query_weights`; needs
            ``TokenStats.query_moments``). Sender-side, not written to the
            card.
        key_rope: a :class:`~qkvshare_mlx.rope.KeyRope`: quantize the keys
            before RoPE (each row rotated back by its position's angles,
            and forward again by every reader; format version 4), from
            :func:`qkvshare_mlx.rope.from_mlx_model`. None: keys as cached.
    """

    group_size: int = 64
    key_layout: str = "channel"
    key_group: int = 64
    float_dtype: str = "float16"
    widths: tuple[int, ...] = ALL_BITS
    adaptive_groups: bool = True
    rotation: str = "none"
    split_kv: bool = False
    pin_sinks: int = 0
    pin_recent: int = 0
    key_error: str = "mse"
    key_rope: KeyRope | None = None

    def __post_init__(self):
        validate_group(self.group_size)
        validate_group(self.key_group, "key_group")
        if self.key_layout not in KEY_LAYOUTS:
            raise ConfigError(
                f"key_layout must be one of {list(KEY_LAYOUTS)} "
                f"but got {self.key_layout!r}"
            )
        if self.float_dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"float_dtype must be one of {list(FLOAT_DTYPES)} "
                f"but got {self.float_dtype!r}"
            )
        if not self.widths:
            raise ConfigError("widths must not be empty")
        for b in self.widths:
            validate_bits(b)
        check_rotation(self.rotation)
        if self.key_rope is not None and not isinstance(self.key_rope, KeyRope):
            raise ConfigError(
                "key_rope must be a KeyRope or None but got "
                f"{type(self.key_rope).__name__}"
            )
        if self.key_error not in KEY_ERRORS:
            raise ConfigError(
                f"key_error must be one of {list(KEY_ERRORS)} "
                f"but got {self.key_error!r}"
            )
        for name in ("pin_sinks", "pin_recent"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"{name} must be an integer >= 0 but got {n!r}")
        if (self.pin_sinks or self.pin_recent) and FLOAT_BITS not in self.widths:
            raise ConfigError(
                f"pin_sinks/pin_recent keep tokens in float: widths must include "
                f"{FLOAT_BITS}, got {list(self.widths)}"
            )

    @property
    def model_basis(self) -> bool:
        """Whether the codes are in the model's own basis (no rotation, keys
        as cached), so attention on them needs no transform (mlx-lm's
        ``QuantizedKVCache`` reads them as they are)."""
        return self.rotation == "none" and self.key_rope is None

    @property
    def float_bits(self) -> int:
        return FLOAT_DTYPES[self.float_dtype]

    def default_format(self, bits: int) -> Format:
        return Format(bits, self.key_layout, self._key_group(), self.group_size)

    def _key_group(self) -> int:
        return self.key_group if self.key_layout == "channel" else self.group_size

    def menu(self, head_dim: int, head_dim_v: int | None = None) -> list[Format]:
        """Formats a controller may assign, sorted by nominal cost.

        Args:
            head_dim: D_k, the keys' head size.
            head_dim_v: D_v, the values' (default: D_k).

        With ``adaptive_groups`` the group sizes vary too (per-token groups
        only of sizes that divide the head size they group, see
        :func:`token_groups`). A head size no group size divides (80) is
        grouped in 32s over a row padded to 96 (:func:`padded_dim`); without
        ``adaptive_groups`` the configured group must divide it, else only
        the float widths remain: a lossless card always works.

        Raises:
            ConfigError: no format at all fits these head sizes.
        """
        dv = head_dim if head_dim_v is None else head_dim_v
        key_token_groups = token_groups(head_dim)
        value_groups = token_groups(dv)
        needs_codes = any(b != FLOAT_BITS for b in self.widths)
        if self.adaptive_groups:
            vgroups = value_groups
            kgroups = (
                list(GROUP_SIZES) if self.key_layout == "channel" else key_token_groups
            )
        else:
            vgroups = fixed_group(dv, self.group_size)
            kgroups = [self._key_group()]
            if self.key_layout == "token":
                kgroups = fixed_group(head_dim, self.group_size)
        if needs_codes and (not vgroups or not kgroups):
            if FLOAT_BITS not in self.widths:
                value_side = kgroups and dv != head_dim
                head, size = (
                    ("head_dim_v", dv) if value_side else ("head_dim", head_dim)
                )
                groups = GROUP_SIZES if self.adaptive_groups else (self.group_size,)
                raise ConfigError(
                    f"{head} {size} is not a multiple of any group size "
                    f"{list(groups)} and widths {list(self.widths)} hold no float"
                )
            kgroups = vgroups = []  # code widths cannot be stored: floats only
        out = []
        codes = [b for b in self.widths if b != FLOAT_BITS]
        for b in self.widths:
            if b == FLOAT_BITS:
                out.append(Format(FLOAT_BITS, "token", 0, 0))
                continue
            vbits = [vb for vb in codes if vb <= b] if self.split_kv else [b]
            for vb in vbits:
                for kg in kgroups:
                    for vg in vgroups:
                        split = None if vb == b else vb
                        out.append(Format(b, self.key_layout, kg, vg, split))
        out.sort(key=lambda f: (f.nominal_cost(self.float_bits), -f.bits))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "key_layout": self.key_layout,
            "key_group": self.key_group,
            "float_dtype": self.float_dtype,
            "widths": list(self.widths),
            "adaptive_groups": self.adaptive_groups,
            # written only when used: unrotated cards stay format version 1,
            # byte for byte; rotated ones are version 2 (card.READ_VERSIONS)
            **({"rotation": self.rotation} if self.rotation != "none" else {}),
            # version 3 (with split formats): written only when set
            **({"split_kv": True} if self.split_kv else {}),
            # version 4: written only when set
            **({"key_rope": self.key_rope.to_dict()} if self.key_rope else {}),
        }


@dataclass
class Encoded:
    """One of K or V for the tokens of a segment.

    ``layout`` is ``"float"`` (``data``: (B, H, n, D) float), ``"token"``
    (``codes``: (B, H, n, D*bits/32) uint32, ``scales``/``biases``:
    (B, H, n, D/group) float16) or ``"channel"`` (``codes``: (B, H, D,
    n*bits/32), ``scales``/``biases``: (B, H, D, n/group); n is a multiple of
    ``group``). Arrays are numpy or MLX arrays. ``dim``: for a ``"token"``
    layout whose group does not divide the head size, that head size D: the
    rows are stored padded to ``padded_dim(D, group)`` (the pad repeats each
    row's last element) and decode back to D; None otherwise.
    """

    layout: str
    group: int = 0
    codes: Any = None
    scales: Any = None
    biases: Any = None
    data: Any = None
    dim: int | None = None

    def arrays(self) -> dict[str, Any]:
        if self.layout == "float":
            return {"data": self.data}
        return {"codes": self.codes, "scales": self.scales, "biases": self.biases}

    def payload_bits(self) -> int:
        return sum(int(a.size) * a.itemsize * 8 for a in self.arrays().values())


@dataclass
class Segment:
    """Tokens of one format in one layer.

    Attributes:
        bits: code width, or 16 for float.
        index: (n,) int32 positions of these tokens in the sequence.
        keys, values: the encoded K and V of these tokens.
    """

    bits: int
    index: Any
    keys: Encoded
    values: Encoded
    meta: dict = field(default_factory=dict)
    value_bits: int | None = None

    @property
    def vbits(self) -> int:
        """The values' code width (``bits`` unless the format is split)."""
        return self.bits if self.value_bits is None else self.value_bits

    @property
    def n_tokens(self) -> int:
        return int(self.index.shape[0])

    def map_arrays(self, fn) -> Segment:
        """A copy whose K/V arrays are ``fn(array)`` (e.g. numpy <-> MLX)."""

        def conv(enc: Encoded) -> Encoded:
            arrs = {k: fn(v) for k, v in enc.arrays().items()}
            return Encoded(enc.layout, enc.group, **arrs, dim=enc.dim)

        index = np.asarray(self.index, dtype=np.int32)
        return Segment(
            self.bits,
            index,
            conv(self.keys),
            conv(self.values),
            value_bits=self.value_bits,
        )

    def payload_bits(self) -> int:
        return self.keys.payload_bits() + self.values.payload_bits()


def check_cover(
    index, n_tokens: int, where: str = "segments", *, start: int = 0
) -> None:
    """Raise SegmentCoverageError unless ``index`` holds start..n_tokens-1 once each.

    The one coverage check: the card reader and writer, the decoders and the
    mlx-lm caches all call it.

    Args:
        index: the (n,) token positions of a layer's segments, concatenated.
        n_tokens: T.
        where: what is checked, for the message (e.g. ``"layer 3"``).
        start: the layer's first held position (a sliding-window layer's
            card rows may start after 0, see :attr:`QuantizedKV.held_from`).
    """
    index = np.asarray(index).reshape(-1)
    n = index.shape[0]
    if n and (int(index.min()) < start or int(index.max()) >= n_tokens):
        raise SegmentCoverageError(
            f"{where}: positions outside {start}..{n_tokens - 1}"
        )
    if n != n_tokens - start or (
        n and not (np.bincount(index.astype(np.int64) - start, minlength=n) == 1).all()
    ):
        raise SegmentCoverageError(
            f"{where}: {n} positions are not a permutation of {start}.."
            f"{n_tokens - 1} (segments must cover each token exactly once)"
        )


def window_start(n_tokens: int, window: int | None) -> int:
    """The first position a sliding-window layer must hold after ``n_tokens``
    tokens: the last ``window`` of them (what mlx-lm's ``RotatingKVCache``
    keeps; transformers keeps ``window - 1``); 0 for a full-attention layer."""
    return max(0, n_tokens - window) if window else 0


def trim_segments(segments: list[Segment], first: int) -> tuple[list[Segment], int]:
    """Drop the whole segments a layer no longer needs from position ``first`` on.

    Segments are kept or dropped whole (their codes stay bit for bit): a
    segment is kept if it holds a position >= ``first``, and then every
    segment holding a position at or after the lowest kept one, so the kept
    positions are exactly ``m..end`` for some ``m <= first``.

    Returns:
        (kept segments in their order, m); ``m`` is ``first`` when nothing
        is kept.
    """
    lows = [int(np.min(s.index)) if s.n_tokens else first for s in segments]
    highs = [int(np.max(s.index)) if s.n_tokens else -1 for s in segments]
    m = first
    while True:
        keep = [h >= m for h in highs]
        new_m = min([lo for lo, k in zip(lows, keep) if k] + [first])
        if new_m == m:
            break
        m = new_m
    return [s for s, k in zip(segments, keep) if k], m


def layer_index(segments: list[Segment]) -> np.ndarray:
    """The (n,) positions of a layer's segments, concatenated in segment order."""
    if not segments:
        return np.zeros(0, np.int32)
    return np.concatenate([np.asarray(s.index).reshape(-1) for s in segments])


def split_for_layout(n: int, fmt: Format) -> list[tuple[int, int, str, int]]:
    """How a bucket of ``n`` tokens of ``fmt`` is cut into stored segments.

    Returns (start, stop, key_layout, key_group) ranges over the bucket: for
    per-channel keys, whole groups of ``key_group`` tokens go channel-wise and
    the remaining tokens are stored per token (grouped like the values).
    """
    if fmt.is_float or fmt.key_layout == "token":
        return [(0, n, "float" if fmt.is_float else "token", fmt.key_group)]
    main = n // fmt.key_group * fmt.key_group
    out = []
    if main:
        out.append((0, main, "channel", fmt.key_group))
    if n > main:
        out.append((main, n, "token", fmt.value_group))
    return out


def planned_bits(
    counts: dict[Format, int], head_dim_k: int, head_dim_v: int, float_bits: int
) -> int:
    """Exact stored bits (per batch element and head) of buckets of given sizes."""
    total = 0
    for fmt, n in counts.items():
        if n == 0:
            continue
        if fmt.is_float:
            total += n * (head_dim_k + head_dim_v) * float_bits
            continue
        dv = padded_dim(head_dim_v, fmt.value_group)
        total += n * dv * (fmt.vbits + 2 * SCALE_BITS / fmt.value_group)
        for start, stop, layout, group in split_for_layout(n, fmt):
            dk = head_dim_k if layout == "channel" else padded_dim(head_dim_k, group)
            total += (stop - start) * dk * (fmt.bits + 2 * SCALE_BITS / group)
    return int(round(total))


@dataclass
class QuantizedKV:
    """A quantized cache: segments per layer plus its accounting.

    Attributes:
        layers: per layer, the segments covering tokens
            ``held_from[l]..n_tokens-1``.
        n_tokens: T, tokens covered.
        shape: (B, H_kv, D_k, D_v).
        config: the quantizer settings.
        controller, budget_bits: what chose the widths.
        held_from: per layer, the first position it holds: 0, or for a
            sliding-window layer the start of what its window keeps (its
            older tokens are masked out of every later query, so the card
            drops them). None: every layer holds every token.
    """

    layers: list[list[Segment]]
    n_tokens: int
    shape: tuple[int, int, int, int]
    config: QuantConfig
    controller: str = "uniform"
    budget_bits: float | None = None
    info: dict = field(default_factory=dict)
    held_from: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.held_from is not None:
            self.held_from = tuple(int(h) for h in self.held_from)
            if not any(self.held_from):
                self.held_from = None

    @property
    def starts(self) -> list[int]:
        """Per layer, the first position held (0 for an untrimmed layer)."""
        return list(self.held_from or (0,) * len(self.layers))

    @property
    def n_held(self) -> int:
        """Token rows held, summed over layers."""
        return sum(self.n_tokens - h for h in self.starts)

    @property
    def n_elements(self) -> int:
        B, H, dk, dv = self.shape
        return B * H * self.n_held * (dk + dv)

    @property
    def payload_bytes(self) -> int:
        return sum(s.payload_bits() for layer in self.layers for s in layer) // 8

    @property
    def effective_bits(self) -> float:
        """Stored bits per held K/V element, scales and biases included."""
        return 8 * self.payload_bytes / max(self.n_elements, 1)

    @property
    def nominal_bits(self) -> float:
        """Average code width per held K/V element (float tokens count their dtype)."""
        fb = self.config.float_bits
        total = sum(
            (fb if s.bits == FLOAT_BITS else (s.bits + s.vbits) / 2) * s.n_tokens
            for layer in self.layers
            for s in layer
        )
        return total / max(self.n_held, 1)

    def width_histogram(self) -> dict[int, int]:
        """Token count per width, summed over layers."""
        return width_histogram(self.layers)


def width_histogram(layers: list[list[Segment]]) -> dict[int, float]:
    """Token count per width, summed over layers (a token whose keys and
    values differ in width counts half for each)."""
    hist: dict[int, float] = {}
    for layer in layers:
        for s in layer:
            for b in (s.bits, s.vbits):  # a split token counts half each way
                hist[b] = hist.get(b, 0) + s.n_tokens / 2
    return {b: int(n) if n == int(n) else n for b, n in sorted(hist.items())}
