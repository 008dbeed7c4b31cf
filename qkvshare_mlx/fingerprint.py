"""Model fingerprints: which model a cache belongs to, and one policy to compare.

A fingerprint is a small JSON dict (the card's ``model`` entry) of the fields
that decide whether a KV cache fits a model: architecture, layer and head
counts, head size, RoPE, vocabulary, and hashes of the tokenizer and weights.
:func:`fingerprint` builds it from whatever the caller has: a ``config.json``
dict (Hugging Face or mlx-lm spelling, transformers 4 or 5), a model folder,
an mlx-lm model (its ``args`` and its attention modules) or a transformers
model (its ``config``). The same checkpoint gives the same fingerprint in
both runtimes.

:func:`mismatches` is the one comparison policy, used by the card reader, the
MLX injector and the transformers bridge alike; :func:`check` applies it and
says how the weights compared. For a model (not a config or folder) the
fingerprint includes the weights digest of :mod:`qkvshare_mlx.weights`,
computed once per model. This module imports neither MLX nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import weakref

from . import weights
from .errors import ConfigError, ModelMismatchError

FIELDS = (
    "model_type",
    "n_layers",
    "n_kv_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "vocab_size",
    "tokenizer_sha256",
    "weights_sha256",
    # written only where a model has them (absent: the default)
    "rope_local_theta",
    "partial_rotary_factor",
    "sliding_window",
    "layer_types",
    "attn_softcap",
)
# Identity hashes: compared only when both sides have one.
IDENTITY_FIELDS = ("tokenizer_sha256", "weights_sha256")
# Where None is a value ("no scaling"), not "unknown".
NULLABLE_FIELDS = (
    "rope_scaling",
    "rope_local_theta",
    "partial_rotary_factor",
    "sliding_window",
    "layer_types",
    "attn_softcap",
)
# Why a field can differ for one checkpoint, added to its mismatch message.
_WHY = {
    "sliding_window": " (one runtime applies a sliding window the other ignores: "
    "mlx-lm's Llama-family models only with layer_types)",
    "layer_types": " (transformers' Mistral classes window every layer whatever "
    "layer_types say; AutoModelForCausalLM loads a Mistral with layer_types as "
    "Ministral, which honours them)",
}
# transformers' name of an architecture -> the checkpoint's: AutoConfig reads
# a "mistral" config.json with layer_types as "ministral" (the same model,
# with per-layer windows), a name mlx-lm has no module for
_MODEL_TYPES = {"ministral": "mistral"}
# config keys a transformers model class keeps but does not run: Mistral
# windows every layer (only its Ministral twin reads layer_types)
_IGNORED_BY_TRANSFORMERS = {"mistral": ("layer_types",)}
# How the weights compared (returned by check, recorded in receivers' stats).
WEIGHTS_SAME = "same"
WEIGHTS_OTHER_ALLOWED = "other (allowed)"
WEIGHTS_CARD_UNKNOWN = "unchecked (card has no weights digest)"
WEIGHTS_MODEL_UNKNOWN = "unchecked (model has no weights digest)"


class UncheckedWeightsWarning(UserWarning):
    """A card without a weights digest (an older writer) was accepted."""


_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_hash(tokenizer) -> str | None:
    """SHA-256 of the tokenizer's vocabulary (token -> id), or None.

    Accepts an mlx-lm ``TokenizerWrapper`` or a transformers tokenizer.
    Memoized per tokenizer object and vocabulary size (hashing a 50K-entry
    vocabulary takes ~0.1 s; an agent chain fingerprints every hop).
    """
    tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        hit = _TOKENIZER_HASHES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and size is not None and hit[0] == size:
        return hit[1]
    vocab = get_vocab()
    blob = json.dumps(sorted(vocab.items()), separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    try:
        _TOKENIZER_HASHES[tokenizer] = (size, digest)
    except TypeError:
        pass
    return digest


def canonical_scaling(scaling) -> dict | None:
    """A RoPE scaling dict in one spelling: ``rope_type`` (``type`` in older
    configs; absent for ``default``) and its parameters, no nulls, no theta
    and no ``partial_rotary_factor`` (fields of their own); None if empty."""
    if not isinstance(scaling, dict):
        return None
    skip = ("rope_theta", "partial_rotary_factor", "type", "rope_type")
    out = {k: v for k, v in scaling.items() if v is not None and k not in skip}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind and kind != "default":
        out["rope_type"] = kind
    return dict(sorted(out.items())) or None


def _rope(config: dict) -> dict:
    """theta (full-attention layers), the local layers' theta, scaling and
    partial rotary factor, from flat, transformers 5 or per-layer-type keys."""
    params = config.get("rope_parameters") or {}
    per_type = bool(params) and all(isinstance(v, dict) for v in params.values())
    full = (params.get("full_attention") or {}) if per_type else params
    local = (params.get("sliding_attention") or {}) if per_type else {}
    theta = config.get("rope_theta")
    theta = full.get("rope_theta") if theta is None else theta
    local_theta = config.get("rope_local_base_freq")
    local_theta = local.get("rope_theta") if local_theta is None else local_theta
    scaling = config.get("rope_scaling")
    factor = config.get("partial_rotary_factor")
    factor = full.get("partial_rotary_factor") if factor is None else factor
    return {
        "rope_theta": float(theta) if theta is not None else None,
        "rope_scaling": canonical_scaling(full if scaling is None else scaling),
        "rope_local_theta": float(local_theta) if local_theta is not None else None,
        "partial_rotary_factor": (
            float(factor) if factor is not None and float(factor) != 1.0 else None
        ),
    }


def _window(config: dict, runtime: str) -> tuple[int | None, list | None]:
    """The sliding window the runtime applies, and which layers use it
    (None when all do): transformers applies a ``sliding_window`` to every
    layer unless ``layer_types`` (or Gemma's ``sliding_window_pattern``)
    says which, or ``use_sliding_window`` is false; mlx-lm's Llama-family
    modules apply it only with ``layer_types``."""
    window = config.get("sliding_window")
    types = config.get("layer_types")
    pattern, n = config.get("sliding_window_pattern"), config.get("num_hidden_layers")
    if types is None and pattern and n:
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n)
        ]
    if not window or config.get("use_sliding_window") is False:
        return None, None
    if types is None:
        return (None, None) if runtime == "mlx" else (int(window), None)
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None, None
    if all(sliding):
        return int(window), None
    return int(window), ["sliding" if s else "full" for s in sliding]


def layer_windows(fp: dict, n_layers: int | None = None) -> list[int | None]:
    """Per layer, the sliding window a fingerprint says the runtime applies
    (None: full attention), from its ``sliding_window`` and ``layer_types``.

    Args:
        fp: a fingerprint (a card's ``model`` entry or a model's own).
        n_layers: the layer count (default: ``fp["n_layers"]``).
    """
    n = fp.get("n_layers") if n_layers is None else n_layers
    window = fp.get("sliding_window")
    types = fp.get("layer_types")
    if not isinstance(n, int) or isinstance(n, bool):
        return []
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return [None] * n
    if types is None:
        return [window] * n
    if not isinstance(types, list) or len(types) != n:
        return [None] * n  # contradicts itself: no layer counts as sliding
    return [window if t == "sliding" else None for t in types]


def window_limit(window: int) -> int:
    """The most tokens a sliding-window cache of ``window`` tokens holds with
    every token still in it, in both runtimes (transformers keeps
    ``window - 1``, mlx-lm ``window``)."""
    return window - 1


def fingerprint_from_config(
    config: dict,
    tokenizer=None,
    *,
    weights_sha256: str | None = None,
    runtime: str = "hf",
) -> dict:
    """The fingerprint fields of a ``config.json`` dict.

    Args:
        config: a model's config as a dict (HF or mlx-lm spelling; RoPE
            values flat, nested in transformers 5's ``rope_parameters``, or
            per layer type).
        tokenizer: optional tokenizer with ``get_vocab()``.
        weights_sha256: optional digest of the weights.
        runtime: whose attention the config describes, ``"hf"`` (a
            checkpoint as transformers runs it) or ``"mlx"`` (an mlx-lm
            model's args): they differ in when a sliding window applies.

    Returns:
        The nine base fields, plus ``rope_local_theta``,
        ``partial_rotary_factor``, ``sliding_window``, ``layer_types`` and
        ``attn_softcap`` only where a model has them (absent means the
        default: written cards of plain models stay as they were).
        ``model_type`` is the checkpoint's (transformers' ``"ministral"``
        is the ``"mistral"`` it read).
    """
    n_heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is None and n_heads:
        head_dim = config["hidden_size"] // n_heads
    rope = _rope(config)
    window, layer_types = _window(config, runtime)
    model_type = config.get("model_type")
    fp = {
        "model_type": _MODEL_TYPES.get(model_type, model_type),
        "n_layers": config.get("num_hidden_layers"),
        "n_kv_heads": config.get("num_key_value_heads", n_heads),
        "head_dim": head_dim,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope["rope_scaling"],
        "vocab_size": config.get("vocab_size"),
        "tokenizer_sha256": tokenizer_hash(tokenizer)
        if tokenizer is not None
        else None,
        "weights_sha256": weights_sha256,
    }
    extra = {
        "rope_local_theta": rope["rope_local_theta"] if layer_types else None,
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "sliding_window": window,
        "layer_types": layer_types,
        "attn_softcap": config.get("attn_logit_softcapping"),
    }
    return {**fp, **{k: v for k, v in extra.items() if v is not None}}


def model_args_config(model) -> dict:
    """An mlx-lm model's ``args`` as a config dict (HF key spelling)."""
    args = getattr(model, "args", None)
    if args is None:
        return {}
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    return dict(vars(args))


