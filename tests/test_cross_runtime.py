"""Cards across runtimes: made in MLX, continued in transformers, and back.

Tier (b): the same tiny random Llama in both runtimes (conftest's
``wide_twins``: head_dim 64 so the whole format menu fits). Tier (c, slow): the
embedded default model on GSM8K prompts.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import WIDE_HEAD_CONFIG, element_steps
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

from qkvshare_converters.hf_cache import (
    card_to_dynamic_cache,
    continue_hf,
    dynamic_cache_to_card,
    hf_greedy_tokens,
    hf_prefill,
)
from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.fingerprint import fingerprint, fingerprint_from_config
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.quant.controllers import TokenStats
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache
from qkvshare_mlx.quant.numpy_backend import dequantize_cache_np, quantize_cache_np

FLOAT32 = QuantConfig(float_dtype="float32")  # width 16 = a lossless fp32 copy
CONFIG = WIDE_HEAD_CONFIG


@pytest.fixture(scope="module")
def twins(wide_twins):
    return wide_twins


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], n)


def mlx_prefill(model, ids):
    """mlx-lm's own prefill: per-layer (B, H, T, D) keys and values."""
    cache = make_prompt_cache(model)
    model(mx.array(ids)[None], cache=cache)
    keys = [c.keys[..., : c.offset, :] for c in cache]
    values = [c.values[..., : c.offset, :] for c in cache]
    mx.eval(keys, values)
    return keys, values


def mlx_greedy(model, prompt, n, cache=None):
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=n)
    return [int(t) for t, _ in steps]


def token_formats(qkv):
    """(L, T) array of each token's storage (bits, key layout, key group, v group)."""
    out = np.empty((len(qkv.layers), qkv.n_tokens), dtype=object)
    for li, layer in enumerate(qkv.layers):
        for s in layer:
            fmt = (s.bits, s.keys.layout, s.keys.group, s.values.group)
            for t in np.asarray(s.index):
                out[li, t] = fmt
    return out


# ----------------------------------------------------------------------------
# 16-bit cards: identical greedy continuations across runtimes


@pytest.mark.parametrize("extra", [0, 6])
def test_mlx_card_continues_in_transformers(twins, extra):
    ids = tokens(48 + extra, seed=1)
    keys, values = mlx_prefill(twins.mlx_model, ids[:48])
    qkv = quantize_cache(
        keys, values, controller="uniform", budget_bits=32, config=FLOAT32
    )
    assert qkv.width_histogram() == {16: 2 * 48}
    card = CacheCard.from_quantized(qkv, ids[:48], fingerprint_from_config(CONFIG))
    card = CacheCard.from_bytes(card.to_bytes(), expect=fingerprint(twins.hf_model))
    # the injected cache is MLX's, which matches transformers' own to fp32 noise
    own, _, _ = hf_prefill(twins.hf_model, ids[:48])
    injected = card_to_dynamic_cache(card, twins.hf_model)
    for a, b in zip(own.layers, injected.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.values, a.values, atol=1e-4, rtol=1e-4)
    got = continue_hf(card, twins.hf_model, None, ids, max_tokens=32).tokens
    assert got == hf_greedy_tokens(twins.hf_model, ids, max_tokens=32)


@pytest.mark.parametrize("extra", [0, 6])
def test_transformers_card_continues_in_mlx(twins, extra):
    ids = tokens(48 + extra, seed=2)
    cache, _, _ = hf_prefill(twins.hf_model, ids[:48])
    card = dynamic_cache_to_card(
        cache,
        ids[:48],
        twins.hf_model,
        controller="uniform",
        budget_bits=32,
        config=FLOAT32,
    )
    card = CacheCard.from_bytes(card.to_bytes(), expect=fingerprint_from_config(CONFIG))
    assert card.producer["runtime"] == "transformers"
    keys, values = dequantize_cache_np(card.to_quantized())
    mlx_cache = []
    for k, v in zip(keys, values):
        c = KVCache()
        c.state = (mx.array(k), mx.array(v), card.n_tokens)
        mlx_cache.append(c)
    rest = ids[48:] if extra else ids[47:]
    if not extra:  # the prompt is the card: drop the last token, re-feed it
        for c in mlx_cache:
            c.trim(1)
    got = mlx_greedy(twins.mlx_model, rest, 32, cache=mlx_cache)
    assert got == mlx_greedy(twins.mlx_model, ids, 32)


