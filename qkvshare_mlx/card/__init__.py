"""The CacheCard: one versioned, integrity-checked safetensors file.

- :mod:`.container`: the hardened safetensors reader/writer and checksum
  (public: third-party tools and :mod:`qkvshare_mlx.testing` build on it);
- :mod:`.schema`: the card JSON, and the tensor table it implies;
- :mod:`.card`: :class:`CacheCard`, one quantized cache with its tokens and
  metadata, to and from bytes.

docs/cachecard-format.md is the specification. numpy only.
"""

from .card import DEFAULT_MAX_BYTES, CacheCard
from .schema import FORMAT_NAME, FORMAT_VERSION, READ_VERSIONS

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "CacheCard",
]
