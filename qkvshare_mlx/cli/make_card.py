"""``qkvshare make-card``: the sender, like ``mlx_lm.cache_prompt``.

    qkvshare make-card -p "Natalia sold clips to..." --out planner.qkv
    qkvshare make-card -p - --generate 64 --out planner.qkv < task.txt

Without ``--generate`` the card covers the prompt as an open user message
(what ``mlx_lm.cache_prompt`` caches): a receiver's prompt continues it.
With ``--generate N`` the sender first writes its reply (streamed) and the
card covers the closed conversation: a receiver's prompt is a new turn.
The mlx-lm equivalent of the first form is
``mlx_lm.cache_prompt --prompt ... --prompt-cache-file cache.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import ConfigError
from . import options


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare make-card",
        description="Prefill a prompt (optionally answer it) and write its KV "
        "cache as a CacheCard.",
    )
    options.add_model(p)
    options.add_prompt(p, sender=True)
    p.add_argument("--out", required=True, help="the card file to write")
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="first generate the sender's reply (at most N tokens); the card covers it",
    )
    options.add_card(p)
    options.add_generation(p, max_tokens=False)  # --generate N is the count
    options.add_security(p, receiver=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # 1. everything that needs no model
    out = options.check_writable(args.out, "--out")
    options.check_budget(args)
    if args.generate < 0:
        raise ConfigError(f"--generate must be >= 0 but got {args.generate}")
    if args.generate and args.runtime == "hf":
        raise ConfigError("--generate needs --runtime mlx")
    config, plan = options.quant_config(args), options.plan(args)
    sampling = options.sampling(args)
    key = options.card_key(args)
    sens = options.sensitivity(args)
    prompt = options.prompt_text(args.prompt)
    chat = False if args.no_chat_template else None
    # 2. the model, the card
    tic = time.perf_counter()
    if args.runtime == "hf":
        card = _hf_card(args, prompt, chat, config, plan, sens)
    else:
        card = _mlx_card(args, prompt, chat, config, plan, sampling, sens)
    options.check_card_meets_budget(card, args.budget_bits)
    card.save(out, key=key)
    print(
        f"wrote {out}: {card.n_tokens} tokens, "
        f"{options.size_line(card, out.stat().st_size)} "
        f"({1000 * (time.perf_counter() - tic):.0f} ms)",
        file=sys.stderr,
    )
    return 0


def _extra(args) -> dict:
    return options.recorded_model(args.model)


def _mlx_card(args, prompt, chat, config, plan, sampling, sens):
    from ..conversation import CardOptions, send
    from ..models import load_model

    options.seed_now(args)
    model, tokenizer = load_model(args.model)
    config = options.quant_config(args, head_dims=options.head_dims(model), model=model)
    opts = CardOptions(
        args.controller,
        args.budget_bits,
        config,
        plan,
        _extra(args),
        sensitivity=options.model_sensitivity(sens, model),
    )
    card, gen = send(
        model,
        tokenizer,
        prompt,
        system_prompt=args.system_prompt,
        generate_tokens=args.generate,
        sampling=sampling,
        chat=chat,
        card=opts,
        on_text=options.stream_text,
        prompt_progress_callback=options.progress_printer(args),
    )
    if gen is not None:
        options.end_stream(gen, args)
    return card


def _hf_card(args, prompt, chat, config, plan, sens):
    from qkvshare_converters.hf_cache import dynamic_cache_to_card, hf_prefill
    from qkvshare_converters.hf_model import load_hf_model

    from ..conversation import start

    model, tokenizer = load_hf_model(args.model)
    config = options.quant_config(args, head_dims=options.head_dims(model), model=model)
    sens = options.model_sensitivity(sens, model)  # a foreign profile fails here
    conv = start(tokenizer, prompt, system_prompt=args.system_prompt, chat=chat)
    cache, stats, _ = hf_prefill(model, conv.tokens)
    return dynamic_cache_to_card(
        cache,
        conv.tokens,
        model,
        tokenizer,
        controller=args.controller,
        budget_bits=args.budget_bits,
        config=config,
        stats=stats,
        sensitivity=sens,
        plan=plan,
        user={**_extra(args), **conv.metadata()},
    )
