"""QKVShare-MLX: hand an LLM's KV cache from one agent to another as a CacheCard.

Importing the package is cheap: it preloads OpenBLAS (Linux, before anything imports
``mlx``; see ``_blas``) and nothing else. The public names below resolve lazily, so
``qkvshare_mlx.card`` and ``qkvshare_mlx.errors`` can be used from the transformers
side without MLX installed, and ``import qkvshare_mlx`` never imports torch.
Injection lives in its module: ``from qkvshare_mlx.inject import inject`` (a
package attribute named like a submodule would be shadowed by it).
"""

from . import _blas

_blas.preload_openblas()

import importlib  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "CacheCard": "card",
    "QuantConfig": "quantizer",
    "quantize_cache": "quantizer",
    "dequantize_cache": "quantizer",
    "allocate_bits": "controllers",
    "CONTROLLERS": "controllers",
    "TokenStats": "controllers",
    "HandoffPlan": "controllers",
    "QuantizedKV": "formats",
    "make_card": "handoff",
    "continue_from_card": "handoff",
    "MemoryTransport": "transport",
    "DirectoryTransport": "transport",
    "DistributedTransport": "transport",
    "send_card": "transport",
    "recv_card": "transport",
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
