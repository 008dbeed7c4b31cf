"""The receiver's side of a handoff: a CacheCard becomes mlx-lm caches.

:func:`inject` returns a list with one cache per layer that
``mlx_lm.generate`` / ``stream_generate`` / ``generate_step`` accept as
``prompt_cache`` and ``model(x, cache=...)`` accepts as ``cache``:

- ``mode="dequantize"``: a plain ``mlx_lm.models.cache.KVCache`` per layer,
  keys and values decoded once into the model dtype. Fastest decoding; the
  cache takes full float memory.
- ``mode="stream"``: the same ``KVCache`` contents, decoded layer by layer on
  a background thread while the receiver's forward runs (each layer waits
  for its own rows on first use, then is a plain ``KVCache``). Same result
  as ``dequantize``, bit for bit; the decode overlaps the suffix prefill.
- ``mode="compressed"``: the card stays quantized in memory. A card whose
  every layer is one uniform token-layout segment (one width, equal K/V group
  sizes, a width mlx-lm supports) becomes mlx-lm's own ``QuantizedKVCache``
  (attention runs on the quantized codes). Any other card (mixed widths,
  per-channel keys, float tokens) becomes a :class:`MixedQuantizedKVCache`,
  which keeps the card's segments bit for bit and returns dequantized K/V
  from ``update_and_fetch``.

:func:`align` matches a receiver's prompt against the card's tokens and trims
the injected cache to what can be reused.

The module knows mlx-lm's cache protocol and the card's segments; it knows
nothing about how the card was made.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    _BaseCache,
    create_attention_mask,
    trim_prompt_cache,
)

from .capture import fingerprint, model_args_config
from .card import CacheCard, fingerprint_mismatches
from .errors import (
    CardFormatError,
    ConfigError,
    ModelMismatchError,
    PromptMismatchError,
)
from .formats import FLOAT_BITS, Encoded, QuantizedKV, Segment
from .quantizer import decode, dequantize_layers, stream_layers, unrotate
from .rotation import check_rotation

MODES = ("dequantize", "stream", "compressed")
POLICIES = ("prefix", "strict")
QUANTIZED_KV_BITS = (2, 3, 4, 5, 6, 8)  # widths mlx-lm's QuantizedKVCache runs
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# ----------------------------------------------------------------------------
# A KVCache whose rows are still being decoded on a background thread.


def _arriving(name: str) -> property:
    """A property that waits for the layer's decode, then reads/writes ``name``
    on the plain ``KVCache`` the object has become."""

    def get(self):
        self._arrive()
        return getattr(self, name)

    def set(self, v):
        self._arrive()
        setattr(self, name, v)

    return property(get, set)


class StreamedKVCache(KVCache):
    """An mlx-lm ``KVCache`` whose keys/values arrive from a background decode.

    ``offset`` is known at once (the mask and RoPE need it); the first read of
    ``keys``, ``values`` or ``state`` waits for this layer's decode, after
    which the object *is* a plain ``KVCache`` (its class is switched back, so
    mlx-lm's ``save_prompt_cache`` records ``KVCache``). ``update_and_fetch``
    on a layer not yet decoded first evaluates the forward pass so far, so
    the model's earlier layers run while this one decodes.

    Args:
        future: resolves to the layer's evaluated (B, H, capacity, D) float32
            keys and values (see :func:`~qkvshare_mlx.quantizer.stream_layers`).
        offset: the number of cached tokens.
        dtype: the dtype the receiver wants (cast on arrival when not float32).
    """

    def __init__(self, future, offset: int, dtype=mx.float32):
        self.__dict__.update(_future=future, _dtype=dtype, offset=offset)

    def _arrive(self) -> None:
        keys, values = self.__dict__.pop("_future").result()
        if self._dtype != mx.float32:
            keys, values = keys.astype(self._dtype), values.astype(self._dtype)
        del self.__dict__["_dtype"]
        self.__class__ = KVCache
        self.keys, self.values = keys, values

    keys = _arriving("keys")
    values = _arriving("values")

    def update_and_fetch(self, keys, values):
        if not self._future.done():
            mx.eval(keys, values)  # the layers before this one, while it decodes
        self._arrive()
        return self.update_and_fetch(keys, values)


# ----------------------------------------------------------------------------
# A cache that keeps a card's mixed-precision segments quantized in memory.


def _to_mx(seg: Segment) -> Segment:
    return seg.map_arrays(mx.array)


class MixedQuantizedKVCache(_BaseCache):
    """One layer of a card, kept quantized, plus a float tail for new tokens.

    The card's segments (any mix of widths, layouts and group sizes) are held
    as they are in the card; ``update_and_fetch`` decodes them (in the dtype
    of the incoming keys) and returns them, in token order, followed by the
    receiver's own tokens. Those new tokens are kept in a float tail buffer
    that grows in steps of 64 tokens (the receiver's continuation is short next to
    the handed-over context, and keeping it exact avoids compounding error);
    they are not re-quantized.

    ``offset`` is the RoPE position of the next token: the card's offset plus
    the tokens held. ``trim`` drops tail tokens first, then hides card tokens
    (their storage stays; ``nbytes`` counts what is held).

    Args:
        segments: one layer's segments (numpy or MLX arrays).
        n_tokens: tokens the segments cover.
        start: RoPE position of the card's first token (the card's offset).
        rotation: the card's ``QuantConfig.rotation``, undone on decoding.
    """

    step = 64  # tail growth: small, so the tail never dwarfs a compressed card

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
        self.segments = [_to_mx(s) for s in segments or []]
        self.n_card = int(n_tokens)
        self.n_visible = self.n_card
        self.start = int(start)
        self.tail_keys = self.tail_values = None
        self.n_tail = 0
        self.offset = self.start + self.n_card
        self._set_order()

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

    def _card_kv(self, dtype) -> tuple[mx.array, mx.array] | None:
        if self.n_visible == 0:
            return None
        out_dtype, rotated = dtype, self.rotation != "none"
        if rotated:  # decode and un-rotate in float32
            dtype = mx.float32
        ks = [decode(s.keys, s.bits, dtype) for s in self.segments]
        vs = [decode(s.values, s.bits, dtype) for s in self.segments]
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
        """Append (B, H, n, D) new keys/values; return all (B, H, T, D) K/V."""
        self._grow_tail(keys, values)
        prev = self.n_tail
        self.n_tail += keys.shape[2]
        self.tail_keys[..., prev : self.n_tail, :] = keys
        self.tail_values[..., prev : self.n_tail, :] = values
        self.offset = self.start + self.n_visible + self.n_tail
        return self._fetch(keys.dtype)

    def _fetch(self, dtype):
        card = self._card_kv(dtype)
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
        return self._fetch(dtype)

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
        arrays = [mx.array(s.index) for s in self.segments]
        arrays += [
            a
            for s in self.segments
            for e in (s.keys, s.values)
            for a in e.arrays().values()
        ]
        if self.n_tail:
            arrays += [
                self.tail_keys[..., : self.n_tail, :],
                self.tail_values[..., : self.n_tail, :],
            ]
        return arrays

    @state.setter
    def state(self, arrays):
        meta = self._meta
        n_seg = len(meta["segments"])
        it = iter(arrays[n_seg:])
        self.segments = []
        for si, sm in enumerate(meta["segments"]):
            encs = []
            for kv in ("k", "v"):
                names = (
                    ["data"]
                    if sm[kv]["layout"] == "float"
                    else ["codes", "scales", "biases"]
                )  # Encoded.arrays() order
                got = {name: next(it) for name in names}
                encs.append(Encoded(sm[kv]["layout"], sm[kv]["group"], **got))
            index = np.array(arrays[si], dtype=np.int32)
            self.segments.append(Segment(sm["bits"], index, *encs))
        rest = list(it)
        self.tail_keys, self.tail_values = (rest + [None, None])[:2]
        self.n_card, self.n_visible = meta["n_card"], meta["n_visible"]
        self.n_tail, self.start = meta["n_tail"], meta["start"]
        self.rotation = meta.get("rotation", "none")
        check_rotation(self.rotation)
        self.offset = self.start + self.n_visible + self.n_tail
        self._set_order()

    @property
    def meta_state(self):
        segs = [
            {
                "bits": s.bits,
                "k": {"layout": s.keys.layout, "group": s.keys.group},
                "v": {"layout": s.values.layout, "group": s.values.group},
            }
            for s in self.segments
        ]
        meta = {
            "segments": segs,
            "n_card": self.n_card,
            "n_visible": self.n_visible,
            "n_tail": self.n_tail,
            "start": self.start,
        }
        if self.rotation != "none":
            meta["rotation"] = self.rotation
        return (json.dumps(meta),)

    @meta_state.setter
    def meta_state(self, v):
        self._meta = json.loads(v[0])

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj


# ----------------------------------------------------------------------------
# Injection


def model_dtype(model) -> mx.Dtype:
    """The floating-point dtype of a model's parameters (float32 if none)."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def _model_shape(model) -> dict:
    """n_layers, n_kv_heads, head_dim read from the model's modules."""
    out = {}
    layers = getattr(model, "layers", None)
    if layers is None:
        return out
    out["n_layers"] = len(layers)
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    if attn is not None and hasattr(attn, "n_kv_heads"):
        out["n_kv_heads"] = attn.n_kv_heads
        head_dim = getattr(attn, "head_dim", None)
        k_proj = getattr(attn, "k_proj", None)
        if head_dim is None and isinstance(getattr(k_proj, "weight", None), mx.array):
            if k_proj.weight.dtype != mx.uint32:  # quantized weights are packed
                head_dim = k_proj.weight.shape[0] // attn.n_kv_heads
        if head_dim is not None:
            out["head_dim"] = head_dim
    return out


