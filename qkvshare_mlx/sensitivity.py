"""Layer sensitivity: how much each layer's key and value errors move the output.

The allocator weighs a token's quantization error by the attention it gets
(:mod:`.quant.controllers`), and every layer alike. Layers are not alike: in
SmolLM2-135M an error in layer 0's values moves the next-token distribution
over 100x more than the same weighted error in a typical layer, and early
layers' keys about 5x less (KVTuner makes the same observation). A
:class:`LayerSensitivity` measures that once per model, on calibration
text, and hands the allocator one multiplier per (layer, key/value)
(``TokenStats.layer_weights``).

The measurement (:func:`measure_sensitivity`): for each calibration sample,
quantize its cache with the card's own settings, then, for each layer and
half in turn, replace only that layer's keys (or values) by their decoded
card and feed the continuation: the KL against the exact cache, divided by
the allocator's weighted error of that layer-half, is the multiplier (summed
over samples; ``2 L`` short forwards a sample). KL is quadratic in small
errors like the weighted MSE, so the ratio is a property of the layer.

Profiles for the models this package names ship with it
(``qkvshare_mlx/profiles/``, measured by ``bench/sensitivity.py`` on GSM8K
train problems); :func:`shipped_profile` finds the one whose architecture a
model has.

This module knows mlx-lm models and cards' quantizer; it does not know
where calibration text comes from (``text_samples`` cuts any token lists).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .capture import prefill
from .card.container import write_file
from .divergence import kl_top1
from .errors import ConfigError
from .formats import QuantConfig
from .quant.controllers import (
    CONTROLLERS,
    WEIGHT_RANGE,
    check_layer_weights,
    token_importance,
)
from .quant.mlx_backend import dequantize_cache, quantize_cache

FORMAT = "qkvshare-layer-sensitivity"
VERSION = 1
# the fingerprint fields a profile is matched on: a profile carries over to
# other weights of the same architecture (a fine-tune) as an approximation,
# and never to another architecture
ARCH_KEYS = ("model_type", "n_layers", "n_kv_heads", "head_dim", "vocab_size")
MAX_PROFILE_BYTES = 1 << 20  # a profile of 1000 layers is ~60 KB


@dataclass(frozen=True)
class LayerSensitivity:
    """Measured multipliers of each layer's key and value error weights.

    Attributes:
        weights: per layer, (key, value) multipliers; geometric mean 1 over
            all 2 L of them.
        model: what was measured (the model's type, for messages).
        samples: how many calibration samples were used.
        budget_bits, controller: the card settings the errors came from.
        architecture: the measured model's fingerprint fields
            (:data:`ARCH_KEYS`), for :func:`shipped_profile`.
    """

    weights: tuple[tuple[float, float], ...]
    model: str = ""
    samples: int = 1
    budget_bits: float = 0.0
    controller: str = "saliency"
    architecture: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != 2 or w.shape[0] == 0:
            raise ConfigError(
                f"layer sensitivity weights must be (layers, 2) but got {w.shape}"
            )
        check_layer_weights(w, "layer sensitivity weights")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(
                f"layer sensitivity samples must be a count >= 1, got {self.samples!r}"
            )
        if not isinstance(self.model, str):
            raise ConfigError("layer sensitivity model must be a string")
        if self.controller not in CONTROLLERS:
            raise ConfigError(
                f"layer sensitivity controller {self.controller!r} is not one of "
                f"{sorted(CONTROLLERS)}"
            )

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def layer_weights(self, n_layers: int) -> np.ndarray:
        """(L, 2) float64 multipliers for a model of ``n_layers`` layers."""
        if n_layers != self.n_layers:
            raise ConfigError(
                f"layer sensitivity measured on {self.n_layers} layers "
                f"({self.model or 'another model'}) but the model has {n_layers}"
            )
        return np.asarray(self.weights, dtype=np.float64)

    def check_model(self, model) -> None:
        """Raise ConfigError unless ``model`` (mlx-lm or transformers) has the
        architecture this profile was measured on (where it records one) and
        its layer count."""
        arch = architecture_of(model)
        if self.architecture:
            mine, theirs = dict(self.architecture), dict(arch)
            diff = [k for k in ARCH_KEYS if k in mine and mine[k] != theirs.get(k)]
            if diff:
                what = ", ".join(f"{k} {mine[k]!r} vs {theirs.get(k)!r}" for k in diff)
                raise ConfigError(
                    f"layer sensitivity measured on another architecture "
                    f"({self.model or 'unknown model'}): {what} (profile vs model)"
                )
        self.layer_weights(int(dict(arch).get("n_layers") or 0))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "model": self.model,
                "samples": self.samples,
                "budget_bits": self.budget_bits,
                "controller": self.controller,
                "architecture": dict(self.architecture),
                "weights": [list(p) for p in self.weights],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "layer sensitivity"):
        if len(text) > MAX_PROFILE_BYTES:
            raise ConfigError(
                f"{source}: {len(text)} characters, over the {MAX_PROFILE_BYTES} "
                "a profile may have"
            )
        try:
            d = json.loads(text)
        except RecursionError:
            raise ConfigError(f"{source}: not JSON (nested too deeply)") from None
        except ValueError as e:
            raise ConfigError(f"{source}: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError(f"{source}: expected format {FORMAT!r}")
        version = d.get("version")
        if isinstance(version, bool) or version != VERSION:
            raise ConfigError(
                f"{source}: version must be {VERSION} but got {d.get('version')!r}"
            )
        w = d.get("weights")
        if not (
            isinstance(w, list)
            and all(
                isinstance(p, list)
                and len(p) == 2
                and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in p
                )
                for p in w
            )
        ):
            raise ConfigError(
                f"{source}: weights must be a list of [key, value] numbers"
            )
        arch = d.get("architecture", {})
        if not isinstance(arch, dict) or not all(
            isinstance(v, (str, int, float, type(None))) for v in arch.values()
        ):
            raise ConfigError(f"{source}: architecture must be an object of scalars")
        fields = {
            "model": (str, "", "a string"),
            "samples": (int, 1, "an integer"),
            "budget_bits": ((int, float), 0.0, "a number"),
            "controller": (str, "saliency", "a string"),
        }
        for name, (kind, default, what) in fields.items():
            x = d.get(name, default)
            if isinstance(x, bool) or not isinstance(x, kind):
                raise ConfigError(f"{source}: {name} must be {what}, got {x!r}")
        try:
            return cls(
                tuple((float(k), float(v)) for k, v in w),
                model=d.get("model", ""),
                samples=d.get("samples", 1),
                budget_bits=float(d.get("budget_bits", 0.0)),
                controller=d.get("controller", "saliency"),
                architecture=tuple(sorted(arch.items())),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path) -> None:
        """Write the JSON atomically (a reader never sees half a file), with
        the permissions ``open()`` would give it (as a card's)."""
        write_file(path, (self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path) -> LayerSensitivity:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PROFILE_BYTES + 1)  # never more than the cap
            if len(raw) > MAX_PROFILE_BYTES:
                raise ConfigError(
                    f"layer sensitivity {path}: over the {MAX_PROFILE_BYTES} "
                    "bytes a profile may have"
                )
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"layer sensitivity {path}: cannot read ({e})") from None
        return cls.from_json(text, source=f"layer sensitivity {path}")


def architecture_of(model) -> tuple[tuple[str, object], ...]:
    """The :data:`ARCH_KEYS` fields of ``model``'s fingerprint (an mlx-lm or
    transformers model)."""
    from .fingerprint import fingerprint

    fp = fingerprint(model)
    return tuple(sorted((k, fp.get(k)) for k in ARCH_KEYS))


def shipped_profile(model) -> LayerSensitivity | None:
    """The profile shipped with this package for ``model``'s architecture,
    or None."""
    from importlib import resources

    arch = architecture_of(model)
    folder = resources.files(__package__) / "profiles"
    if not folder.is_dir():
        return None
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            prof = LayerSensitivity.from_json(
                entry.read_text(encoding="utf-8"), source=f"profile {entry.name}"
            )
            if prof.architecture == arch:
                return prof
    return None


def text_samples(token_lists, *, follow: int = 64) -> list[tuple[list[int], list[int]]]:
    """Calibration samples from token lists: each its first tokens as the
    context, its last ``follow`` as the continuation fed through the card."""
    out = []
    for ids in token_lists:
        ids = [int(t) for t in ids]
        if len(ids) < follow + 8:
            raise ConfigError(
                f"a calibration text has {len(ids)} tokens, expected at least "
                f"{follow + 8} (a context and {follow} followed)"
            )
        out.append((ids[:-follow], ids[-follow:]))
    return out


def _cache(model, keys, values) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for c, k, v in zip(cache, keys, values):
        c.update_and_fetch(k, v)
    return cache


def _logits(model, cache, ids) -> np.ndarray:
    out = model(mx.array(ids)[None], cache=cache)[0].astype(mx.float32)
    return np.asarray(out, dtype=np.float64)


def measure_sensitivity(
    model,
    samples,
    *,
    controller: str = "saliency",
    budget_bits: float = 4.5,
    config: QuantConfig | None = None,
    probe_queries: int = 32,
    progress=None,
) -> LayerSensitivity:
    """Measure each layer's key and value sensitivity on calibration samples.

    Args:
        model: an mlx-lm model.
        samples: ``(context_ids, continuation_ids)`` pairs (see
            :func:`text_samples`); the context becomes a card, the
            continuation is fed through it.
        controller, budget_bits, config: the card settings whose errors are
            measured (an adaptive controller: its token weights are what the
            multipliers scale).
        probe_queries: as in :func:`qkvshare_mlx.capture.prefill`.
        progress: called as ``progress(done, total)`` after each sample.

    Returns:
        A :class:`LayerSensitivity` (multipliers with geometric mean 1;
        a layer-half whose card is exact gets 1).

    Raises:
        ConfigError: no samples, or a controller without token weights.
    """
    samples = list(samples)
    if not samples:
        raise ConfigError("measure_sensitivity needs at least one sample")
    kl_sum = err_sum = None
    for n, (context, follow) in enumerate(samples, 1):
        context, follow = [int(t) for t in context], [int(t) for t in follow]
        if not context or not follow:
            raise ConfigError(f"calibration sample {n} has an empty part")
        # 1. the exact cache, its statistics and the reference logits
        pre = prefill(model, context, probe_queries=probe_queries)
        keys, values = pre.keys, pre.values
        L, T = len(keys), keys[0].shape[2]
        imp = token_importance(controller, pre.stats, L, T)
        ref = _logits(model, _cache(model, keys, values), follow)
        # 2. the card's decoded K/V
        qkv = quantize_cache(
            keys,
            values,
            controller=controller,
            budget_bits=budget_bits,
            config=config,
            stats=pre.stats,
        )
        qk, qv = dequantize_cache(qkv)
        if kl_sum is None:
            kl_sum, err_sum = np.zeros((L, 2)), np.zeros((L, 2))
        # 3. one layer-half at a time: its KL and its weighted error
        for li in range(L):
            for half, (exact, decoded) in enumerate(((keys, qk), (values, qv))):
                d = (decoded[li] - exact[li]).astype(mx.float32)
                per_token = np.asarray(mx.sum(d * d, axis=(0, 1, 3)), np.float64)
                err_sum[li, half] += float((imp[li, half] * per_token).sum())
                swapped = list(exact)
                swapped[li] = decoded[li]
                ks, vs = (swapped, values) if half == 0 else (keys, swapped)
                kl_sum[li, half] += max(
                    kl_top1(ref, _logits(model, _cache(model, ks, vs), follow))[0], 0.0
                )
        if progress is not None:
            progress(n, len(samples))
    ratio = np.ones_like(kl_sum)
    ok = (err_sum > 0) & (kl_sum > 0)
    ratio[ok] = kl_sum[ok] / err_sum[ok]
    if ok.any():
        ratio[ok] /= math.exp(np.log(ratio[ok]).mean())
    ratio = np.clip(ratio, *WEIGHT_RANGE)
    return LayerSensitivity(
        tuple((float(k), float(v)) for k, v in ratio),
        model=str(getattr(getattr(model, "args", None), "model_type", "")),
        samples=len(samples),
        budget_bits=float(budget_bits),
        controller=controller,
        architecture=architecture_of(model),
    )
