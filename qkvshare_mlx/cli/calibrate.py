"""``qkvshare calibrate``: measure a model's layer sensitivity, once.

    qkvshare calibrate --text notes1.txt notes2.txt ... --out smollm2.lw.json
    qkvshare make-card -p ... --layer-weights smollm2.lw.json --out card.qkv

Each text file is one calibration sample, in the kind of text the cards
will carry: its last ``--follow`` tokens are fed through a card of the rest
(:func:`qkvshare_mlx.sensitivity.measure_sensitivity`, the recommended card
at ``--budget-bits``). Each sample costs two short forwards per layer. The
profile is a small JSON file; ``--layer-weights`` hands it to the allocator.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import ConfigError
from ..formats import QuantConfig
from . import options


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkvshare calibrate",
        description="Measure how much each layer's key and value errors move the "
        "model's output, for --layer-weights.",
    )
    p.add_argument(
        "--model", help="model folder or hub id (default: the embedded model)"
    )
    p.add_argument(
        "--text",
        nargs="+",
        required=True,
        metavar="FILE",
        help="calibration texts, one sample per file (a few hundred tokens or more)",
    )
    p.add_argument("--out", required=True, help="the profile (JSON) to write")
    p.add_argument(
        "--follow",
        type=int,
        default=64,
        help="tokens of each text fed through the card (default: 64)",
    )
    p.add_argument(
        "--budget-bits",
        type=float,
        default=4.5,
        help="the budget of the cards measured (default: 4.5)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # 1. everything that needs no model
    out = options.check_writable(args.out, "--out")
    options.check_budget_value(args.budget_bits, QuantConfig())
    if args.follow < 1:
        raise ConfigError(f"--follow must be >= 1 but got {args.follow}")
    texts = []
    for name in args.text:
        path = options.check_readable(name, "--text")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--text {name}: cannot read it as UTF-8 ({e})") from None
    # 2. the model and the measurement
    from ..chat import prompt_ids
    from ..models import load_model
    from ..sensitivity import measure_sensitivity, text_samples

    model, tokenizer = load_model(args.model)
    samples = text_samples(
        [prompt_ids(tokenizer, t) for t in texts], follow=args.follow
    )
    config = options.recommended_model_config(args.budget_bits, model)
    tic = time.perf_counter()

    def progress(done, total):
        print(
            f"sample {done}/{total} ({time.perf_counter() - tic:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    prof = measure_sensitivity(
        model, samples, budget_bits=args.budget_bits, config=config, progress=progress
    )
    prof.save(out)
    w = [x for pair in prof.weights for x in pair]
    print(
        f"wrote {out}: {prof.n_layers} layers, {len(samples)} samples, "
        f"weights {min(w):.3g} to {max(w):.3g}",
        file=sys.stderr,
    )
    return 0
