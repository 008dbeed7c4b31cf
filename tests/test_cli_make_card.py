"""``qkvshare make-card`` (cli/make_card): the sender, and what it refuses
before a model loads."""

import os
import stat

import numpy as np
import pytest
from conftest import run_cli

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.cli import main


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "/nonexistent/dir/a.qkv"], "folder /nonexistent/dir does not exist"),
        (["--out", "{tmp}"], "is a folder, expected a file path"),
        (["--out", "{tmp}/a.qkv", "--budget-bits", "0.5"], "--budget-bits"),
        (["--out", "{tmp}/a.qkv", "--budget-bits", "40"], "--budget-bits"),
        (["--out", "{tmp}/a.qkv", "--generate", "-1"], "--generate"),
        (["--out", "{tmp}/a.qkv", "--generate", "4", "--runtime", "hf"], "--runtime"),
        (["--out", "{tmp}/a.qkv", "--layer-weights", "{tmp}/none"], "cannot read"),
        (["--out", "{tmp}/a.qkv", "--layer-weights", "{tmp}"], "cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    extra, message, tmp_path, capsys, no_model
):
    args = ["make-card", "-p", "hello"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("qkvshare: error: ") and message in err[0]
    )


def test_help_states_the_budget_range_and_what_it_counts():
    text = " ".join(run_cli("make-card", "--help").stdout.split())
    assert "2.25 to 16" in text and "scales and biases included" in text
    assert "--kv-bits 4" in text


