"""Model fingerprints (fingerprint): from a model, a config dict or a folder."""

import json

import pytest
from conftest import TINY_LLAMA_CONFIG

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.fingerprint import fingerprint, fingerprint_from_config


def test_fingerprint_from_model_and_config(tiny_mlx, tmp_path):
    fp = fingerprint(tiny_mlx)
    assert fp["weights_sha256"] is not None  # the loaded weights' digest
    fp = {**fp, "weights_sha256": None}  # configs and folders know no weights
    assert fp == fingerprint_from_config(TINY_LLAMA_CONFIG)
    assert (fp["n_layers"], fp["n_kv_heads"], fp["head_dim"]) == (2, 2, 32)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    assert fingerprint(tmp_path) == fp
    with pytest.raises(ConfigError, match="fingerprint"):
        fingerprint(object())


# One checkpoint, two runtimes: the same fingerprint (issue: every family).
BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
FAMILIES = {
    "llama3": {
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    },
    "qwen2": {
        "model_type": "qwen2",
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
    },
    "qwen2.5-yarn": {
        "model_type": "qwen2",
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    },
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0},
    "phi3": {"model_type": "phi3", "rope_theta": 10000.0},
    "phi3-partial": {
        "model_type": "phi3",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "head_dim": 32,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 32,
    },
}


def _both_runtimes(config: dict) -> tuple[dict, dict]:
    """(transformers' fingerprint, mlx-lm's) of one config.json."""
    import importlib
    from types import SimpleNamespace

    from transformers import AutoConfig

    model_type = config["model_type"]
    hf_config = AutoConfig.for_model(
        model_type, **{k: v for k, v in config.items() if k != "model_type"}
    )
    module = {"mistral": "llama"}.get(model_type, model_type)
    args = importlib.import_module(f"mlx_lm.models.{module}").ModelArgs
    return (
        fingerprint(SimpleNamespace(config=hf_config)),
        fingerprint(SimpleNamespace(args=args.from_dict(config))),
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_checkpoint_fingerprints_alike_in_both_runtimes(family):
    hf, mlx = _both_runtimes({**BASE, **FAMILIES[family]})
    assert hf == mlx
    if family == "qwen2.5-yarn":
        assert hf["rope_scaling"]["rope_type"] == "yarn"
    if family == "phi3":  # the default factor is no field (old cards match)
        assert "partial_rotary_factor" not in hf and hf["rope_scaling"] is None
    if family == "phi3-partial":
        assert hf["partial_rotary_factor"] == 0.5
    if family == "gemma3":
        assert hf["sliding_window"] == 512 and hf["rope_local_theta"] == 10000.0
        assert hf["layer_types"] == ["sliding"] * 5 + ["full"]


def test_a_window_one_runtime_ignores_is_refused_naming_why():
    from qkvshare_mlx.errors import ModelMismatchError
    from qkvshare_mlx.fingerprint import check

    config = {**BASE, "model_type": "mistral", "sliding_window": 16}
    hf, mlx = _both_runtimes(config)
    assert hf["sliding_window"] == 16 and "sliding_window" not in mlx
    with pytest.raises(
        ModelMismatchError, match="sliding_window: card has None.*ignores"
    ):
        check(mlx, hf)


def test_families_are_told_apart():
    fps = [_both_runtimes({**BASE, **c})[1] for c in FAMILIES.values()]
    from qkvshare_mlx.fingerprint import mismatches

    for i, a in enumerate(fps):
        for b in fps[i + 1 :]:
            assert mismatches(a, b)


def test_old_spelling_of_rope_scaling_still_matches():
    from qkvshare_mlx.fingerprint import mismatches

    card = {"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}}
    model = {
        "model_type": "qwen2",
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    assert mismatches(card, model) == []