def check_fits(card_cache: dict, card_model: dict | None, model, expect=None) -> None:
    """Raise ModelMismatchError if a card cannot be used with ``model``.

    Compares the card's shape summary with the model's own modules (layers,
    KV heads, head_dim), the card's fingerprint with one built from the
    model's config (no tokenizer needed), and with ``expect`` if given.
    """
    shape = _model_shape(model)
    want = {
        "n_layers": card_cache["n_layers"],
        "n_kv_heads": card_cache["n_kv_heads"],
        "head_dim": card_cache["head_dim_k"],
    }
    bad = [
        f"{k}: card has {want[k]!r}, model has {v!r}"
        for k, v in shape.items()
        if want[k] != v
    ]
    if card_model is not None:
        if model_args_config(model):
            fp = fingerprint(model)
            # Fields the model's args do not spell are taken on trust.
            fp = {
                k: (card_model.get(k) if v is None and k != "rope_scaling" else v)
                for k, v in fp.items()
            }
            bad += [
                m
                for m in fingerprint_mismatches(card_model, fp)
                if m.split(":")[0] not in shape
            ]
        if expect is not None:
            bad += [
                m for m in fingerprint_mismatches(card_model, expect) if m not in bad
            ]
    if bad:
        raise ModelMismatchError("card was made for another model: " + "; ".join(bad))