@pytest.mark.slow
def test_make_card_writes_a_card_with_the_umask(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "a.qkv"
    old = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "make-card",
                    "--model",
                    str(tiny_chat_model_dir),
                    "-p",
                    "Hello there",
                    "--out",
                    str(out),
                    "--budget-bits",
                    "16",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    card = CacheCard.load(out)
    assert card.user["messages"] == [{"role": "user", "content": "Hello there"}]
    assert card.user["open"] is True and card.user["model"] == str(tiny_chat_model_dir)


@pytest.mark.slow
def test_an_unreachable_budget_writes_no_card(tiny_chat_model_dir, tmp_path, capsys):
    out = tmp_path / "a.qkv"
    args = [
        "make-card",
        "--model",
        str(tiny_chat_model_dir),
        "-p",
        "Hello there",
        "--out",
        str(out),
        "--budget-bits",
        "2.3",
        "--controller",
        "uniform",
    ]
    assert main(args) == 2
    assert "effective bits" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_prompt_from_stdin_and_generate_streams_the_reply(
    tiny_chat_model_dir, tmp_path
):
    out = tmp_path / "a.qkv"
    result = run_cli(
        "make-card",
        "--model",
        tiny_chat_model_dir,
        "-p",
        "-",
        "--generate",
        "5",
        "--out",
        out,
        "--verbose",
        input="What is 2+2?",
    )
    assert result.returncode == 0, result.stderr
    card = CacheCard.load(out)
    reply = card.user["messages"][-1]
    assert (
        reply["role"] == "assistant"
        and result.stdout.strip() == reply["content"].strip()
    )
    assert card.user["messages"][0]["content"] == "What is 2+2?"
    assert (
        "Generation: 5 tokens" in result.stderr
        and "smaller than its fp16" in result.stderr
    )


def test_pinned_tokens_from_the_flags(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "a.qkv"
    prompt = "Count with me: one two three four five six seven eight nine ten"
    args = ["make-card", "--model", str(tiny_chat_model_dir), "-p", prompt]
    args += ["--out", str(out), "--budget-bits", "10", "--pin-recent", "8"]
    assert main(args + ["--pin-sinks", "2"]) == 0
    card = CacheCard.load(out)
    T = card.n_tokens
    for layer in card.layers:
        floats = {int(i) for s in layer if s.bits == 16 for i in s.index}
        assert {0, 1, *range(T - 8, T)} <= floats


def test_query_aware_key_errors_from_the_flag(tiny_chat_model_dir, tmp_path):
    # the sender's probe queries are captured and weigh the key errors: the
    # same budget, spent on other tokens than with the key vectors' error
    prompt = " ".join(f"item {i} costs {3 * i % 17} coins;" for i in range(40))
    args = ["make-card", "--model", str(tiny_chat_model_dir), "-p", prompt]
    args += ["--budget-bits", "3", "--rotation", "none", "--no-split-kv"]
    layouts = {}
    for how in ("mse", "query"):
        out = tmp_path / f"{how}.qkv"
        assert main(args + ["--out", str(out), "--key-error", how]) == 0
        card = CacheCard.load(out)
        assert card.qkv.effective_bits == pytest.approx(3.0, abs=0.05)
        assert "key_error" not in card.qkv.config.to_dict()  # sender-side only
        layouts[how] = [
            sorted((s.bits, s.keys.group, tuple(np.asarray(s.index))) for s in layer)
            for layer in card.layers
        ]
    assert layouts["mse"] != layouts["query"]


def test_pre_rope_flag_writes_a_version_4_card_the_receiver_decodes(
    tiny_chat_model_dir, tmp_path, capsys
):
    from qkvshare_mlx.inject import inject
    from qkvshare_mlx.models import load_model
    from qkvshare_mlx.rope import from_mlx_model

    prompt = " ".join(f"item {i} costs {3 * i % 17} coins;" for i in range(20))
    out = tmp_path / "pre.qkv"
    args = ["make-card", "--model", str(tiny_chat_model_dir), "-p", prompt]
    assert main(args + ["--budget-bits", "4.5", "--pre-rope", "--out", str(out)]) == 0
    card = CacheCard.load(out)
    model, _ = load_model(str(tiny_chat_model_dir))
    assert card.version == 4 and card.qkv.config.key_rope == from_mlx_model(model)
    caches = inject(card, model, mode="dequantize")
    assert len(caches) == len(model.layers) and caches[0].offset == card.n_tokens
    # the transformers sender reads the same RoPE from its own modules
    hf_out = tmp_path / "hf.qkv"
    hf_args = ["--budget-bits", "4.5", "--pre-rope", "--runtime", "hf"]
    assert main(args + hf_args + ["--out", str(hf_out)]) == 0
    hf_card = CacheCard.load(hf_out)
    assert hf_card.version == 4
    pairs = zip(hf_card.qkv.config.key_rope.specs, card.qkv.config.key_rope.specs)
    for a, b in pairs:
        assert a.pairing == b.pairing
        assert np.allclose(a.freqs, b.freqs, rtol=1e-6, atol=1e-9)
    # a combination that cannot apply is refused, not ignored
    capsys.readouterr()
    bad = ["--pre-rope", "--key-error", "query", "--out", str(tmp_path / "x.qkv")]
    assert main(args + bad) == 2
    assert "key_error 'query'" in capsys.readouterr().err
    assert not (tmp_path / "x.qkv").exists()


def test_pre_rope_is_the_recommended_setting_below_6_bits(
    tiny_chat_model_dir, tmp_path, capsys
):
    # on by default where the fidelity search measured it to help (3-5.5
    # bits), off at 6 bits and for lossless cards, and a card handed on
    # keeps the way its inherited keys are stored
    args = _make_card_args(tiny_chat_model_dir)
    cards = _cards_of(
        args,
        tmp_path,
        {
            "3": ["--budget-bits", "3"],
            "3 off": ["--budget-bits", "3", "--no-pre-rope"],
            "6": ["--budget-bits", "6"],
            "16": ["--budget-bits", "16"],
        },
    )
    assert cards["3"].version == 4 and cards["3"].qkv.config.key_rope is not None
    for name in ("3 off", "6", "16"):
        assert cards[name].qkv.config.key_rope is None, name
    gen = ["generate", "--model", str(tiny_chat_model_dir), "-p", "next", "-m", "2"]
    for src, extra, ok in (
        ("3", [], True),  # keeps key_rope
        ("6", ["--budget-bits", "3"], True),  # keeps none
        ("3", ["--no-pre-rope"], False),
        ("16", ["--pre-rope"], False),
    ):
        out = tmp_path / f"next_{src}.qkv"
        out.unlink(missing_ok=True)
        card = tmp_path / f"{src}.qkv"
        capsys.readouterr()
        code = main(gen + ["--card", str(card), "--out", str(out), *extra])
        if ok:
            assert code == 0
            kept = CacheCard.load(out).qkv.config.key_rope
            assert kept == cards[src].qkv.config.key_rope
        else:
            assert (
                code == 2 and "inherited card holds its keys" in capsys.readouterr().err
            )
            assert not out.exists()


def test_min_bits_recommended_from_4_5_bits_and_settable(
    tiny_chat_model_dir, tmp_path, capsys
):
    # no 2-bit token from 4.5 bits up (measured: less KL at 4.5 bits), 2-bit
    # tokens allowed below it; --min-bits sets the narrowest width itself
    args = _make_card_args(tiny_chat_model_dir)
    cards = _cards_of(
        args,
        tmp_path,
        {
            "3.0": ["--budget-bits", "3"],
            "4.5": ["--budget-bits", "4.5"],
            "4.5 min2": ["--budget-bits", "4.5", "--min-bits", "2"],
            "6 min4": ["--budget-bits", "6", "--min-bits", "4"],
        },
    )
    widths = {}
    for name, card in cards.items():
        used = {s.bits for layer in card.qkv.layers for s in layer}
        used |= {s.vbits for layer in card.qkv.layers for s in layer}
        widths[name] = (min(card.qkv.config.widths), min(used))
    assert widths["3.0"][0] == 2 and widths["4.5 min2"][0] == 2
    assert widths["4.5"][0] == 3 and widths["4.5"][1] >= 3
    assert widths["6 min4"][0] == 4 and widths["6 min4"][1] >= 4
    bad = ["--budget-bits", "3", "--min-bits", "4", "--out", str(tmp_path / "x.qkv")]
    assert main(args + bad) == 2
    assert "--budget-bits" in capsys.readouterr().err
    assert not (tmp_path / "x.qkv").exists()


def _make_card_args(model_dir) -> list[str]:
    prompt = " ".join(f"step {i}: add {i % 7}." for i in range(16))
    return ["make-card", "--model", str(model_dir), "-p", prompt]


def _cards_of(args, folder, runs: dict) -> dict:
    """One card per named set of extra flags, made and loaded back."""
    cards = {}
    for name, extra in runs.items():
        out = folder / f"{name.replace(' ', '_')}.qkv"
        assert main(args + extra + ["--out", str(out)]) == 0
        cards[name] = CacheCard.load(out)
    return cards