def test_fingerprints_agree_across_runtimes(twins):
    hf, mlx = fingerprint(twins.hf_model), fingerprint(twins.mlx_model)
    assert hf == mlx  # the weights digest included: the same weights
    assert {**hf, "weights_sha256": None} == fingerprint_from_config(CONFIG)


def test_probe_statistics_agree_across_runtimes(twins):
    # the sender's statistics, attention mass and query moments, are the same
    # whichever runtime prefilled: a card's allocation does not depend on it
    from qkvshare_mlx.capture import prefill

    ids = tokens(60, seed=5)
    ours = prefill(twins.mlx_model, ids, probe_queries=8).stats
    _, theirs, _ = hf_prefill(twins.hf_model, ids, probe_queries=8)
    np.testing.assert_allclose(theirs.attention, ours.attention, rtol=1e-3, atol=1e-5)
    assert ours.query_moments.shape == theirs.query_moments.shape == (2, 2, 64, 64)
    np.testing.assert_allclose(
        theirs.query_moments, ours.query_moments, rtol=1e-3, atol=1e-4
    )


# ----------------------------------------------------------------------------
# numpy quantizer (transformers side) vs MLX quantizer


def _twin_cache(twins, n=150):
    ids = tokens(n, seed=3)
    keys, values = mlx_prefill(twins.mlx_model, ids)
    rng = np.random.default_rng(3)
    stats = TokenStats(attention=rng.random((2, n)) ** 4, key_norms=rng.random((2, n)))
    return ids, keys, values, stats


@pytest.mark.parametrize(
    "controller,budget",
    [("uniform", 4.5), ("sink-recent", 3.0), ("saliency", 4.5), ("topology", 6.0)],
)
def test_numpy_and_mlx_quantizers_agree(twins, controller, budget):
    """Same formats per token, same size; each decodes within its codec's tolerance.

    The numpy codec rounds to nearest: |x - x^| <= step / 2. ``mx.quantize``
    makes zero exactly representable, which can leave the far end of a group
    up to one step off, and it quantizes the float16-rounded input, so its
    bound is step + |x| * 2^-11.
    """
    ids, keys, values, stats = _twin_cache(twins)
    kw = dict(controller=controller, budget_bits=budget, stats=stats)
    a = quantize_cache(keys, values, **kw)
    b = quantize_cache_np(
        [np.array(k) for k in keys], [np.array(v) for v in values], **kw
    )
    assert (token_formats(a) == token_formats(b)).all()
    assert a.payload_bytes == b.payload_bytes
    if controller != "uniform":
        assert len(b.width_histogram()) > 1
    for qkv, half_steps in ((b, 1.0), (a, 2.0)):
        dk, dv = dequantize_cache_np(qkv)
        for li in range(2):
            sk, sv = element_steps(qkv.layers[li], qkv.n_tokens)
            for x, got, st in ((keys[li], dk[li], sk), (values[li], dv[li], sv)):
                x = np.array(x)
                fp16 = np.abs(x) * 2.0**-11 if half_steps == 2.0 else 0.0
                bound = half_steps * st / 2 * (1 + 1e-3) + fp16 + 1e-6
                assert (np.abs(got - x) <= bound).all()


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_cards_from_either_quantizer_read_in_the_other(twins, rotation):
    ids, keys, values, stats = _twin_cache(twins, n=100)
    fp = fingerprint_from_config(CONFIG)
    config = QuantConfig(rotation=rotation)
    kw = dict(controller="saliency", budget_bits=4.0, stats=stats, config=config)
    mlx_card = CacheCard.from_quantized(quantize_cache(keys, values, **kw), ids, fp)
    np_q = quantize_cache_np(
        [np.array(k) for k in keys], [np.array(v) for v in values], **kw
    )
    np_card = CacheCard.from_quantized(np_q, ids, fp, runtime="transformers")
    for card in (mlx_card, np_card):
        card = CacheCard.from_bytes(card.to_bytes())
        k_np, v_np = dequantize_cache_np(card.to_quantized())
        k_mx, v_mx = dequantize_cache(card.to_quantized(), mx.float32)
        for x, y in zip(k_np + v_np, k_mx + v_mx):
            # a rotation is undone by numpy's and MLX's own matmuls
            atol = 1e-6 if rotation == "none" else 1e-5 * (1 + np.abs(x).max())
            np.testing.assert_allclose(np.array(y), x, rtol=0, atol=atol)


