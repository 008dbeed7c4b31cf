import json

import numpy as np
import pytest

from qkvshare_mlx.errors import ConfigError, ModelLoadError
from qkvshare_mlx.models import load_model, model_config, resolve_model


def _mlx_logits(model, ids) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0])


def _hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_tiny_twins_logits_match(tiny_llama_twins):
    ids = np.random.default_rng(0).integers(0, tiny_llama_twins.vocab_size, 20)
    ids = ids.tolist()
    mlx_logits = _mlx_logits(tiny_llama_twins.mlx_model, ids)
    hf_logits = _hf_logits(tiny_llama_twins.hf_model, ids)
    assert mlx_logits.shape == hf_logits.shape == (20, tiny_llama_twins.vocab_size)
    # The weights are large enough that a RoPE or GQA mismatch would show.
    assert np.abs(hf_logits).max() > 1.0
    assert np.abs(mlx_logits - hf_logits).max() <= 1e-4
    assert (mlx_logits.argmax(-1) == hf_logits.argmax(-1)).all()


@pytest.mark.slow
def test_default_model_mlx_matches_hf(default_model_dir):
    from qkvshare_converters.hf_model import load_hf_model
    from qkvshare_mlx.cli.doctor import prompt_token_ids

    mlx_model, tokenizer = load_model(default_model_dir, dtype="float32")
    hf_model, _ = load_hf_model(default_model_dir, dtype="float32")
    ids = prompt_token_ids(tokenizer, 64)
    mlx_last = _mlx_logits(mlx_model, ids)[-1]
    hf_last = _hf_logits(hf_model, ids)[-1]
    assert np.abs(mlx_last - hf_last).max() <= 1e-3
    assert mlx_last.argmax() == hf_last.argmax()


@pytest.mark.slow
def test_default_model_config_has_top_level_rope_theta(default_model_dir):
    config = model_config(default_model_dir)
    assert config["rope_theta"] == 100000.0  # mlx-lm's fallback would be 10000
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True


def test_missing_folder_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)


def _write_folder(
    path, *, config=True, tokenizer=True, weights=True, model_type="llama"
):
    path.mkdir()
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    if weights:
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(2, np.float32)}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("config", "config.json"),
        ("tokenizer", "tokenizer.json"),
        ("weights", "model*.safetensors"),
    ],
)
def test_incomplete_folder_names_missing_file(tmp_path, missing, named):
    folder = _write_folder(tmp_path / "m", **{missing: False})
    with pytest.raises(ModelLoadError) as info:
        resolve_model(folder)
    assert str(folder) in str(info.value)
    assert named in str(info.value)


def test_unsupported_model_type_is_named(tmp_path):
    folder = _write_folder(tmp_path / "m", model_type="not_a_real_arch")
    with pytest.raises(ModelLoadError, match="'not_a_real_arch'.*not supported"):
        load_model(folder)


def test_bad_dtype_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(tmp_path, dtype="float8")


def test_hub_id_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
