"""The project's mlx-lm cache classes, and loading prompt-cache files that hold them.

- :class:`StreamedKVCache`: an mlx-lm ``KVCache`` whose rows arrive from a
  background decode (``inject(..., mode="stream")``).
- :class:`MixedQuantizedKVCache`: one layer of a card kept quantized in memory,
  segments of any width and layout, plus a float tail for the receiver's
  tokens (``inject(..., mode="compressed")``).
- :func:`load_prompt_cache`: ``mlx_lm.models.cache.load_prompt_cache`` that also
  knows these classes, so a file written by mlx-lm's ``save_prompt_cache`` from
  any mix of mlx-lm's and our caches loads back.

Both classes speak mlx-lm 0.32's cache protocol: ``state`` carries everything,
arrays and scalars, and the classmethod ``from_state(state)`` rebuilds a cache
from it (there is no ``meta_state``).

The module knows mlx-lm's cache protocol and the card's segments
(:class:`~qkvshare_mlx.formats.Segment`); it knows nothing about card files,
how a card was made, or which cache :func:`~qkvshare_mlx.inject.inject` picks.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask

from . import attention
from .errors import CardFormatError
from .formats import Encoded, Segment
from .quant.mlx_backend import MLX, decode, unrotate
from .rotation import check_rotation

# ----------------------------------------------------------------------------
# A KVCache whose rows are still being decoded on a background thread.


class _Arriving:
    """``keys`` / ``values`` of a :class:`StreamedKVCache` whose rows are pending.

    A non-data descriptor: the first read waits for the layer's decode, which
    stores the arrays in the instance dict under the same name. From then on
    the instance dict shadows the descriptor, so reads are plain attribute
    reads and generation pays nothing for the streaming.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        obj._arrive()
        return obj.__dict__[self.name]


class StreamedKVCache(KVCache):
    """An mlx-lm ``KVCache`` whose keys/values arrive from a background decode.

    ``offset`` is known at once (the mask and RoPE need it); the first read of
    ``keys``, ``values`` or ``state`` waits for this layer's decode, after
    which the cache holds exactly what a ``KVCache`` holds and runs
    ``KVCache``'s code on plain attributes. ``update_and_fetch`` on a layer
    not yet decoded first evaluates the incoming keys/values, so the model's
    earlier layers run while this one decodes. Setting ``state`` before the
    decode lands replaces the decoded rows (and no longer waits for them).

    ``save_prompt_cache`` records the class name ``StreamedKVCache`` and
    KVCache's state (keys, values, offset); :meth:`from_state` returns a plain
    ``KVCache``, since an arrived streamed cache is a KVCache's data. Such
    files load with :func:`load_prompt_cache` (mlx-lm's own loader knows only
    its own class names).

    Args:
        future: resolves to the layer's evaluated (B, H, capacity, D) float32
            keys and values (see :func:`~qkvshare_mlx.quant.fastpath.stream_layers`).
        offset: the number of cached tokens.
        dtype: the dtype the receiver wants (cast on arrival when not float32).
    """

    keys = _Arriving()
    values = _Arriving()
    _future = None  # the pending decode; None once arrived

    def __init__(self, future, offset: int, dtype=mx.float32):
        # Not KVCache.__init__: its `self.keys = None` would shadow the
        # descriptors before the rows arrive.
        self._future, self._dtype, self.offset = future, dtype, offset

    def _arrive(self) -> None:
        future = self._future
        if future is None:
            return
        keys, values = future.result()
        if self._dtype != mx.float32:
            keys, values = keys.astype(self._dtype), values.astype(self._dtype)
        self.__dict__.setdefault("keys", keys)  # unless written meanwhile
        self.__dict__.setdefault("values", values)
        del self._future, self._dtype

    @property
    def state(self):
        return KVCache.state.fget(self)

    @state.setter
    def state(self, v):
        self.__dict__.pop("_future", None)  # the new state replaces the rows
        self.__dict__.pop("_dtype", None)
        KVCache.state.fset(self, v)

    def update_and_fetch(self, keys, values):
        if self._future is not None:
            if not self._future.done():
                mx.eval(keys, values)  # the layers before this one, while it decodes
            self._arrive()
        return super().update_and_fetch(keys, values)

    @classmethod
    def from_state(cls, state) -> KVCache:
        """A plain ``KVCache`` holding ``state`` (keys, values, offset)."""
        return KVCache.from_state(state)