def _uniform_token_format(qkv: QuantizedKV) -> tuple[int, int] | None:
    """(bits, group) if every layer is one identical token-layout segment."""
    first = None
    for layer in qkv.layers:
        if len(layer) != 1:
            return None
        s = layer[0]
        if (
            s.bits == FLOAT_BITS
            or s.keys.layout != "token"
            or s.values.layout != "token"
            or s.keys.group != s.values.group
            or not np.array_equal(np.asarray(s.index), np.arange(qkv.n_tokens))
        ):
            return None
        fmt = (s.bits, s.keys.group)
        if first is not None and fmt != first:
            return None
        first = fmt
    return first if first and first[0] in QUANTIZED_KV_BITS else None


def _quantized_kv_cache(segments, n_tokens, bits, group, dtype) -> QuantizedKVCache:
    s = segments[0]
    c = QuantizedKVCache(group_size=group, bits=bits)
    # mlx-lm's quantized attention wants scales and biases in the model dtype.
    c.keys = tuple(
        mx.array(a).astype(dtype) if i else mx.array(a)
        for i, a in enumerate((s.keys.codes, s.keys.scales, s.keys.biases))
    )
    c.values = tuple(
        mx.array(a).astype(dtype) if i else mx.array(a)
        for i, a in enumerate((s.values.codes, s.values.scales, s.values.biases))
    )
    c.offset = n_tokens
    return c


