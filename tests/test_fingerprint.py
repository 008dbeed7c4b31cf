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
