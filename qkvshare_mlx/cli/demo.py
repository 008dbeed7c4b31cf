"""``qkvshare demo``: three agents solve a GSM8K problem, handing on CacheCards.

A solver, a checker and an answerer (the default model, greedy) work on one
GSM8K test problem after a few worked examples. Each agent appends its turn
to the conversation and hands the whole context on as a quantized CacheCard
(the next card keeps the previous card's codes and adds its own tokens). For
each handoff the demo prints the card (tokens, effective bits, bytes against
an fp16 cache) and the receiver's time to first token measured live: with
the card against re-reading the text (re-prefill).
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from .. import agents as A
from ..card import CacheCard
from ..chat import ChatFormat
from ..evals import gsm8k
from ..evals.roles import gsm8k_agents
from ..inject import inject
from ..models import load_model, resolve_model
from . import options


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkvshare demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--problem", type=int, default=0, help="index of the GSM8K test problem"
    )
    parser.add_argument(
        "--controller", default="saliency", help="bit-allocation controller"
    )
    parser.add_argument(
        "--budget-bits",
        type=float,
        default=options.RECOMMENDED_BUDGET,
        help="card bit budget (default: the recommended setting's)",
    )
    parser.add_argument(
        "--shots", type=int, default=4, help="worked train examples in the context"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="reply length limit per agent"
    )
    parser.add_argument(
        "--reps", type=int, default=1, help="timed TTFT runs per measurement"
    )
    parser.add_argument(
        "--save-cards", default=None, help="folder to write each hop's card to"
    )
    return parser


def time_to_first_token(model, prompt: list[int], card: CacheCard | None = None):
    """Seconds from receiving the context to the first generated token.

    With a card: inject it, prefill the prompt tokens after it, sample one
    token. Without: prefill the whole prompt (the re-prefill baseline).

    Returns:
        ``(seconds, first token id)``.
    """
    tic = time.perf_counter()
    if card is None:
        cache, cached = make_prompt_cache(model), 0
    else:
        cache, cached = inject(card, model, mode="dequantize"), card.n_tokens
    token, _ = next(
        generate_step(
            mx.array(prompt[cached:]), model, prompt_cache=cache, max_tokens=1
        )
    )
    token = int(token)
    return time.perf_counter() - tic, token


def _ttft(model, prompt, card, reps):
    """Median of ``reps`` timed runs (the chain has already warmed MLX up)."""
    return statistics.median(
        time_to_first_token(model, prompt, card)[0] for _ in range(reps)
    )


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    model_path = resolve_model(args.model)
    problem = gsm8k.load_problems("test", n=args.problem + 1)[args.problem]
    shots = gsm8k.load_problems("train", n=args.shots) if args.shots else []
    model, tokenizer = load_model(model_path)
    chat = ChatFormat(tokenizer, [(p["question"], p["answer"]) for p in shots])
    middle, answerer = gsm8k_agents(
        2, middle_tokens=args.max_tokens, answer_tokens=args.max_tokens
    )
    config = options.recommended_model_config(args.budget_bits, model)
    handoff = A.Handoff(args.controller, args.budget_bits, config)

    # 1. the chain: solver -> checker -> answerer, cards handed on in memory
    print(f"model: {model_path}")
    print(f"GSM8K test[{args.problem}]: {problem['question']}\n")
    print(
        f"{len(shots)} worked examples in the context; handoff: {args.controller} "
        f"cards at {args.budget_bits} bits\n"
    )
    run = A.run_chain(
        model,
        tokenizer,
        chat,
        problem["question"],
        middle,
        answerer,
        handoff,
        save_cards=args.save_cards,
    )
    receivers = [run.tokens[: run.replies[1][0]], run.finals[2]["prompt"]]
    names = [a.role for a in middle] + [answerer.role]

    # 2. each agent's turn, the card it hands on, the receiver's TTFT
    for k, agent in enumerate(middle):
        print(f"--- agent {k + 1} ({agent.role}): {agent.instruction}")
        print(chat.text(run.reply_ids(k)).strip())
        card = run.cards[k]
        size = options.size_line(card, len(card.to_bytes()))
        print(f"  -> card to {names[k + 1]}: {card.n_tokens} tokens, {size}")
        with_card = _ttft(model, receivers[k], card, args.reps)
        reprefill = _ttft(model, receivers[k], None, args.reps)
        print(
            f"  {names[k + 1]}'s time to first token: {1000 * with_card:.0f} ms with "
            f"the card, {1000 * reprefill:.0f} ms re-prefilling "
            f"{len(receivers[k])} tokens ({reprefill / with_card:.1f}x)\n"
        )
    text = run.finals[2]["text"]
    print(f"--- agent 3 ({answerer.role}): {answerer.instruction}")
    print(text.strip())
    predicted = gsm8k.extract_answer(text)
    verdict = "correct" if gsm8k.numeric_match(predicted, problem["final"]) else "wrong"
    print(f"\nextracted answer: {predicted}   gold: {problem['final']}   ({verdict})")
    if args.save_cards:
        print(f"cards written to {args.save_cards}/hop1.qkv, hop2.qkv")
    return 0
