"""The weights digest: which weights a KV cache was computed with.

A cache is a function of the weights, not only of the architecture: a
fine-tune, a LoRA merge or a 4-bit conversion of one model gives other keys
and values for the same tokens. :func:`digest` hashes, per parameter tensor
(canonical Hugging Face parameter names, sorted), its name, its shape and a
fixed sample of its values: ``SAMPLES`` evenly spaced flat (C-order) indices,
each value rounded to IEEE float16, little-endian (docs/cachecard-format.md,
section 10). The values are those of the weights as loaded (a quantized
mlx-lm layer is dequantized first), so one checkpoint gives one digest in
mlx-lm and in transformers, from safetensors or the project's GGUF
conversion, loaded in float32 or float16.

The core is numpy only and receives ``(name, shape, samples)``;
:func:`mlx_entries` and :func:`torch_entries` turn an mlx-lm or a
transformers model into those (duck-typed: this module imports neither MLX
nor torch at import time). :func:`model_digest` memoizes per model object
and, given the model's folder, in a small JSON file keyed by the weight
files' (path, size, mtime) under ``$XDG_CACHE_HOME/qkvshare-mlx/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import weakref
from pathlib import Path

import numpy as np

from .errors import ConfigError

DOMAIN = b"qkvshare-mlx/weights/1\n"
SAMPLES = 256  # values per tensor
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".npz", ".pt")
CACHE_FILE = "weights-digests.json"

_MEMO: dict[int, tuple[weakref.ref, str]] = {}


def sample_indices(numel: int, k: int = SAMPLES) -> np.ndarray:
    """Flat indices sampled from a tensor of ``numel`` elements.

    All of them when ``numel <= k``, else ``floor(i * numel / k)`` for
    ``i = 0 .. k-1`` (exact integer arithmetic): evenly spaced, the first
    element always included.
    """
    if numel <= k:
        return np.arange(numel, dtype=np.int64)
    return (np.arange(k, dtype=np.int64) * numel) // k


def digest(entries) -> str:
    """SHA-256 (hex) of ``(name, shape, samples)`` entries.

    Args:
        entries: iterable of (canonical name, shape, the values at
            :func:`sample_indices` of the flattened tensor, any float dtype).

    Raises:
        ConfigError: a name twice, or samples of the wrong count.
    """
    table = {}
    for name, shape, samples in entries:
        if name in table:
            raise ConfigError(f"weights digest: tensor {name!r} given twice")
        table[name] = (tuple(int(d) for d in shape), samples)
    h = hashlib.sha256(DOMAIN)
    h.update(struct.pack("<Q", len(table)))
    for name in sorted(table):
        shape, samples = table[name]
        values = np.asarray(samples, dtype=np.float32).reshape(-1)
        want = sample_indices(math.prod(shape)).size
        if values.size != want:
            raise ConfigError(
                f"weights digest: {name} needs {want} samples, got {values.size}"
            )
        desc = f"{name}|{list(shape)}".encode()
        blob = values.astype("<f2").tobytes()
        h.update(struct.pack("<Q", len(desc)) + desc)
        h.update(struct.pack("<Q", len(blob)) + blob)
    return h.hexdigest()


def array_entries(tensors: dict):
    """Entries of numpy (or array-like) tensors by canonical name."""
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        flat = arr.reshape(-1)
        yield name, arr.shape, flat[sample_indices(flat.size)].astype(np.float32)


def mlx_entries(model):
    """Entries of an mlx-lm model: its parameters, quantized layers dequantized.

    mlx-lm's parameter names are the transformers names for the models it
    loads from HF folders (its ``sanitize`` maps them), tied embeddings
    appear once, and RoPE frequencies are not parameters.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    quantized = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    for name, p in tree_flatten(model.parameters()):
        prefix, _, leaf = name.rpartition(".")
        q = quantized.get(prefix)
        if q is not None and leaf in ("scales", "biases"):
            continue  # folded into the dequantized weight
        if q is not None and leaf == "weight":
            yield _dequantized_entry(mx, name, q)
            continue
        idx = sample_indices(p.size)
        s = p.reshape(-1)[mx.array(idx)].astype(mx.float32)
        yield name, tuple(p.shape), np.array(s)


