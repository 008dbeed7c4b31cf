"""``qkvshare chain SPEC``: N agents hand a conversation on, one card per hop.

SPEC is a JSON or TOML file::

    {"system_prompt": "You are a careful assistant.",      # optional
     "model": "path/or/id",                                # optional
     "agents": [
        {"role": "solver", "prompt": "Solve: ...", "max_tokens": 64,
         "controller": "saliency", "budget_bits": 4.5},
        {"role": "checker", "prompt": "Check the solution."},
        {"role": "answerer", "prompt": "Give only the number.", "max_tokens": 16}]}

Agent 0 answers its prompt and writes ``hop1.qkv``; each next agent
continues from the last card, adds its turn, answers and writes the next
card (``hop<k>.qkv``), inheriting every earlier segment bit for bit. Prints
a table per hop (TTFT, bytes, effective bits) and writes it as JSON.
mlx-lm has no equivalent; by hand it is ``make-card --generate`` then
``generate --out`` per hop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..formats import QuantConfig
from ..inject import MODES
from . import options

_AGENT_KEYS = {"role", "prompt", "max_tokens", "controller", "budget_bits"}
_SPEC_KEYS = {"agents", "system_prompt", "model"}


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare chain",
        description="Run a chain of agents from a JSON or TOML spec, one card per hop.",
    )
    p.add_argument("spec", help="the chain spec (.json or .toml)")
    p.add_argument("--model", help="model folder or hub id (default: the spec's)")
    p.add_argument("--out-dir", default=".", help="folder for hop<k>.qkv (default: .)")
    p.add_argument("--json", help="write the per-hop table as JSON here")
    p.add_argument("--mode", choices=MODES, default="dequantize")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    options.add_layer_weights(p)
    options.add_security(p, receiver=False)
    return p


def load_spec(path: Path) -> dict:
    """The chain spec, checked: a list of at least two agents with prompts."""
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(
                    f"{path}: TOML specs need Python 3.11 (tomllib); use JSON"
                ) from None
            spec = tomllib.loads(text)
        else:
            spec = json.loads(text)
    except ValueError as e:
        raise ConfigError(
            f"{path}: not valid {path.suffix[1:] or 'JSON'}: {e}"
        ) from None
    if not isinstance(spec, dict) or set(spec) - _SPEC_KEYS:
        raise ConfigError(
            f"{path}: expected an object with keys {sorted(_SPEC_KEYS)}, got "
            f"{sorted(spec) if isinstance(spec, dict) else type(spec).__name__}"
        )
    agents = spec.get("agents")
    if not isinstance(agents, list) or len(agents) < 2:
        raise ConfigError(f"{path}: 'agents' must list at least 2 agents")
    for i, a in enumerate(agents):
        if not isinstance(a, dict) or not isinstance(a.get("prompt"), str):
            raise ConfigError(f"{path}: agents[{i}] needs a 'prompt' string")
        if set(a) - _AGENT_KEYS:
            raise ConfigError(
                f"{path}: agents[{i}] has unknown keys {sorted(set(a) - _AGENT_KEYS)}"
                f" (expected some of {sorted(_AGENT_KEYS)})"
            )
        _check_agent(path, i, a)
    return spec


def _check_agent(path: Path, i: int, a: dict) -> None:
    from ..quant.controllers import CONTROLLERS

    where = f"{path}: agents[{i}]"
    if not isinstance(a.get("role", ""), str):
        raise ConfigError(f"{where}.role: expected a string, got {a['role']!r:.40}")
    n = a.get("max_tokens", 64)
    if type(n) is not int or n < 1:
        raise ConfigError(f"{where}.max_tokens: expected an int >= 1, got {n!r:.40}")
    b = a.get("budget_bits", options.RECOMMENDED_BUDGET)
    if type(b) not in (int, float):
        raise ConfigError(f"{where}.budget_bits: expected a number, got {b!r:.40}")
    c = a.get("controller", "saliency")
    if c not in CONTROLLERS:
        raise ConfigError(
            f"{where}.controller: expected one of {sorted(CONTROLLERS)}, got {c!r:.40}"
        )


def chain_agents(spec: dict) -> list:
    """The spec's agents as :class:`~qkvshare_mlx.conversation.ChainAgent`."""
    from ..conversation import ChainAgent

    return [
        ChainAgent(
            role=a.get("role", f"agent{i}"),
            prompt=a["prompt"],
            max_tokens=int(a.get("max_tokens", 64)),
            controller=a.get("controller", "saliency"),
            budget_bits=float(a.get("budget_bits", options.RECOMMENDED_BUDGET)),
        )
        for i, a in enumerate(spec["agents"])
    ]


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # 1. everything that needs no model
    spec = load_spec(options.check_readable(args.spec, "spec"))
    agents = chain_agents(spec)
    out_dir = Path(args.out_dir)
    options.check_writable(str(out_dir / "hop1.qkv"), "--out-dir")
    if args.json:
        options.check_writable(args.json, "--json")
    for a in agents:  # every budget before the model loads
        options.check_budget_value(a.budget_bits, QuantConfig())
    sampling = options.sampling(
        argparse.Namespace(
            temp=args.temp, top_p=0.0, min_p=0.0, top_k=0, seed=args.seed
        )
    )
    key = options.card_key(args)
    sens = options.sensitivity(args)
    # 2. the chain
    from ..conversation import run_chat_chain
    from ..models import load_model

    options.seed_now(args)
    model, tokenizer = load_model(args.model or spec.get("model"))
    # one rotation per chain (a card keeps its inherited one): the
    # recommended settings of its cheapest budget
    config = options.recommended_model_config(
        min(a.budget_bits for a in agents), model, compressed=args.mode == "compressed"
    )
    hops, cards = run_chat_chain(
        model,
        tokenizer,
        agents,
        system_prompt=spec.get("system_prompt"),
        sampling=sampling,
        mode=args.mode,
        config=config,
        sensitivity=options.model_sensitivity(sens, model),
    )
    from ..conversation import card_size

    for k, card in enumerate(cards, start=1):
        path = card.save(out_dir / f"hop{k}.qkv", key=key)
        hops[k - 1].update(card_size(card, path.stat().st_size), card=str(path))
    _print_table(hops)
    if args.json:
        Path(args.json).write_text(json.dumps({"hops": hops}, indent=2) + "\n")
    return 0


def _print_table(hops: list[dict]) -> None:
    head = f"{'hop':>3}  {'role':<12} {'TTFT ms':>8} {'reused':>6} {'card tok':>8} "
    head += f"{'bytes':>10} {'x fp16':>6} {'bits':>5}"
    print(head)
    for k, h in enumerate(hops):
        ttft = "-" if h.get("ttft_ms") is None else f"{h['ttft_ms']:.1f}"
        row = f"{k:>3}  {h['role']:<12} {ttft:>8} {h.get('n_reused', 0):>6} "
        if "file_bytes" in h:
            row += (
                f"{h['card_tokens']:>8} {h['file_bytes']:>10,} "
                f"{h['x_smaller_than_fp16']:>6.2f} {h['effective_bits']:>5.2f}"
            )
        print(row)
    for k, h in enumerate(hops):
        print(f"[{k}] {h['role']}: {' '.join(h.get('reply', '').split())}")
    sys.stdout.flush()