# ----------------------------------------------------------------------------
# A cache that keeps a card's mixed-precision segments quantized in memory.


def _to_mx(seg: Segment) -> Segment:
    return seg.map_arrays(mx.array)


def _encoded_state(enc: Encoded) -> dict:
    dim = {} if enc.dim is None else {"dim": int(enc.dim)}  # padded rows
    return {"layout": enc.layout, "group": int(enc.group), **dim, **enc.arrays()}


def _encoded_from_state(d, where: str) -> Encoded:
    if not isinstance(d, dict) or "layout" not in d:
        raise CardFormatError(f"{where}: expected a dict with a layout, got {d!r}")
    layout = d["layout"]
    names = ("data",) if layout == "float" else ("codes", "scales", "biases")
    missing = [n for n in names if not isinstance(d.get(n), mx.array)]
    if missing:
        raise CardFormatError(
            f"{where}: layout {layout!r} needs arrays {list(names)}, missing {missing}"
        )
    dim = d.get("dim")
    return Encoded(
        layout,
        int(d.get("group", 0)),
        **{n: d[n] for n in names},
        dim=None if dim is None else int(dim),
    )


class MixedQuantizedKVCache(_BaseCache):
    """One layer of a card, kept quantized, plus a float tail for new tokens.

    The card's segments (any mix of widths, layouts and group sizes) are held
    quantized, regrouped by format (:func:`.attention.merge_formats`; on a
    CPU, 3-, 5- and 6-bit codes widened to 4 or 8 bits,
    :func:`.attention.widen`: the same values bit for bit), and mlx-lm's
    attention runs on their codes
    (:meth:`attend`, :mod:`qkvshare_mlx.attention`). ``update_and_fetch``
    returns the card's K/V decoded lazily (in the dtype of the incoming keys,
    in token order, followed by the receiver's own tokens): evaluated only by
    a caller that reads them instead. New tokens are kept in a float tail buffer
    that grows in steps of 64 tokens (the receiver's continuation is short next to
    the handed-over context, and keeping it exact avoids compounding error);
    they are not re-quantized.

    ``offset`` is the RoPE position of the next token: the card's offset plus
    the tokens held. ``trim`` drops tail tokens first, then hides card tokens
    (their storage stays; ``nbytes`` counts what is held).

    ``state`` is ``(segments, tail_keys, tail_values, n_card, n_visible,
    n_tail, start, rotation)``: per segment a dict ``{"bits", "index",
    "keys", "values"}`` (and ``"vbits"`` for a split width) whose
    keys/values are ``{"layout", "group", <the Encoded's arrays>}`` (and
    ``"dim"`` for padded rows); the tail holds the ``n_tail`` tokens (None
    when there are none). mlx-lm's
    ``save_prompt_cache`` stores the scalars and strings itself;
    :meth:`from_state` (and :func:`load_prompt_cache`) rebuilds the cache,
    card tokens hidden by ``trim`` included.

    Args:
        segments: one layer's segments (numpy or MLX arrays).
        n_tokens: tokens the segments cover.
        start: RoPE position of the card's first token (the card's offset).
        rotation: the card's ``QuantConfig.rotation``, undone on decoding.
    """

    step = 64  # tail growth: small, so the tail never dwarfs a compressed card
    _lazy = None  # ((dtype, n_visible), the decoded card K/V graph), see _card_kv
    _fetched = None  # id of the keys the last update_and_fetch returned
    _bypassed = False  # this model's attention does not reach the hook

    def __init__(
        self,
        segments: list[Segment] | None = None,
        n_tokens: int = 0,
        *,
        start: int = 0,
        rotation: str = "none",
    ):
        check_rotation(rotation)
        self.rotation = rotation
        self._set_segments(list(segments or []))
        self.n_card = int(n_tokens)
        self.n_visible = self.n_card
        self.start = int(start)
        self.tail_keys = self.tail_values = None
        self.n_tail = 0
        self.offset = self.start + self.n_card
        self._set_order()

    def _set_segments(self, segments: list[Segment]) -> None:
        if mx.default_device() == mx.cpu:
            segments = [attention.widen(s) for s in segments]
        self.segments, self._value_blocks = attention.merge_formats(
            [_to_mx(s) for s in segments]
        )
        # evaluated here: the blocks' views then share their buffers, and
        # the card's pieces they were made from are released
        mx.eval(
            [
                a
                for s in self.segments
                for e in (s.keys, s.values)
                for a in e.arrays().values()
            ]
        )

    def _set_order(self):
        index = (
            np.concatenate([s.index for s in self.segments])
            if self.segments
            else (np.zeros(0, np.int32))
        )
        if index.shape[0] != self.n_card:
            raise CardFormatError(
                f"segments cover {index.shape[0]} tokens, expected {self.n_card}"
            )
        identity = np.array_equal(index, np.arange(self.n_card))
        self._order = (
            None
            if identity
            else mx.array(np.argsort(index, kind="stable").astype(np.int32))
        )

    # ---- the mlx-lm cache protocol -------------------------------------------

    def _card_kv(self, dtype, *, keep: bool = True):
        """The card's (B, H, n_visible, D) K/V, decoded lazily (None if empty).

        While mlx-lm's attention runs on the codes, this graph is never
        evaluated and is the same at every step, so it is built once and
        kept (``keep``; building it cost ~1 ms a layer a step in Python). It
        is dropped as soon as anyone attends on it instead, so no decoded
        copy of the card stays resident.
        """
        if self.n_visible == 0:
            return None
        key = (dtype, self.n_visible)
        if keep and self._lazy is not None and self._lazy[0] == key:
            return self._lazy[1]
        kv = self._decode_card(dtype)
        if keep and self.native and not self._bypassed:
            self._lazy = (key, kv)
        return kv

    def _decode_card(self, dtype) -> tuple[mx.array, mx.array]:
        out_dtype, rotated = dtype, self.rotation != "none"
        if rotated:  # decode and un-rotate in float32
            dtype = mx.float32
        ks = [decode(s.keys, s.bits, dtype) for s in self.segments]
        vs = [decode(s.values, s.vbits, dtype) for s in self.segments]
        k = ks[0] if len(ks) == 1 else mx.concatenate(ks, axis=2)
        v = vs[0] if len(vs) == 1 else mx.concatenate(vs, axis=2)
        if rotated:
            k = unrotate(k, self.rotation, out_dtype)
            v = unrotate(v, self.rotation, out_dtype)
        if self._order is not None:
            k, v = mx.take(k, self._order, axis=2), mx.take(v, self._order, axis=2)
        if self.n_visible < self.n_card:
            k, v = k[..., : self.n_visible, :], v[..., : self.n_visible, :]
        return k, v

    def _grow_tail(self, keys, values):
        n_new = keys.shape[2]
        if (
            self.tail_keys is not None
            and self.n_tail + n_new <= self.tail_keys.shape[2]
        ):
            return
        B, H, _, dk = keys.shape
        n = (self.step + n_new - 1) // self.step * self.step
        new_k = mx.zeros((B, H, n, dk), keys.dtype)
        new_v = mx.zeros((B, H, n, values.shape[3]), values.dtype)
        if self.tail_keys is None:
            self.tail_keys, self.tail_values = new_k, new_v
        else:
            old_k = self.tail_keys[..., : self.n_tail, :]
            old_v = self.tail_values[..., : self.n_tail, :]
            self.tail_keys = mx.concatenate([old_k, new_k], axis=2)
            self.tail_values = mx.concatenate([old_v, new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append (B, H, n, D) new keys/values; return all (B, H, T, D) K/V.

        The returned K/V are lazy: where mlx-lm's attention reaches
        :meth:`attend` (:mod:`qkvshare_mlx.attention`), it runs on the
        card's codes and they are never decoded.
        """
        if self._fetched is not None:
            # the last K/V returned were not attended on the codes: this
            # model's attention does not reach the hook; stop keeping them
            self._bypassed, self._lazy = True, None
        self._grow_tail(keys, values)
        prev = self.n_tail
        self.n_tail += keys.shape[2]
        self.tail_keys[..., prev : self.n_tail, :] = keys
        self.tail_values[..., prev : self.n_tail, :] = values
        self.offset = self.start + self.n_visible + self.n_tail
        out = self._fetch(keys.dtype)
        if self.native:
            # by id only: holding the array would keep it, once some caller
            # evaluates it, decoded in memory until the next forward
            attention.register(out[0], self)
            self._fetched = id(out[0])
        return out

    # ---- attention on the codes ----------------------------------------------

    @property
    def native(self) -> bool:
        """Whether mlx-lm's attention may run on this cache's codes (the
        hook of :mod:`qkvshare_mlx.attention` is installed); set False to
        always attend on decoded K/V."""
        return getattr(self, "_native", True) and attention.install()

    @native.setter
    def native(self, on: bool) -> None:
        self._native = bool(on)

    @property
    def bits(self):
        # mlx-lm's attention sends caches with ``bits`` to its quantized
        # attention, where the hook hands them to :meth:`attend`
        if not self.native:
            raise AttributeError("bits")
        return 0

    @property
    def group_size(self):
        if not self.native:
            raise AttributeError("group_size")
        return 0

    def attend(self, queries: mx.array, keys: mx.array, scale: float, mask):
        """(B, H_q, L, D) attention output on the codes, for the ``keys``
        this cache's last ``update_and_fetch`` returned; None where it
        cannot or should not (other keys, hidden card tokens, a mask over
        reordered tokens, a CPU prefill: :func:`attention.on_codes`), and
        the caller attends on the decoded K/V instead."""
        if self._fetched != id(keys) or not self.segments:
            return None
        self._fetched = None
        if (
            not attention.on_codes(queries.shape[2])
            or self.n_visible < self.n_card
            or (
                mask is not None
                and not isinstance(mask, str)
                and self._order is not None
            )
        ):
            self._lazy = None  # the caller attends on (evaluates) the decoded K/V
            return None
        tk = tv = None
        if self.n_tail:
            tk = self.tail_keys[..., : self.n_tail, :]
            tv = self.tail_values[..., : self.n_tail, :]
        rotate = unrot = None
        if self.rotation != "none":
            rotate = functools.partial(MLX.rotate, kind=self.rotation)
            unrot = functools.partial(unrotate, rotation=self.rotation)
        return attention.mixed_attention(
            queries,
            self.segments,
            tk,
            tv,
            scale=scale,
            mask=mask,
            rotate=rotate,
            unrotate=unrot,
            value_blocks=self._value_blocks,
        )

    def _fetch(self, dtype, *, keep: bool = True):
        card = self._card_kv(dtype, keep=keep)
        if self.n_tail == 0:
            return card
        tk = self.tail_keys[..., : self.n_tail, :].astype(dtype)
        tv = self.tail_values[..., : self.n_tail, :].astype(dtype)
        if card is None:
            return tk, tv
        return (
            mx.concatenate([card[0], tk], axis=2),
            mx.concatenate([card[1], tv], axis=2),
        )

    def dequantized(self, dtype=None) -> tuple[mx.array, mx.array]:
        """All held tokens as (B, H, T, D) keys and values."""
        if self.size() == 0:
            raise CardFormatError("the cache holds no tokens")
        if dtype is None:
            dtype = self.tail_keys.dtype if self.tail_keys is not None else mx.float32
        return self._fetch(dtype, keep=False)

    def size(self) -> int:
        return self.n_visible + self.n_tail

    def empty(self) -> bool:
        return self.size() == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.size(), int(n))
        from_tail = min(n, self.n_tail)
        self.n_tail -= from_tail
        self.n_visible -= n - from_tail
        self.offset = self.start + self.n_visible + self.n_tail
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        # Masks index stored tokens, not RoPE positions (they differ by start).
        return create_attention_mask(
            N, offset=self.size(), return_array=return_array, window_size=window_size
        )

    @property
    def nbytes(self) -> int:
        total = sum(
            int(a.nbytes)
            for s in self.segments
            for e in (s.keys, s.values)
            for a in e.arrays().values()
        )
        total += sum(int(s.index.nbytes) for s in self.segments)
        if self.tail_keys is not None:
            total += self.tail_keys.nbytes + self.tail_values.nbytes
        return total

    @property
    def state(self):
        segments = [
            {
                "bits": int(s.bits),
                **({} if s.value_bits is None else {"vbits": int(s.value_bits)}),
                "index": mx.array(s.index),
                "keys": _encoded_state(s.keys),
                "values": _encoded_state(s.values),
            }
            for s in self.segments
        ]
        tail_keys = tail_values = None
        if self.n_tail:
            tail_keys = self.tail_keys[..., : self.n_tail, :]
            tail_values = self.tail_values[..., : self.n_tail, :]
        return (
            segments,
            tail_keys,
            tail_values,
            self.n_card,
            self.n_visible,
            self.n_tail,
            self.start,
            self.rotation,
        )

    @state.setter
    def state(self, v):
        if not isinstance(v, (list, tuple)) or len(v) != 8:
            raise CardFormatError(
                "MixedQuantizedKVCache state: expected the 8 fields (segments, "
                "tail_keys, tail_values, n_card, n_visible, n_tail, start, "
                f"rotation), got {type(v).__name__} {v!r:.80}"
            )
        segments, tail_keys, tail_values, n_card, n_visible, n_tail, start, rot = v
        check_rotation(rot)
        # save_prompt_cache drops an empty list; load_prompt_cache gives {} back
        segs = []
        for i, d in enumerate(segments or []):
            where = f"state segment {i}"
            if not isinstance(d, dict) or not isinstance(d.get("index"), mx.array):
                raise CardFormatError(f"{where}: expected bits, index, keys, values")
            segs.append(
                Segment(
                    int(d["bits"]),
                    np.array(d["index"], dtype=np.int32),
                    _encoded_from_state(d.get("keys"), where + " keys"),
                    _encoded_from_state(d.get("values"), where + " values"),
                    value_bits=None if d.get("vbits") is None else int(d["vbits"]),
                )
            )
        held = 0 if tail_keys is None else tail_keys.shape[2]
        if held < n_tail or not 0 <= n_visible <= n_card:
            raise CardFormatError(
                f"MixedQuantizedKVCache state: expected n_tail <= {held} (tail "
                f"tokens) and 0 <= n_visible <= n_card, got n_tail={n_tail}, "
                f"n_visible={n_visible}, n_card={n_card}"
            )
        self.rotation = rot
        self._set_segments(segs)
        self._lazy = self._fetched = None
        self.tail_keys, self.tail_values = tail_keys, tail_values
        self.n_card, self.n_visible = int(n_card), int(n_visible)
        self.n_tail, self.start = int(n_tail), int(start)
        self.offset = self.start + self.n_visible + self.n_tail
        self._set_order()


# ----------------------------------------------------------------------------
# Loading prompt-cache files


_CLASSES = {c.__name__: c for c in (StreamedKVCache, MixedQuantizedKVCache)}


def _cache_class(name: str, layer: int):
    cls = _CLASSES.get(name) or getattr(mlx_cache, name, None)
    if isinstance(cls, type) and issubclass(cls, _BaseCache):
        return cls
    known = sorted(
        {n for n, c in vars(mlx_cache).items() if isinstance(c, type)}
        & {c.__name__ for c in _BaseCache.__subclasses__()}
        | set(_CLASSES)
    )
    raise CardFormatError(
        f"layer {layer}: cache class must be one of {known} but got {name!r}"
    )


def load_prompt_cache(path, return_metadata: bool = False):
    """Load a prompt-cache file written by mlx-lm's ``save_prompt_cache``.

    Like ``mlx_lm.models.cache.load_prompt_cache``, which rebuilds each layer
    by its class name from mlx-lm's own module only; this one also knows
    :class:`StreamedKVCache` (loaded as a plain ``KVCache``) and
    :class:`MixedQuantizedKVCache`.

    Args:
        path: the ``.safetensors`` file.
        return_metadata: also return the file's string metadata.

    Returns:
        The list of caches, and the metadata dict if ``return_metadata``.

    Raises:
        CardFormatError: a class name neither mlx-lm nor this module defines,
            or a state its class cannot be rebuilt from.
    """
    # The scalar decoding below mirrors mlx-lm 0.32's load_prompt_cache.
    arrays, cache_metadata = mx.load(str(path), return_metadata=True)
    metadata, classes, scalars = tree_unflatten(list(cache_metadata.items()))
    for pos, kind in scalars[1:]:
        array = arrays[pos]
        if kind == "scalar":
            arrays[pos] = array.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in array.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise CardFormatError(
                f"{pos}: scalar kind must be one of ['scalar', 'string', 'none'] "
                f"but got {kind!r}"
            )
    states = tree_unflatten(list(arrays.items())) if arrays else []
    cache = [
        _cache_class(name, i).from_state(state)
        for i, (name, state) in enumerate(zip(classes, states))
    ]
    if return_metadata:
        return cache, metadata
    return cache
