"""``qkvshare eval``: GSM8K agent chains, handoff fidelity by controller, budget, hops.

Protocol (the study is qkvshare_mlx/evals/): the first ``--problems`` GSM8K test
problems; ``--shots`` train exemplars as few-shot chat turns; middle agents
solver -> checker -> calculator -> solver ... (``--middle-tokens`` greedy
tokens each) and an answerer asked for ``#### <number>`` (``--answer-tokens``).
A chain of h hops has h middle agents, then the answerer.

Per problem, in one process:

1. **Reference**: the ``exact`` chain (full-precision cache handed on in
   memory), real generation at every hop, the answerer branched after each
   hop count in ``--hops`` (the middle agents are shared).
2. **Teacher-forced grid** (cheap, no generation): for each controller and
   budget, cards are made hop by hop along the reference transcript, each
   inheriting the previous card's codes; the answerer's prompt and reply
   from the reference are fed through the card's cache and compared with
   the exact cache: KL(exact || card) and top-1 agreement of the next-token
   distributions. Every row also checks that the K/V of the tokens quantized
   at hop 1 are bit-identical in the last card.
3. **Generation** (first ``--gen-problems`` problems): ``--gen-controllers``
   at every budget, hops ``--gen-hops``, real generation at every hop:
   accuracy (numeric exact match), agreement of the final answer with the
   exact run, first generated token of the answerer that differs from the
   exact run's.

Controller names may carry a rotation (``saliency+hadamard``: cards quantized
after a Hadamard rotation, ``QuantConfig.rotation``).

Resumable: every result is appended to ``--state`` (JSON lines keyed by
kind, problem, mode, budget, hops); a rerun skips what is done. ``--report``
only aggregates the state into ``--json``, a markdown table beside it and
plots. ``bench/eval_gsm8k.py`` runs this with its outputs in bench/results/.

    qkvshare eval --model mlx-community/Qwen2.5-0.5B-Instruct-bf16 --problems 20
"""

from __future__ import annotations

import argparse
import sys

from ..evals.report import summary
from ..evals.run import BUDGETS, CONTROLLERS, HOPS, run

DEFAULT_JSON = "qkvshare_eval.json"


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def setup_arg_parser(default_json: str = DEFAULT_JSON) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare eval",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--model", default=None, help="model folder or hub id")
    p.add_argument("--problems", type=int, default=150)
    p.add_argument(
        "--gen-problems",
        type=int,
        default=None,
        help="problems with generation metrics (default: --problems)",
    )
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--hops", type=_list(int), default=HOPS)
    p.add_argument("--gen-hops", type=_list(int), default=[1, 4])
    p.add_argument("--controllers", type=_list(str), default=CONTROLLERS)
    p.add_argument("--budgets", type=_list(float), default=BUDGETS)
    p.add_argument(
        "--gen-controllers", type=_list(str), default=["uniform", "saliency"]
    )
    p.add_argument("--middle-tokens", type=int, default=48)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument(
        "--state",
        default=None,
        help="JSONL state, gzip if it ends in .gz (default: <json>.state.jsonl.gz)",
    )
    p.add_argument("--json", default=default_json, help="aggregated results")
    p.add_argument(
        "--shard",
        default="0/1",
        help="K/N: only problems i with i %% N == K (run N processes, one "
        "state file each, then concatenate the states and --report)",
    )
    p.add_argument("--quick", action="store_true", help="1 problem, tiny grid, < 60 s")
    p.add_argument("--report", action="store_true", help="only aggregate the state")
    return p


def parse_args(
    argv: list[str], *, default_json: str = DEFAULT_JSON
) -> argparse.Namespace:
    """The options, plus ``json_given`` (``--quick`` writes beside the default
    ``--json`` unless one was given)."""
    args = setup_arg_parser(default_json).parse_args(argv)
    args.json_given = any(a == "--json" or a.startswith("--json=") for a in argv)
    return args


def main(
    argv: list[str] | None = None,
    *,
    default_json: str = DEFAULT_JSON,
    prog: str = "qkvshare eval",
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, default_json=default_json)
    result = run(args, " ".join([prog, *argv]))
    print(summary(result, args.json))
    return 0