def module_shape(model) -> dict:
    """n_layers, n_kv_heads and head_dim read from an mlx-lm model's modules.

    What the model really runs, whatever its args say; fields it does not
    expose are left out.
    """
    out = {}
    layers = getattr(model, "layers", None)
    if layers is None:
        return out
    out["n_layers"] = len(layers)
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    if attn is not None and hasattr(attn, "n_kv_heads"):
        out["n_kv_heads"] = attn.n_kv_heads
        head_dim = getattr(attn, "head_dim", None)
        weight = getattr(getattr(attn, "k_proj", None), "weight", None)
        shape, dtype = getattr(weight, "shape", None), getattr(weight, "dtype", None)
        # quantized weights are packed uint32: their shape says nothing
        if head_dim is None and shape and "uint32" not in str(dtype):
            head_dim = shape[0] // attn.n_kv_heads
        if head_dim is not None:
            out["head_dim"] = head_dim
    return out


def fingerprint(source, tokenizer=None) -> dict:
    """The fingerprint of a model, however it is at hand.

    Args:
        source: a config dict, a model folder (its ``config.json`` is read),
            an mlx-lm model (its ``args``, and its attention modules for the
            shape fields) or a transformers model (its text ``config``).
        tokenizer: optional tokenizer (an mlx-lm ``TokenizerWrapper`` or a
            transformers tokenizer) whose vocabulary hash goes in.

    Raises:
        ConfigError: ``source`` is none of the above.
        ModelLoadError: a folder without a readable ``config.json``.
    """
    kind, config = _config_of(source)
    if kind == "mlx" and not config:
        raise ConfigError(
            f"cannot build a fingerprint from {type(source).__name__}: expected "
            "a config dict, a model folder, an mlx-lm model with .args or a "
            "transformers model"
        )
    shape, digest = {}, None
    if kind == "hf" and hasattr(source, "named_parameters"):
        digest = weights.model_digest(source)
    elif kind == "mlx":
        shape = module_shape(source)
        if hasattr(source, "named_modules"):
            digest = weights.model_digest(source)
    runtime = "mlx" if kind == "mlx" else "hf"
    fp = fingerprint_from_config(
        config, tokenizer, weights_sha256=digest, runtime=runtime
    )
    return {**fp, **shape}


