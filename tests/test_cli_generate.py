"""``qkvshare generate`` (cli/generate) and ``qkvshare convert`` (cli/convert):
the receiver against mlx-lm's own ``generate --prompt-cache-file``, both ways."""

import pytest
from conftest import mlx_lm_text, run_cli, run_mlx_lm

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.cli import main

DOC = "A robe takes 2 bolts of blue fiber and half that much white fiber."
QUESTION = " How many bolts in total?"


@pytest.fixture(scope="module")
def lossless_card(tiny_chat_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cards") / "doc.qkv"
    result = run_cli(
        "make-card",
        "--model",
        tiny_chat_model_dir,
        "-p",
        DOC,
        "--out",
        out,
        "--budget-bits",
        "16",
    )
    assert result.returncode == 0, result.stderr
    return out


def _one_line(capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkvshare: error: "), err
    assert message in err[0], err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--card", "/nonexistent.qkv"], "--card /nonexistent.qkv: no such file"),
        (["--card", "{tmp}"], "not a regular file"),
        (["--card", "{card}", "--out", "/nonexistent/b.qkv"], "does not exist"),
        (["--card", "{card}", "--out", "{tmp}/b.qkv", "--runtime", "hf"], "--runtime"),
        (["--card", "{card}", "--mode", "stream", "--runtime", "hf"], "--runtime mlx"),
        (["--card", "{card}", "--out", "{tmp}/b.qkv", "--budget-bits", "1"], "budget"),
        (["--card", "{junk}"], "too short for a safetensors header"),
        (["--card", "{card}", "-m", "0"], "max_tokens must be an int >= 1"),
        (
            ["--card", "{card}", "--out", "{tmp}/b.qkv", "--hops-remaining", "-1"],
            "hops",
        ),
        (["--card", "{card}", "--out", "{tmp}/b.qkv"], "made from token ids"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    args, message, tmp_path, capsys, no_model
):
    card = tmp_path / "card.qkv"
    from qkvshare_mlx.testing.mutations import small_card

    small_card().save(card)
    junk = tmp_path / "junk.qkv"
    junk.write_bytes(b"junk")
    args = [a.format(tmp=tmp_path, card=card, junk=junk) for a in args]
    assert main(["generate", *args]) == 2
    _one_line(capsys, message)


@pytest.mark.slow
def test_mlx_lm_generate_on_a_converted_card_matches(
    lossless_card, tiny_chat_model_dir, tmp_path
):
    cache_file = tmp_path / "cache.safetensors"
    assert run_cli("convert", lossless_card, cache_file).returncode == 0
    ours = run_cli("generate", "--card", lossless_card, "-p", QUESTION, "-m", "12")
    theirs = run_mlx_lm(
        "generate", "--prompt-cache-file", cache_file, "-p", QUESTION, "-m", "12"
    )
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout.strip() == mlx_lm_text(theirs.stdout).strip() != ""


@pytest.mark.slow
def test_cache_prompt_file_converted_generates_as_mlx_lm(tiny_chat_model_dir, tmp_path):
    cache_file = tmp_path / "cache.safetensors"
    made = run_mlx_lm(
        "cache_prompt",
        "--model",
        tiny_chat_model_dir,
        "--prompt",
        DOC,
        "--prompt-cache-file",
        cache_file,
    )
    assert made.returncode == 0, made.stderr
    card = tmp_path / "doc.qkv"
    conv = run_cli("convert", cache_file, card, "-p", DOC, "--budget-bits", "16")
    assert conv.returncode == 0, conv.stderr
    ours = run_cli("generate", "--card", card, "-p", QUESTION, "-m", "12")
    theirs = run_mlx_lm(
        "generate", "--prompt-cache-file", cache_file, "-p", QUESTION, "-m", "12"
    )
    assert ours.stdout.strip() == mlx_lm_text(theirs.stdout).strip() != ""
    # a prompt that is not the cached one is refused (its length differs)
    bad = run_cli("convert", cache_file, tmp_path / "x.qkv", "-p", DOC + " more")
    assert bad.returncode == 2 and "cache length" in bad.stderr


@pytest.mark.slow
def test_seeded_sampling_matches_mlx_lm(lossless_card, tmp_path):
    cache_file = tmp_path / "cache.safetensors"
    assert run_cli("convert", lossless_card, cache_file).returncode == 0
    flags = ["-p", QUESTION, "-m", "16", "--seed", "0", "--temp", "0.7"]
    ours = run_cli("generate", "--card", lossless_card, *flags)
    theirs = run_mlx_lm("generate", "--prompt-cache-file", cache_file, *flags)
    assert ours.stdout.strip() == mlx_lm_text(theirs.stdout).strip() != ""
    greedy = run_cli("generate", "--card", lossless_card, "-p", QUESTION, "-m", "16")
    assert greedy.stdout != ours.stdout  # the temperature did something


@pytest.mark.slow
def test_generate_hands_on_a_card_and_streams(lossless_card, tmp_path):
    out = tmp_path / "next.qkv"
    result = run_cli(
        "generate",
        "--card",
        lossless_card,
        "-p",
        QUESTION,
        "-m",
        "6",
        "--out",
        out,
        "--budget-bits",
        "4.5",
        "--verbose",
    )
    assert result.returncode == 0, result.stderr
    first, nxt = CacheCard.load(lossless_card), CacheCard.load(out)
    assert nxt.tokens[: first.n_tokens].tolist() == first.tokens.tolist()
    assert (
        nxt.user["messages"][-1]
        == {
            "role": "assistant",
            "content": result.stdout.strip("\n"),
        }
        or nxt.user["messages"][-1]["content"].strip() == result.stdout.strip()
    )
    assert "Prompt:" in result.stderr and "TTFT:" in result.stderr
