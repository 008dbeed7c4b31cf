"""Load a model in Hugging Face transformers (the torch side of a handoff).

The same folders ``qkvshare_mlx.models`` resolves for MLX (the default model, a
local folder, a hub id) load here with ``AutoModelForCausalLM``, so both runtimes
see identical weights. torch and transformers are imported on first call.
"""

import os


def load_hf_model(path_or_id: str | os.PathLike | None = None, *, dtype="float32"):
    """Load a causal LM and its tokenizer with transformers, in eval mode.

    Args:
        path_or_id: None for the default model, a local folder, or a hub id
            (see ``qkvshare_mlx.models.resolve_model``).
        dtype: A ``torch.dtype`` or its name ("float32", "float16", "bfloat16").

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelLoadError: The model cannot be found or loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkvshare_mlx.errors import ConfigError, ModelLoadError
    from qkvshare_mlx.models import resolve_model

    if isinstance(dtype, str):
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"dtype must be a torch dtype name but got {dtype!r}")
        dtype = torch_dtype
    resolved = resolve_model(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"cannot load model {resolved} with transformers: {e}"
        ) from e
    model.eval()
    return model, tokenizer
