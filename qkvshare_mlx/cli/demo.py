"""``qkvshare demo``: the default model in MLX and transformers, then one GSM8K answer.

1. Load the default model (SmolLM2-135M-Instruct) in both runtimes and show that
   their next-token logits agree.
2. Answer the first GSM8K test problem with ``mlx_lm.generate`` (greedy).
"""

import argparse
import time

from .. import gsm8k
from ..models import load_model, resolve_model
from .doctor import cross_runtime_check


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkvshare demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=200, help="answer length limit (tokens)"
    )
    parser.add_argument(
        "--problem", type=int, default=0, help="index of the GSM8K test problem"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    model_path = resolve_model(args.model)
    problem = gsm8k.load_problems("test", n=args.problem + 1)[args.problem]

    # 1. Both runtimes, same weights, same prompt.
    print(f"model: {model_path}")
    check = cross_runtime_check(model_path)
    print(
        f"MLX vs transformers, last-position logits over {check['prompt_tokens']} "
        f"tokens: max |diff| = {check['logits_max_abs_diff']:.2e}, "
        f"same next token: {check['argmax_agree']} ({check['argmax_token']!r})"
    )

    # 2. One GSM8K answer, greedy, through the chat template.
    import mlx_lm

    model, tokenizer = load_model(model_path)
    messages = [{"role": "user", "content": problem["question"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = time.perf_counter()
    reply = mlx_lm.generate(model, tokenizer, prompt, max_tokens=args.max_tokens)
    seconds = time.perf_counter() - start
    predicted = gsm8k.extract_answer(reply)
    print(f"\nGSM8K test[{args.problem}]: {problem['question']}\n")
    print(f"model ({seconds:.1f} s): {reply.strip()}\n")
    verdict = "correct" if predicted == problem["final"] else "wrong"
    print(f"extracted answer: {predicted}   gold: {problem['final']}   ({verdict})")
    return 0