def _config_of(source) -> tuple[str, dict]:
    """``(kind, config dict)`` of a config dict, a model folder, a transformers
    model (its text config) or an mlx-lm model (its args)."""
    if isinstance(source, dict) and not hasattr(source, "parameters"):
        return "dict", source  # (mlx.nn.Module is a dict too)
    if isinstance(source, (str, os.PathLike)):
        from .models import model_config

        return "folder", model_config(source)
    if hasattr(source, "config") and hasattr(source.config, "to_dict"):
        hf_config = source.config
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config(decoder=True)
        config = hf_config.to_dict()
        for key in _IGNORED_BY_TRANSFORMERS.get(config.get("model_type"), ()):
            config.pop(key, None)
        return "hf", config
    return "mlx", model_args_config(source)


def context_length(source) -> int | None:
    """The most positions a model holds (``max_position_embeddings``), or None.

    Args:
        source: as for :func:`fingerprint` (a fingerprint dict has none).
    """
    _, config = _config_of(source)
    n = config.get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def mismatches(
    card: dict, model: dict, *, allow_other_weights: bool = False
) -> list[str]:
    """Fields where a card's fingerprint contradicts the model's, as messages.

    The one policy: a field the model side does not know (None) is not
    compared, except the RoPE and attention fields (:data:`NULLABLE_FIELDS`),
    where None means the default (no scaling, no window); RoPE scaling is
    compared in its canonical spelling; the identity hashes (tokenizer,
    weights) are compared only when both sides have one. Other weights are
    reported as ``weights: ...`` unless ``allow_other_weights``.
    """
    out = []
    for key in FIELDS:
        a, b = card.get(key), model.get(key)
        if key == "rope_scaling":  # cards written before the canonical spelling
            a, b = canonical_scaling(a), canonical_scaling(b)
        if key in IDENTITY_FIELDS and (a is None or b is None):
            continue
        if b is None and key not in NULLABLE_FIELDS:
            continue
        if a == b:
            continue
        if key == "weights_sha256":
            if not allow_other_weights:
                out.append(
                    f"weights: card made with weights_sha256 {a[:16]}..., model has "
                    f"{b[:16]}... (allow_other_weights to accept it)"
                )
            continue
        out.append(f"{key}: card has {a!r}, model has {b!r}{_WHY.get(key, '')}")
    return out


