"""GSM8K agent chains: handoff fidelity by controller, bit budget and hop depth.

The evaluation is ``qkvshare_mlx.evals`` (its options and protocol are those
of ``qkvshare eval``, documented in qkvshare_mlx/cli/eval.py); this script runs
it with its outputs in bench/results/ (eval_gsm8k.json, .md, .state.jsonl.gz,
_bits.png, _hops.png).

    python bench/eval_gsm8k.py --quick              # < 60 s on a free CPU
    python bench/eval_gsm8k.py --problems 150       # the full grid
    python bench/eval_gsm8k.py --report             # re-aggregate the state
"""

import sys
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

from qkvshare_mlx.cli.eval import parse_args
from qkvshare_mlx.evals.report import summary
from qkvshare_mlx.evals.run import run

RESULTS = Path(__file__).parent / "results"
PROG = "python bench/eval_gsm8k.py"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, default_json=str(RESULTS / "eval_gsm8k.json"))
    result = run(args, " ".join([PROG, *argv]))
    print(summary(result, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
