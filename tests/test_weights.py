"""The weights digest (qkvshare_mlx/weights.py, spec section 10) and the
receivers that compare it: a card from one set of weights is refused by
another in MLX, in transformers and across runtimes, unless allowed."""

import json
import warnings

import numpy as np
import pytest
from conftest import tiny_llama

from qkvshare_mlx import weights
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.errors import ModelMismatchError
from qkvshare_mlx.fingerprint import (
    WEIGHTS_CARD_UNKNOWN,
    WEIGHTS_OTHER_ALLOWED,
    WEIGHTS_SAME,
    UncheckedWeightsWarning,
    fingerprint,
)

IDS = np.arange(1, 41) % 97


@pytest.fixture(scope="module")
def twins_a():
    return tiny_llama(runtimes=("mlx", "hf"), init="torch", seed=0)


@pytest.fixture(scope="module")
def twins_b():
    return tiny_llama(runtimes=("mlx", "hf"), init="torch", seed=1)


@pytest.fixture(scope="module")
def card_a(twins_a):
    from qkvshare_mlx.handoff import make_card

    return make_card(twins_a.mlx_model, None, IDS, controller="uniform")


def test_sample_indices_are_evenly_spaced_and_exact():
    assert weights.sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    idx = weights.sample_indices(1000, 4)
    assert idx.tolist() == [0, 250, 500, 750]
    big = weights.sample_indices(3 * 2**40)  # exact integer arithmetic
    assert big[1] == 3 * 2**40 // weights.SAMPLES