def _dequantized_entry(mx, name, q):
    # Dequantize only the rows that hold samples: a whole 4-bit embedding
    # matrix would cost more than the rest of the digest.
    w, scales = q.weight, q.scales
    out_dim, in_dim = w.shape[0], scales.shape[-1] * q.group_size
    idx = sample_indices(out_dim * in_dim)
    rows, cols = idx // in_dim, idx % in_dim
    uniq, pos = np.unique(rows, return_inverse=True)
    r = mx.array(uniq)
    biases = getattr(q, "biases", None)
    kwargs = {"group_size": q.group_size, "bits": q.bits}
    if getattr(q, "mode", "affine") != "affine":
        kwargs["mode"] = q.mode
    dq = mx.dequantize(
        w[r], scales[r], biases[r] if biases is not None else None, **kwargs
    )
    vals = dq.astype(mx.float32)[mx.array(pos), mx.array(cols)]
    return name, (out_dim, in_dim), np.array(vals)


def torch_entries(model):
    """Entries of a transformers model (``named_parameters``: each tensor
    once, tied weights under their first name; buffers excluded)."""
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        idx = sample_indices(flat.numel())
        s = flat[idx.tolist()].float().cpu().numpy()
        yield name, tuple(p.shape), s


def _entries(model):
    if hasattr(model, "named_parameters") and hasattr(model, "config"):
        return torch_entries(model)
    if hasattr(model, "named_modules") and hasattr(model, "parameters"):
        return mlx_entries(model)
    raise ConfigError(
        f"weights digest: expected an mlx-lm or transformers model, got "
        f"{type(model).__name__}"
    )


def _model_dtype(model) -> str:
    for p in (
        model.parameters() if hasattr(model, "named_parameters") else _mlx_params(model)
    ):
        return str(p.dtype).removeprefix("torch.").removeprefix("mlx.core.")
    return "none"


def _mlx_params(model):
    from mlx.utils import tree_flatten

    return (p for _, p in tree_flatten(model.parameters()))


def folder_stamp(folder) -> list:
    """(name, size, mtime_ns) of the weight files of a model folder."""
    out = []
    for f in sorted(Path(folder).iterdir()):
        if f.suffix in WEIGHT_FILE_SUFFIXES and f.is_file():
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def cache_path() -> Path:
    """The digest cache file (``$XDG_CACHE_HOME``, default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qkvshare-mlx" / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except (OSError, TypeError, ValueError):
        pass  # a cache that cannot be written only costs a recomputation
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def model_digest(model, *, folder=None) -> str:
    """The weights digest of a loaded model, computed once.

    Args:
        model: an mlx-lm model or a transformers model.
        folder: the folder the model was loaded from, if known (a
            transformers model's ``name_or_path`` is used when it is a
            folder): the digest is then cached across processes, keyed by
            the folder, the loaded dtype and the weight files' sizes and
            mtimes.
    """
    hit = _MEMO.get(id(model))
    if hit is not None and hit[0]() is model:
        return hit[1]
    if folder is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        folder = name if name and os.path.isdir(name) else None
    key = stamp = None
    if folder is not None:
        key = f"{Path(folder).resolve()}|{_model_dtype(model)}"
        stamp = folder_stamp(folder)
        entry = _read_cache(cache_path()).get(key)
        if isinstance(entry, dict) and entry.get("files") == stamp and stamp:
            value = entry.get("sha256")
            if isinstance(value, str):
                _remember(model, value)
                return value
    value = digest(_entries(model))
    if key is not None and stamp:
        path = cache_path()
        data = _read_cache(path)
        data[key] = {"files": stamp, "sha256": value}
        _write_cache(path, data)
    _remember(model, value)
    return value


def _remember(model, value: str) -> None:
    k = id(model)
    try:
        ref = weakref.ref(model, lambda _: _MEMO.pop(k, None))
    except TypeError:
        return
    _MEMO[id(model)] = (ref, value)


def forget(model) -> None:
    """Drop the memoized digest of ``model`` (after changing its weights in place)."""
    _MEMO.pop(id(model), None)
