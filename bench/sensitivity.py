"""Layer sensitivity of a model, measured on GSM8K train problems.

Writes the profile the allocator reads (``qkvshare make-card
--layer-weights``, ``TokenStats.layer_weights``) and a table of it. The
calibration samples are train problems (never the evaluation set): two
exemplars, the question, and the first ``--follow`` tokens of its reference
solution teacher-forced through a card of the rest
(:func:`qkvshare_mlx.sensitivity.measure_sensitivity`).

    python bench/sensitivity.py --samples 12 --out bench/results/sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIRST_TRAIN = 100  # the samples' first train problem (0 and 1 are the shots)


def calibration_samples(tokenizer, n: int, follow: int):
    from qkvshare_mlx.chat import prompt_ids, render
    from qkvshare_mlx.conversation import has_chat_template
    from qkvshare_mlx.evals import gsm8k

    chat = has_chat_template(tokenizer)
    train = gsm8k.load_problems("train", FIRST_TRAIN + n)
    shots, problems = train[:2], train[FIRST_TRAIN:]
    out = []
    for prob in problems:
        messages = []
        for ex in shots:
            messages += [
                {"role": "user", "content": ex["question"]},
                {"role": "assistant", "content": ex["answer"]},
            ]
        messages.append({"role": "user", "content": prob["question"]})
        # without a chat template, plain-text turns (as conversation.start)
        text = (
            render(tokenizer, messages, True)
            if chat
            else "\n\n".join(m["content"] for m in messages)
        )
        ctx = [int(t) for t in prompt_ids(tokenizer, text)]
        ans = tokenizer.encode(prob["answer"], add_special_tokens=False)[:follow]
        out.append((ctx, [int(t) for t in ans]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--follow", type=int, default=64)
    p.add_argument("--budget-bits", type=float, default=4.5)
    p.add_argument("--out", type=Path, default=RESULTS / "sensitivity.json")
    args = p.parse_args(argv)

    from qkvshare_mlx.cli.options import recommended_model_config
    from qkvshare_mlx.models import load_model
    from qkvshare_mlx.sensitivity import measure_sensitivity

    model, tokenizer = load_model(args.model)
    # the recommended card at the budget (README, Recommended settings; at
    # 4.5 bits: Hadamard, split K/V, pre-RoPE keys, widths 3-8)
    config = recommended_model_config(args.budget_bits, model)
    samples = calibration_samples(tokenizer, args.samples, args.follow)
    tic = time.perf_counter()

    def progress(done, total):
        print(f"[{time.perf_counter() - tic:6.0f} s] sample {done}/{total}", flush=True)

    prof = measure_sensitivity(
        model, samples, budget_bits=args.budget_bits, config=config, progress=progress
    )
    prof.save(args.out)
    w = np.asarray(prof.weights)
    lines = ["| layer | key weight | value weight |", "|---|---|---|"]
    lines += [f"| {i} | {k:.3g} | {v:.3g} |" for i, (k, v) in enumerate(w)]
    table = "\n".join(lines)
    print(table)
    command = shlex.join(["python", "bench/sensitivity.py", *(argv or sys.argv[1:])])
    meta = {
        "bench": "sensitivity",
        "command": command,
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "samples": args.samples,
        "context_tokens_mean": round(float(np.mean([len(c) for c, _ in samples])), 1),
        "follow_tokens": args.follow,
        "card": (
            f"saliency + {config.rotation} rotation"
            + (" + split" if config.split_kv else "")
            + (" + pre-RoPE" if config.key_rope is not None else "")
            + f", widths {min(config.widths)}-8"
        ),
        "budget_bits": args.budget_bits,
        "spread_max_over_min": round(float(w.max() / w.min()), 1),
        "machine": platform.platform(),
        "mlx": mx.__version__,
        "elapsed_s": round(time.perf_counter() - tic, 1),
    }
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
