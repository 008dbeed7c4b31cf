"""``qkvshare dist-demo``: two agents, two processes (or two Macs), one card over
mx.distributed.

Rank 0, the sender, prefills a context (a GSM8K problem by default) and sends
it as a CacheCard; rank 1, the receiver, verifies the card against its own
model, injects it, decodes greedily and prints its time to first token next
to that of re-prefilling the same prompt from scratch. Start both ranks with
(``qkvshare dist-demo`` runs the same, for one rank per process)::

    mlx.launch -n 2 --backend ring -- python -m qkvshare_mlx.cli.dist_demo
    mlx.launch --hostfile hosts.json --backend ring \
        -- python -m qkvshare_mlx.cli.dist_demo

Exit codes: 0 done, 2 bad input or card, 3 timeout, 4 transport failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import QKVShareError, TransportError, TransportTimeoutError

SENDER, RECEIVER = 0, 1
EXIT_OK, EXIT_INPUT, EXIT_TIMEOUT, EXIT_TRANSPORT = 0, 2, 3, 4


def setup_arg_parser() -> argparse.ArgumentParser:
    from ..quant.controllers import CONTROLLERS

    parser = argparse.ArgumentParser(
        prog="python -m qkvshare_mlx.cli.dist_demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--problem", type=int, default=0, help="index of the GSM8K test problem"
    )
    parser.add_argument(
        "--prompt", default=None, help="the sender's context (instead of GSM8K)"
    )
    parser.add_argument(
        "--controller",
        default="saliency",
        choices=sorted(CONTROLLERS),
        help="how bit widths are chosen per token",
    )
    parser.add_argument(
        "--budget-bits",
        type=float,
        default=4.5,
        help="average bits per K/V element, scales included",
    )
    parser.add_argument(
        "--mode",
        default="dequantize",
        choices=["dequantize", "compressed"],
        help="how the receiver holds the injected cache",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=200, help="answer length limit (tokens)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the receiver waits for the card (covers the sender's model "
        "load and prefill)",
    )
    return parser


def _say(rank: int, text: str) -> None:
    print(f"[rank {rank}] {text}", flush=True)


def _sender_prompt(tokenizer, args) -> tuple[list[int], dict]:
    """The context to hand over, and what the receiver may grade it against."""
    if args.prompt is not None:
        question, meta = args.prompt, {"task": "prompt"}
    else:
        from ..evals import gsm8k

        problem = gsm8k.load_problems("test", n=args.problem + 1)[args.problem]
        question = problem["question"]
        meta = {"task": "gsm8k", "problem": args.problem, "gold": problem["final"]}
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True), meta


def run_sender(transport, args) -> int:
    from ..handoff import make_card
    from ..models import load_model

    model, tokenizer = load_model(args.model)
    tokens, meta = _sender_prompt(tokenizer, args)
    tic = time.perf_counter()
    card = make_card(
        model,
        tokenizer,
        tokens,
        controller=args.controller,
        budget_bits=args.budget_bits,
        user={"from": "rank 0", **meta},
    )
    made = time.perf_counter() - tic
    tic = time.perf_counter()
    sent = transport.send(card, RECEIVER, timeout=args.timeout)
    _say(
        SENDER,
        f"card for {card.n_tokens} tokens made in {made:.2f} s, sent {sent} bytes "
        f"in {time.perf_counter() - tic:.2f} s ({card.effective_bits:.2f} bits per "
        f"element; float16 cache: {card.fp16_bytes} bytes)",
    )
    return EXIT_OK


def _baseline_ttft(model, tokens) -> tuple[float, int]:
    """Seconds to the first token when prefilling ``tokens`` from scratch."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    token, _ = next(generate_step(mx.array(tokens), model, max_tokens=1))
    return time.perf_counter() - tic, int(token)


def run_receiver(transport, args) -> int:
    from ..card import CacheCard
    from ..fingerprint import fingerprint
    from ..handoff import continue_from_card
    from ..models import load_model

    model, tokenizer = load_model(args.model)
    tic = time.perf_counter()
    data = transport.recv_bytes(SENDER, timeout=args.timeout)
    card = CacheCard.from_bytes(data, expect=fingerprint(model, tokenizer))
    _say(
        RECEIVER,
        f"received and verified {len(data)} bytes ({card.n_tokens} tokens, "
        f"{card.effective_bits:.2f} bits per element, widths "
        f"{card.width_histogram()}) after waiting {time.perf_counter() - tic:.2f} s",
    )
    prompt = card.tokens.tolist()
    _baseline_ttft(model, prompt[:8])  # warm-up, so neither timing pays for it
    gen = continue_from_card(
        card, model, tokenizer, prompt, mode=args.mode, max_tokens=args.max_tokens
    )
    tokens = gen.tokens
    base_s, base_first = _baseline_ttft(model, prompt)
    same = bool(tokens) and tokens[0] == base_first
    reply = gen.text
    _say(RECEIVER, f"reply: {reply.strip()}")
    _say(
        RECEIVER,
        f"TTFT from the card: {gen.ttft_ms:.1f} ms ({gen.n_reused} tokens "
        f"reused, {gen.n_prefilled} prefilled); re-prefill from text: "
        f"{1000 * base_s:.1f} ms; same first token: {same}",
    )
    if card.user.get("task") == "gsm8k":
        from ..evals import gsm8k

        predicted, gold = gsm8k.extract_answer(reply), card.user.get("gold")
        verdict = "correct" if predicted == gold else "wrong"
        _say(RECEIVER, f"answer: {predicted}   gold: {gold}   ({verdict})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    from ..blas import enable_openblas

    enable_openblas()  # run as a script, not through the dispatcher
    from ..distributed import DistributedTransport, init_group

    rank = "?"  # until the group is up
    try:
        transport = DistributedTransport(init_group("ring"))
        rank = transport.rank
        if rank == SENDER:
            return run_sender(transport, args)
        if rank == RECEIVER:
            return run_receiver(transport, args)
        return EXIT_OK  # ranks beyond 1 have no part in this demo
    except TransportTimeoutError as e:
        print(f"[rank {rank}] timeout: {e}", file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    except TransportError as e:
        print(f"[rank {rank}] transport error: {e}", file=sys.stderr, flush=True)
        return EXIT_TRANSPORT
    except QKVShareError as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # After a timeout a daemon thread may still be blocked inside MLX's receive;
    # leave without interpreter teardown so nothing waits on it.
    os._exit(code)