# ----------------------------------------------------------------------------
# The embedded default model (slow)


def _gsm8k_prompts(tokenizer, n):
    from qkvshare_mlx.evals.gsm8k import load_problems

    out = []
    for p in load_problems("test", n):
        messages = [{"role": "user", "content": p["question"]}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out.append(np.asarray(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


@pytest.fixture(scope="module")
def default_pair(default_model_dir):
    from qkvshare_converters.hf_model import load_hf_model
    from qkvshare_mlx.models import load_model

    mlx_model, mlx_tok = load_model(default_model_dir, dtype="float32")
    hf_model, hf_tok = load_hf_model(default_model_dir, dtype="float32")
    return mlx_model, mlx_tok, hf_model, hf_tok


@pytest.mark.slow
def test_default_model_fingerprints_agree(default_pair, default_model_dir):

    mlx_model, mlx_tok, hf_model, hf_tok = default_pair
    fp = fingerprint(hf_model, hf_tok)
    assert fp["rope_theta"] is not None and fp["tokenizer_sha256"] is not None
    assert fingerprint(mlx_model, mlx_tok) == fp and fp["weights_sha256"] is not None
    # a folder's config knows no weights: every other field agrees
    assert fingerprint(default_model_dir, mlx_tok) == {**fp, "weights_sha256": None}


@pytest.mark.slow
def test_default_model_mlx_card_continues_in_transformers(default_pair):
    """16-bit card from MLX's prefill: HF continues exactly like its own prefill.

    3 GSM8K prompts x 32 tokens (bench/cross_runtime.py runs 20 x 64, both ways).
    """

    mlx_model, mlx_tok, hf_model, hf_tok = default_pair
    fp = fingerprint(mlx_model, mlx_tok)
    eos = {hf_tok.eos_token_id}
    for ids in _gsm8k_prompts(hf_tok, 3):
        keys, values = mlx_prefill(mlx_model, ids)
        qkv = quantize_cache(
            keys, values, controller="uniform", budget_bits=32, config=FLOAT32
        )
        card = CacheCard.from_bytes(CacheCard.from_quantized(qkv, ids, fp).to_bytes())
        got = continue_hf(card, hf_model, hf_tok, ids, max_tokens=32).tokens
        assert got == hf_greedy_tokens(hf_model, ids, max_tokens=32, eos=eos)


def test_pre_rope_card_continues_in_transformers(twins):
    # keys stored before RoPE (version 4) come back RoPE'd in transformers'
    # cache: a lossless card continues exactly, a 4.5-bit one stays close
    from qkvshare_mlx.rope import from_mlx_model

    ids = tokens(54, seed=5)
    keys, values = mlx_prefill(twins.mlx_model, ids[:48])
    kr = from_mlx_model(twins.mlx_model)
    own, _, _ = hf_prefill(twins.hf_model, ids[:48])
    for budget, tol in ((32, 1e-4), (4.5, None)):
        config = QuantConfig(float_dtype="float32", key_rope=kr)
        qkv = quantize_cache(
            keys, values, controller="uniform", budget_bits=budget, config=config
        )
        card = CacheCard.from_quantized(qkv, ids[:48], fingerprint_from_config(CONFIG))
        card = CacheCard.from_bytes(card.to_bytes(), expect=fingerprint(twins.hf_model))
        assert card.version == 4
        injected = card_to_dynamic_cache(card, twins.hf_model)
        for a, b in zip(own.layers, injected.layers):
            err = (b.keys - a.keys).abs().max().item()
            scale = a.keys.abs().max().item()
            assert err < (tol or 0.2) * scale, (budget, err, scale)
        if budget == 32:
            got = continue_hf(card, twins.hf_model, None, ids, max_tokens=16).tokens
            assert got == hf_greedy_tokens(twins.hf_model, ids, max_tokens=16)
