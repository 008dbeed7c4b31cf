"""``qkvshare generate``: the receiver, like ``mlx_lm.generate --prompt-cache-file``.

    qkvshare generate --card planner.qkv -p "Check the answer." --out checker.qkv

Streams the reply; ``--out`` hands on a card holding this agent's turn and
reply, inheriting the input card's segments bit for bit. ``--model``
defaults to the model the card names (else the embedded model). The mlx-lm
equivalent, for a card converted with ``qkvshare convert``:
``mlx_lm.generate --prompt-cache-file cache.safetensors -p "Check the answer."``.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..generation import check_max_tokens
from ..inject import MODES, POLICIES
from . import options


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare generate",
        description="Continue a conversation from a CacheCard and generate.",
    )
    options.add_model(p, card_default=True)
    p.add_argument("--card", required=True, help="the card to continue from")
    options.add_prompt(p, sender=False)
    p.add_argument("--out", help="hand on a card of the conversation so far")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="dequantize",
        help="inject as float KVCache, streamed, or kept compressed (mlx only)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="prefix",
        help="prompt alignment: reuse the common prefix, or require the card's "
        "tokens (default: prefix)",
    )
    options.add_card(p)
    options.add_generation(p)
    options.add_security(p, receiver=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # 1. everything that needs no model
    path = options.check_readable(args.card, "--card")
    out = options.check_writable(args.out, "--out") if args.out else None
    if out is not None:
        options.check_budget(args)
        if args.runtime == "hf":
            raise ConfigError("--out needs --runtime mlx")
    if args.runtime == "hf" and args.mode != "dequantize":
        raise ConfigError(f"--mode {args.mode} needs --runtime mlx")
    check_max_tokens(args.max_tokens)
    plan = options.plan(args)
    sampling = options.sampling(args)
    key = options.card_key(args)
    sens = options.sensitivity(args)
    prompt = options.prompt_text(args.prompt)

    from ..card import CacheCard
    from ..conversation import Conversation

    card = CacheCard.load(path, key=key)  # validated before any model loads
    conv = Conversation.of_card(card)  # its conversation metadata too
    if out is not None and conv.messages is None:
        raise ConfigError(
            "--out: handing on needs the card's conversation, and this card was "
            "made from token ids (e.g. converted from an mlx-lm prompt cache)"
        )
    model_arg = options.model_of(card, args.model)
    # 2. the model, the reply
    if args.runtime == "hf":
        gen = _hf(args, card, model_arg, prompt, sampling)
        handed = None
    else:
        gen, handed = _mlx(args, card, model_arg, prompt, sampling, out, plan, sens)
    options.end_stream(gen, args)
    if handed is not None:
        options.check_card_meets_budget(handed, args.budget_bits, inherited=card)
        handed.save(out, key=key)
        print(
            f"wrote {out}: {handed.n_tokens} tokens, "
            f"{options.size_line(handed, out.stat().st_size)}",
            file=sys.stderr,
        )
    return 0


def _mlx(args, card, model_arg, prompt, sampling, out, plan, sens):
    from ..conversation import CardOptions, receive
    from ..models import load_model

    options.seed_now(args)
    model, tokenizer = load_model(model_arg)
    hand_on = None
    if out is not None:
        hand_on = CardOptions(
            args.controller,
            args.budget_bits,
            options.quant_config(
                args, inherited=card, head_dims=options.head_dims(model), model=model
            ),
            plan,
            options.recorded_model(model_arg),
            sensitivity=options.model_sensitivity(sens, model),
        )
    return receive(
        card,
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampling=sampling,
        mode=args.mode,
        policy=args.policy,
        hand_on=hand_on,
        on_text=options.stream_text,
        allow_other_weights=args.allow_other_weights,
        prompt_progress_callback=options.progress_printer(args),
    )


def _hf(args, card, model_arg, prompt, sampling):
    from qkvshare_converters.hf_cache import continue_hf
    from qkvshare_converters.hf_model import load_hf_model

    from ..conversation import receiver_ids

    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model, tokenizer = load_hf_model(model_arg)
    _, ids, _ = receiver_ids(tokenizer, card, prompt)
    return continue_hf(
        card,
        model,
        tokenizer,
        ids,
        max_tokens=args.max_tokens,
        policy=args.policy,
        sampling=sampling,
        on_text=options.stream_text,
        allow_other_weights=args.allow_other_weights,
    )
