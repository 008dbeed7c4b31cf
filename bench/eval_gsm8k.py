"""GSM8K agent chains: handoff fidelity by controller, bit budget and hop depth.

The evaluation is ``qkvshare eval`` (qkvshare_mlx/cli/eval.py, where the
protocol is documented); this script runs it with its outputs in
bench/results/ (eval_gsm8k.json, .md, .state.jsonl.gz, _bits.png, _hops.png).

    python bench/eval_gsm8k.py --quick              # < 60 s on a free CPU
    python bench/eval_gsm8k.py --problems 150       # the full grid
    python bench/eval_gsm8k.py --report             # re-aggregate the state
"""

import sys
from pathlib import Path

from qkvshare_mlx.cli import eval as evaluation

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    sys.exit(
        evaluation.main(
            default_json=str(RESULTS / "eval_gsm8k.json"),
            prog="python bench/eval_gsm8k.py",
        )
    )
