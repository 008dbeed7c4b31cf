"""The whole GSM8K study from parsed options, resumable through its state.

Per problem, in one process: the reference chain, the teacher-forced grid,
generation (``phases``); then the state is aggregated (``report``). The
options are an ``argparse.Namespace`` as ``qkvshare eval``'s parser makes it
(``qkvshare_mlx.cli.eval``, where the protocol and every option are
documented); this module parses nothing and prints only its progress bar,
on stderr.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..chat import ChatFormat
from ..errors import ConfigError
from ..models import load_model
from .gsm8k import load_problems
from .phases import generated, get_reference, teacher_forced
from .report import report
from .roles import gsm8k_agents
from .state import State

# the default grid
CONTROLLERS = ["uniform", "sink-recent", "saliency", "topology"]
BUDGETS = [2.5, 3.0, 4.0, 4.5, 6.0]
HOPS = [1, 2, 4, 8]


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.done, self.label = max(total, 1), 0, label
        self.t0 = time.perf_counter()

    def step(self, note: str = "") -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac else 0
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
            f"{el:6.0f}s eta {eta:6.0f}s {note[:40]:<40}"
        )
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


class Context:
    """What every phase needs: the model, the chat format with its few-shot
    turns, the grid and the agents' reply lengths."""

    def __init__(self, args, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        shots = load_problems("train", args.shots) if args.shots else []
        self.chat = ChatFormat(tokenizer, [(p["question"], p["answer"]) for p in shots])
        self.hops = sorted(args.hops)
        self.gen_hops = sorted(args.gen_hops)
        self.controllers, self.budgets = args.controllers, args.budgets
        self.gen_controllers = args.gen_controllers
        self.middle_tokens, self.answer_tokens = args.middle_tokens, args.answer_tokens

    def agents(self, hops):
        return gsm8k_agents(
            hops, middle_tokens=self.middle_tokens, answer_tokens=self.answer_tokens
        )


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ConfigError(f"--shard must be K/N with 0 <= K < N but got {text!r}")
    return k, n


def run(args, command: str) -> dict:
    """Run (or resume) the study ``args`` describes, then report it.

    Args:
        args: ``qkvshare eval``'s options, plus ``json_given`` (whether
            ``--json`` was given: ``--quick`` writes beside the default
            otherwise).
        command: the command line, recorded in the state.

    Returns:
        The aggregated result (:func:`qkvshare_mlx.evals.report.report`).
    """
    if args.quick:
        args.problems, args.gen_problems, args.shots = 1, 1, 1
        args.hops, args.gen_hops = [1, 2], [1]
        args.controllers, args.budgets = ["uniform", "saliency"], [3.0, 4.5]
        args.gen_controllers, args.middle_tokens, args.answer_tokens = (
            ["saliency"],
            12,
            12,
        )
        if not args.json_given:
            args.json = str(Path(args.json).with_suffix("")) + "_quick.json"
    gen_problems = args.problems if args.gen_problems is None else args.gen_problems
    if args.gen_hops and not set(args.gen_hops) <= set(args.hops):
        args.hops = sorted(set(args.hops) | set(args.gen_hops))
    state_path = args.state or str(Path(args.json).with_suffix(".state.jsonl.gz"))
    if args.quick:
        Path(state_path).unlink(missing_ok=True)
    state = State(state_path)
    meta = {
        "bench": "eval_gsm8k",
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "dtype": "float32",
        "machine": f"{platform.system()} {platform.machine()}",
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "shots": args.shots,
        "middle_tokens": args.middle_tokens,
        "answer_tokens": args.answer_tokens,
        "hops_grid": args.hops,
        "gen_hops": args.gen_hops,
        "gen_controllers": args.gen_controllers,
        "problems_requested": args.problems,
        "gen_problems_requested": gen_problems,
    }
    if not args.report:
        runs = state.of_kind("meta")
        state.add(
            {
                "kind": "meta",
                "problem": -1,
                "mode": "command",
                "budget_bits": None,
                "hops": len(runs),
                "command": command,
            }
        )
        model, tokenizer = load_model(args.model)
        ctx = Context(args, model, tokenizer)
        problems = load_problems("test", max(args.problems, gen_problems))
        # per problem: reference, teacher-forced grid, generation; so a run
        # stopped at any point leaves whole problems behind
        n = max(args.problems, gen_problems)
        per = len(ctx.controllers) * len(ctx.budgets) + 1
        prog = Progress(n * per, "problems")
        k, of = _shard(args.shard)
        for i in range(n):
            if i % of != k:
                prog.done += per
                continue
            ref = get_reference(state, ctx, i, problems[i])
            if i < args.problems:
                teacher_forced(state, ctx, i, ref, prog)
            else:
                prog.done += per - 1
            if i < gen_problems:
                generated(state, ctx, i, problems[i], ref, prog)
            else:
                prog.step()
    return report(state, args, meta)
