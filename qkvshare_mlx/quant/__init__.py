"""Token-level mixed-precision quantization of a KV cache under a bit budget.

- :mod:`.pipeline`: the one pipeline (validate, rotate, inherit, allocate,
  encode each bucket) over a backend's array operations;
- :mod:`.mlx_backend` (``quantize_cache``, ``dequantize_cache``, ...) and
  :mod:`.numpy_backend` (``quantize_cache_np``, ``dequantize_cache_np``,
  the reference codec): the backends;
- :mod:`.controllers`: which tokens matter (``CONTROLLERS``, ``TokenStats``,
  ``HandoffPlan``); :mod:`.allocator`: formats under the budget
  (``allocate_bits``), pure numpy; :mod:`.error_model`: expected errors;
- :mod:`.fastpath`: the receiver's decode straight into mlx-lm buffers.

Importing this package imports neither MLX nor the backends: the numpy side
(``qkvshare_converters.hf_cache``) uses it without MLX installed.
"""

import importlib

_LAZY = {
    "quantize": "pipeline",
    "quantize_cache": "mlx_backend",
    "dequantize_cache": "mlx_backend",
    "quantize_cache_np": "numpy_backend",
    "dequantize_cache_np": "numpy_backend",
    "CONTROLLERS": "controllers",
    "TokenStats": "controllers",
    "HandoffPlan": "controllers",
    "allocate_bits": "allocator",
    "validate_budget": "allocator",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
