"""``qkvshare chain`` (cli/chain): a spec file, every hop's card, the table."""

import json

import pytest
from conftest import assert_inherits, run_cli

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.cli import main
from qkvshare_mlx.cli.chain import chain_agents, load_spec
from qkvshare_mlx.errors import ConfigError

SPEC = {
    "system_prompt": "Be brief.",
    "agents": [
        {"role": "solver", "prompt": "What is 12 * 7?", "max_tokens": 6},
        {"role": "checker", "prompt": "Check it.", "max_tokens": 6, "budget_bits": 3},
        {"role": "answerer", "prompt": "Only the number.", "max_tokens": 4},
    ],
}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"agents": [SPEC["agents"][0]]}, "at least 2 agents"),
        ({"agents": [{"role": "x"}, {"prompt": "y"}]}, "agents[0] needs a 'prompt'"),
        ({**SPEC, "colour": "red"}, "expected an object with keys"),
        ({"agents": [{"prompt": "a", "temp": 1}, {"prompt": "b"}]}, "unknown keys"),
        ({"agents": [{"prompt": "a", "max_tokens": 0}, {"prompt": "b"}]}, "max_tokens"),
        (
            {"agents": [{"prompt": "a", "controller": "x"}, {"prompt": "b"}]},
            "controller",
        ),
        (
            {"agents": [{"prompt": "a", "budget_bits": "4"}, {"prompt": "b"}]},
            "budget_bits",
        ),
    ],
)
def test_bad_specs_are_named(spec, message, tmp_path):
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_spec(path)


def test_toml_spec_and_bad_budget_before_the_model_loads(tmp_path, capsys, monkeypatch):
    path = tmp_path / "chain.toml"
    path.write_text(
        '[[agents]]\nprompt = "a"\n[[agents]]\nprompt = "b"\nbudget_bits = 1.0\n'
    )
    assert [a.prompt for a in chain_agents(load_spec(path))] == ["a", "b"]
    monkeypatch.setattr(
        "qkvshare_mlx.models.load_model", lambda *a, **k: pytest.fail("model loaded")
    )
    assert main(["chain", str(path), "--out-dir", str(tmp_path)]) == 2
    assert "--budget-bits" in capsys.readouterr().err


@pytest.mark.slow
def test_three_agent_chain_matches_the_python_api(tiny_chat_model_dir, tmp_path):
    spec = tmp_path / "chain.json"
    spec.write_text(json.dumps(SPEC))
    table = tmp_path / "chain_out.json"
    result = run_cli(
        "chain",
        spec,
        "--model",
        tiny_chat_model_dir,
        "--out-dir",
        tmp_path,
        "--json",
        table,
    )
    assert result.returncode == 0, result.stderr
    hops = json.loads(table.read_text())["hops"]
    cards = [CacheCard.load(tmp_path / f"hop{k}.qkv") for k in (1, 2, 3)]
    # hop 1's codes are bit-identical in hop 3's card
    assert_inherits(cards[0], cards[2])
    # the same chain through the Python API gives the same replies
    from qkvshare_mlx.cli import options
    from qkvshare_mlx.conversation import run_chat_chain
    from qkvshare_mlx.models import load_model

    model, tok = load_model(tiny_chat_model_dir)
    agents = chain_agents(SPEC)
    # the CLI's cards: the recommended settings of the chain's cheapest budget
    config = options.recommended_model_config(min(a.budget_bits for a in agents), model)
    assert all(c.qkv.config.rotation == config.rotation for c in cards)
    assert all(c.qkv.config.key_rope == config.key_rope for c in cards)
    api_hops, api_cards = run_chat_chain(
        model, tok, agents, system_prompt=SPEC["system_prompt"], config=config
    )
    assert [h["reply"] for h in hops] == [h["reply"] for h in api_hops]
    assert hops[-1]["reply"] == api_hops[-1]["reply"]
    assert [c.n_tokens for c in cards] == [c.n_tokens for c in api_cards]
    assert all(
        h["file_bytes"] == (tmp_path / f"hop{k + 1}.qkv").stat().st_size
        for k, h in enumerate(hops)
    )
    assert "TTFT ms" in result.stdout and "answerer" in result.stdout


def test_recommended_cards_for_a_model(tiny_mlx):
    from qkvshare_mlx.cli import options
    from qkvshare_mlx.rope import from_mlx_model

    assert options.recommended_model_config(3.0, tiny_mlx).key_rope == (
        from_mlx_model(tiny_mlx)
    )
    assert (
        options.recommended_model_config(3.0, tiny_mlx, compressed=True).key_rope
        is None
    )
    assert options.recommended_model_config(6.0, tiny_mlx).key_rope is None