def test_digest_reproducible_from_numpy_and_the_spec():
    import hashlib
    import struct

    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((3, 500)), "a.bias": np.ones(7)}
    got = weights.digest(weights.array_entries(tensors))
    # the spec's algorithm, written out
    h = hashlib.sha256(b"qkvshare-mlx/weights/1\n" + struct.pack("<Q", 2))
    for name in sorted(tensors):
        arr = tensors[name]
        flat = arr.reshape(-1)
        k = min(flat.size, 256)
        idx = [i * flat.size // k for i in range(k)]
        blob = flat[idx].astype(np.float32).astype("<f2").tobytes()
        desc = f"{name}|{list(arr.shape)}".encode()
        h.update(struct.pack("<Q", len(desc)) + desc)
        h.update(struct.pack("<Q", len(blob)) + blob)
    assert got == h.hexdigest()


def test_same_weights_same_digest_in_both_runtimes(twins_a, twins_b):
    a_mlx, a_hf = fingerprint(twins_a.mlx_model), fingerprint(twins_a.hf_model)
    assert a_mlx["weights_sha256"] == a_hf["weights_sha256"] is not None
    assert fingerprint(twins_b.mlx_model)["weights_sha256"] != a_mlx["weights_sha256"]


def test_a_small_fine_tune_changes_the_digest(twins_a):
    import copy

    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = copy.deepcopy(twins_a.mlx_model)
    name, w = next((n, p) for n, p in tree_flatten(model.parameters()) if "q_proj" in n)
    # a rank-1 update of 1e-3 relative size: a LoRA merge in miniature
    delta = 1e-3 * mx.outer(mx.ones(w.shape[0]), mx.ones(w.shape[1])) * mx.abs(w).mean()
    model.load_weights([(name, w + delta)], strict=False)
    assert weights.digest(weights.mlx_entries(model)) != weights.model_digest(
        twins_a.mlx_model
    )


def test_4bit_quantized_copy_differs_from_its_float_original(twins_a):
    import copy

    from mlx_lm.utils import quantize_model

    # the quantization `mlx_lm.convert -q` applies (group 32 divides hidden 64)
    model = copy.deepcopy(twins_a.mlx_model)
    model, _ = quantize_model(model, {}, group_size=32, bits=4)
    q = weights.digest(weights.mlx_entries(model))
    assert q != weights.model_digest(twins_a.mlx_model)
    names = {n for n, _, _ in weights.mlx_entries(model)}
    assert not any(n.endswith((".scales", ".biases")) for n in names)


def test_float16_load_of_a_float32_model_keeps_the_digest(twins_a):
    import copy

    import mlx.core as mx

    model = copy.deepcopy(twins_a.mlx_model)
    model.set_dtype(mx.float16)
    assert weights.digest(weights.mlx_entries(model)) == weights.model_digest(
        twins_a.mlx_model
    )


def test_folder_cache(tmp_path, monkeypatch, twins_a):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    calls = []
    real = weights.digest
    monkeypatch.setattr(weights, "digest", lambda e: calls.append(1) or real(e))
    weights.forget(twins_a.mlx_model)
    d1 = weights.model_digest(twins_a.mlx_model, folder=folder)
    weights.forget(twins_a.mlx_model)
    d2 = weights.model_digest(twins_a.mlx_model, folder=folder)
    assert d1 == d2 and len(calls) == 1  # the second came from the JSON cache
    cache = json.loads(weights.cache_path().read_text())
    assert weights.cache_path().is_relative_to(tmp_path / "xdg")
    assert list(cache.values())[0]["sha256"] == d1
    (folder / "model.safetensors").write_bytes(b"y" * 11)  # size/mtime change
    weights.forget(twins_a.mlx_model)
    weights.model_digest(twins_a.mlx_model, folder=folder)
    assert len(calls) == 2
    weights.forget(twins_a.mlx_model)


def test_card_records_the_senders_weights(card_a, twins_a):
    assert card_a.model["weights_sha256"] == weights.model_digest(twins_a.mlx_model)


def test_other_weights_refused_in_mlx_unless_allowed(card_a, twins_a, twins_b):
    from qkvshare_mlx.handoff import continue_from_card
    from qkvshare_mlx.inject import inject

    with pytest.raises(ModelMismatchError, match="weights: card made with"):
        inject(card_a, twins_b.mlx_model)
    with pytest.raises(ModelMismatchError, match="weights"):
        CacheCard.from_bytes(card_a.to_bytes(), expect=twins_b.mlx_model)
    prompt = [*IDS.tolist(), 5]
    gen = continue_from_card(
        card_a, twins_b.mlx_model, None, prompt, max_tokens=2, allow_other_weights=True
    )
    assert gen.info["weights"] == WEIGHTS_OTHER_ALLOWED
    same = continue_from_card(card_a, twins_a.mlx_model, None, prompt, max_tokens=2)
    assert same.info["weights"] == WEIGHTS_SAME


def test_other_weights_refused_across_runtimes_and_in_hf(card_a, twins_a, twins_b):
    from qkvshare_converters.hf_cache import (
        card_to_dynamic_cache,
        dynamic_cache_to_card,
        hf_prefill,
    )

    card_to_dynamic_cache(card_a, twins_a.hf_model)  # same weights: accepted
    with pytest.raises(ModelMismatchError, match="weights"):
        card_to_dynamic_cache(card_a, twins_b.hf_model)
    card_to_dynamic_cache(card_a, twins_b.hf_model, allow_other_weights=True)
    cache, stats, _ = hf_prefill(twins_a.hf_model, IDS)
    hf_card = dynamic_cache_to_card(
        cache, IDS, twins_a.hf_model, controller="uniform", stats=stats
    )
    assert hf_card.model["weights_sha256"] == card_a.model["weights_sha256"]
    with pytest.raises(ModelMismatchError, match="weights"):
        card_to_dynamic_cache(hf_card, twins_b.hf_model)
    from qkvshare_mlx.inject import inject

    with pytest.raises(ModelMismatchError, match="weights"):
        inject(hf_card, twins_b.mlx_model)
    inject(hf_card, twins_a.mlx_model)


def test_card_without_digest_accepted_with_one_notice(card_a, twins_b):
    old = CacheCard.from_bytes(card_a.to_bytes())
    old.model = {**old.model, "weights_sha256": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = old.check_model(fingerprint(twins_b.mlx_model))
    assert status == WEIGHTS_CARD_UNKNOWN
    assert [type(w.message) for w in caught] == [UncheckedWeightsWarning]


@pytest.mark.slow
def test_default_model_digest_same_in_mlx_and_transformers(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qkvshare_mlx.models import load_model

    mlx_model, _ = load_model(default_model_dir, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert weights.model_digest(mlx_model) == weights.model_digest(hf)