def weights_status(
    card: dict, model: dict, *, allow_other_weights: bool = False
) -> str:
    """How a card's weights digest compares with the model's (a WEIGHTS_* value)."""
    a, b = card.get("weights_sha256"), model.get("weights_sha256")
    if a is None:
        return WEIGHTS_CARD_UNKNOWN
    if b is None:
        return WEIGHTS_MODEL_UNKNOWN
    return WEIGHTS_SAME if a == b else WEIGHTS_OTHER_ALLOWED


def check(
    card: dict,
    model: dict,
    *,
    extra: list[str] = (),
    allow_other_weights: bool = False,
) -> str:
    """Raise ModelMismatchError naming every field in :func:`mismatches`.

    Args:
        card, model: the two fingerprints.
        extra: further mismatch messages found by the caller (e.g. the
            card's cache shape against the model's modules).
        allow_other_weights: accept a card made with other weights.

    Returns:
        How the weights compared (:func:`weights_status`). A card without a
        digest while the model has one is accepted with one
        :class:`UncheckedWeightsWarning`.
    """
    bad = mismatches(card, model, allow_other_weights=allow_other_weights)
    bad += [m for m in extra if m not in bad]
    if bad:
        raise ModelMismatchError("card was made for another model: " + "; ".join(bad))
    status = weights_status(card, model)
    if status == WEIGHTS_CARD_UNKNOWN and model.get("weights_sha256") is not None:
        warnings.warn(
            "card has no weights digest (an older writer): accepted without "
            "checking its weights",
            UncheckedWeightsWarning,
            stacklevel=3,
        )
    return status