def inject(
    card_or_qkv,
    model=None,
    *,
    mode: str = "dequantize",
    dtype=None,
    expect: dict | None = None,
) -> list:
    """Turn a card into an mlx-lm prompt cache.

    Args:
        card_or_qkv: a :class:`~qkvshare_mlx.card.CacheCard` or a
            :class:`~qkvshare_mlx.formats.QuantizedKV` (offset 0).
        model: the receiving mlx-lm model: the card is checked against it
            (ModelMismatchError) and caches take its dtype.
        mode: ``"dequantize"`` (``KVCache``), ``"stream"`` (the same, decoded
            on a background thread while the caller's forward runs:
            :class:`StreamedKVCache`) or ``"compressed"``
            (``QuantizedKVCache`` or :class:`MixedQuantizedKVCache`).
        dtype: dtype of the decoded keys/values (an ``mx.Dtype`` or its name);
            default: the model's, else the card's, else float32.
        expect: a full fingerprint (e.g. with the tokenizer hash, see
            :func:`~qkvshare_mlx.capture.fingerprint`) to check too.

    Returns:
        One cache per layer; its ``offset`` is the card's offset plus its
        token count, so RoPE continues where the sender stopped.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)} but got {mode!r}")
    if isinstance(card_or_qkv, CacheCard):
        card = card_or_qkv
        qkv, offset, card_model, card_dtype = (
            card.to_quantized(),
            card.offset,
            card.model,
            card.cache.get("dtype"),
        )
        cache_meta = card.cache
    elif isinstance(card_or_qkv, QuantizedKV):
        qkv, offset, card_model, card_dtype = card_or_qkv, 0, None, None
        B, H, dk, dv = qkv.shape
        cache_meta = {"n_layers": len(qkv.layers), "n_kv_heads": H, "head_dim_k": dk}
    else:
        raise ConfigError(
            f"expected a CacheCard or QuantizedKV, got {type(card_or_qkv).__name__}"
        )
    if model is not None:
        check_fits(cache_meta, card_model, model, expect)
    elif expect is not None and card_model is not None:
        card.check_model(expect)
    dtype = _resolve_dtype(dtype, model, card_dtype)
    T = qkv.n_tokens

    rotation = qkv.config.rotation
    if mode == "compressed":
        uniform = _uniform_token_format(qkv)
        # mlx-lm's quantized attention reads the codes as they are: no rotation
        if uniform is not None and offset == 0 and rotation == "none":
            return [
                _quantized_kv_cache(layer, T, *uniform, dtype) for layer in qkv.layers
            ]
        return [
            MixedQuantizedKVCache(layer, T, start=offset, rotation=rotation)
            for layer in qkv.layers
        ]

    if offset != 0:
        raise ConfigError(
            f"card offset {offset}: mode {mode!r} (mlx-lm KVCache) needs a card "
            "starting at position 0; use mode='compressed'"
        )
    # Room for the receiver's next tokens (KVCache's step), made in the same
    # pass that orders the tokens: the first update then writes in place
    # instead of copying the whole cache into a larger buffer.
    capacity = (T // KVCache.step + 1) * KVCache.step
    if mode == "stream":
        futures = stream_layers(qkv.layers, T, capacity=capacity, rotation=rotation)
        return [StreamedKVCache(f, T, dtype) for f in futures]
    caches = []
    for k, v in dequantize_layers(
        qkv.layers, T, dtype, capacity=capacity, rotation=rotation
    ):
        c = KVCache()
        c.keys, c.values, c.offset = k, v, T
        caches.append(c)
    return caches


def _resolve_dtype(dtype, model, card_dtype):
    if dtype is None:
        if model is not None:
            return model_dtype(model)
        dtype = card_dtype or "float32"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {list(_DTYPES)} but got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


# ----------------------------------------------------------------------------
# Prompt alignment


def align(
    card, prompt_tokens, *, policy: str = "prefix", cache: list | None = None
) -> tuple[int, list[int]]:
    """How much of a card a receiver's prompt can reuse.

    The prompt must begin with the card's tokens. At least the prompt's last
    token is always left to feed, so the model produces logits for it: a
    prompt equal to the card's tokens reuses all but the last one.

    Args:
        card: a :class:`~qkvshare_mlx.card.CacheCard` (or anything with
            ``tokens``).
        prompt_tokens: the receiver's full prompt ids.
        policy: ``"strict"``: the prompt must start with every card token
            (PromptMismatchError names the first differing position);
            ``"prefix"``: reuse the longest common prefix.
        cache: the injected cache; trimmed in place (mlx-lm ``trim``) to
            the reused tokens.

    Returns:
        ``(n_reuse, remaining_tokens)``: card tokens reused and the prompt
        tokens still to prefill (never empty).
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {list(POLICIES)} but got {policy!r}")
    ref = np.asarray(card.tokens).reshape(-1)
    prompt = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise PromptMismatchError(
            "prompt_tokens: expected at least one token, got none"
        )
    n = min(len(ref), len(prompt))
    diff = np.nonzero(ref[:n] != prompt[:n])[0]
    common = int(diff[0]) if diff.size else n
    if policy == "strict" and common < len(ref):
        if common < len(prompt):
            raise PromptMismatchError(
                f"prompt_tokens[{common}]: expected the card's token "
                f"{int(ref[common])}, got {int(prompt[common])}"
            )
        raise PromptMismatchError(
            f"prompt_tokens: expected at least the card's {len(ref)} tokens, "
            f"got {len(prompt)}"
        )
    n_reuse = min(common, len(prompt) - 1)
    if cache is not None:
        c = cache[0]
        held = c.size() if isinstance(c, MixedQuantizedKVCache) else c.offset
        drop = held - n_reuse
        if drop > 0 and trim_prompt_cache(cache, drop) != drop:
            raise ConfigError(
                f"cache: could not trim {drop} tokens (cache type "
                f"{type(cache[0]).__name__})"
            )
    return n_reuse, prompt[n_reuse:].tolist()
