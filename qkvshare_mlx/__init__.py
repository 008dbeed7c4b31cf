"""QKVShare-MLX: hand an LLM's KV cache from one agent to another as a CacheCard.

Importing the package has no side effects: it loads no native library, imports
neither MLX nor torch, and changes no environment variable. The public names below
resolve lazily, so ``qkvshare_mlx.card`` and ``qkvshare_mlx.errors`` can be used
from the transformers side without MLX installed. On Linux, call
:func:`enable_openblas` before anything imports ``mlx`` to give MLX's CPU backend
a fast BLAS (see :mod:`qkvshare_mlx.blas`; the ``qkvshare`` CLI does).
Injection lives in its module: ``from qkvshare_mlx.inject import inject`` (a
package attribute named like a submodule would be shadowed by it).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CacheCard": "card",
    "enable_openblas": "blas",
    "QuantConfig": "formats",
    "quantize_cache": "quant.mlx_backend",
    "dequantize_cache": "quant.mlx_backend",
    "allocate_bits": "quant.allocator",
    "CONTROLLERS": "quant.controllers",
    "TokenStats": "quant.controllers",
    "HandoffPlan": "quant.controllers",
    "QuantizedKV": "formats",
    "MixedQuantizedKVCache": "caches",
    "StreamedKVCache": "caches",
    "load_prompt_cache": "caches",
    "make_card": "handoff",
    "continue_from_card": "handoff",
    "MemoryTransport": "transport",
    "DirectoryTransport": "transport",
    "DistributedTransport": "distributed",
    "send_card": "distributed",
    "recv_card": "distributed",
    "load_model": "models",
    "default_model_path": "models",
    "QKVShareError": "errors",
    "ConfigError": "errors",
    "CacheShapeError": "errors",
    "ModelLoadError": "errors",
    "CardError": "errors",
    "CardFormatError": "errors",
    "CardIntegrityError": "errors",
    "CardTooLargeError": "errors",
    "CardOffsetError": "errors",
    "EmptyTokensError": "errors",
    "SegmentCoverageError": "errors",
    "UnsupportedCacheError": "errors",
    "ModelMismatchError": "errors",
    "PromptMismatchError": "errors",
    "TransportError": "errors",
    "TransportTimeoutError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'qkvshare_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
