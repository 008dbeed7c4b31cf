"""One exception hierarchy for everything QKVShare validates at its boundary.

Every error raised on bad input (a card file, a CLI argument, a model folder,
a budget) is a ``QKVShareError``; messages name the field, what was expected
and what arrived. The CLI turns any of these into one line and exit code 2.
"""


class QKVShareError(Exception):
    """Base class of every error QKVShare raises on bad input."""


class ConfigError(QKVShareError, ValueError):
    """A quantizer/controller option is invalid (bits, group size, budget, name)."""


class CacheShapeError(QKVShareError, ValueError):
    """A K/V tensor has the wrong rank, shape, dtype, or non-finite values."""


class ModelLoadError(QKVShareError):
    """A model path or hub id cannot be opened (missing, incomplete, unsupported)."""


class CardError(QKVShareError):
    """Base class of every problem with a CacheCard (file, bytes or content)."""


class CardFormatError(CardError):
    """The card is not a well-formed CacheCard of a version this reader knows."""


class CardIntegrityError(CardError):
    """The card is well-formed but its checksum does not match its content."""


class SegmentCoverageError(CardFormatError, CacheShapeError):
    """A layer's segments do not cover tokens 0..T-1 exactly once.

    One class wherever segments are checked: in a card being read (a
    ``CardFormatError``) and in a quantized cache in memory (a
    ``CacheShapeError``).
    """


class CardTooLargeError(CardFormatError):
    """The card claims more memory than the reader's configured cap allows."""


class CardAuthError(CardError):
    """The card's signature is missing, made with another key, or wrong."""


class ModelMismatchError(CardError):
    """The card was made for a different model than the one receiving it."""


class CardOffsetError(CardError, ConfigError):
    """A card starts at a RoPE offset the receiving cache cannot hold (mlx-lm
    ``KVCache``, a transformers ``DynamicCache``, a prompt-cache file, an
    inherited card: all start at position 0)."""


class UnsupportedCacheError(ConfigError):
    """A model layer keeps a cache the handoff cannot carry (not plain K/V:
    a sliding window, recurrent state); raised before any prefill."""


class PromptMismatchError(QKVShareError):
    """The receiver's prompt does not begin with the card's tokens."""


class EmptyTokensError(PromptMismatchError, ConfigError):
    """A token list is empty where at least one id is needed (a prompt, a
    prefill, a card's tokens); one class wherever token lists are taken."""


class TransportError(QKVShareError):
    """A card could not be sent or received (peer gone, bad header)."""


class TransportTimeoutError(TransportError, TimeoutError):
    """No complete card arrived within the stated timeout."""
