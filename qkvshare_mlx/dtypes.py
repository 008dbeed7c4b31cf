"""One dtype table: names <-> MLX, numpy, safetensors and torch dtypes.

Every module that turns a dtype name into a library's dtype (or back) goes
through here. MLX and torch are imported only by the functions that return
their dtypes, so the table serves the numpy-only card reader and the
transformers bridge too.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

# Floating-point dtypes a model, a cache or a card's ``cache.dtype`` may have.
FLOAT_NAMES = ("float32", "float16", "bfloat16")

# Safetensors dtype codes a card uses, with their numpy dtypes.
SAFETENSORS = {
    "U32": np.dtype(np.uint32),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "I32": np.dtype(np.int32),
    "U16": np.dtype(np.uint16),
}
_SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS.items()}


def check_float_name(name, what: str = "dtype") -> str:
    """``name`` if it is one of :data:`FLOAT_NAMES`, else ConfigError."""
    if name not in FLOAT_NAMES:
        raise ConfigError(f"{what} must be one of {list(FLOAT_NAMES)} but got {name!r}")
    return name


def safetensors_code(dtype) -> str | None:
    """The safetensors code of a numpy dtype (None if a card cannot hold it)."""
    return _SAFETENSORS_CODES.get(np.dtype(dtype))


def to_mx(dtype):
    """An ``mx.Dtype`` from a name in :data:`FLOAT_NAMES` (a Dtype passes through)."""
    import mlx.core as mx

    if isinstance(dtype, mx.Dtype):
        return dtype
    return getattr(mx, check_float_name(dtype))


def mx_name(dtype) -> str:
    """The name of a floating ``mx.Dtype`` (``"float32"`` for any other)."""
    name = str(dtype).rsplit(".", 1)[-1]
    return name if name in FLOAT_NAMES else "float32"


def to_torch(dtype):
    """A ``torch.dtype`` from a name in :data:`FLOAT_NAMES` (a dtype passes through)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, check_float_name(dtype))
