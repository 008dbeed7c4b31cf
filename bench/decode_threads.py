"""The receiver's decode with and without the numpy BLAS limit, A/B in one process.

``qkvshare_mlx.blas.numpy_blas_threads`` holds numpy's bundled OpenBLAS to
one thread while the fast path decodes a card (the un-rotation's (D, D)
products run on its decode threads). This bench measures what that buys.
It makes the CLI's recommended card (5.5 bits, Hadamard, pre-RoPE keys,
the shipped layer profile) and the 3-bit adaptive card (unrotated: no
numpy BLAS in its decode, the control) of one sender prefill. Then it
times, repetitions shuffled, each card with the limit (``limited``) and
with the limit replaced by a no-op (``threaded``):

- ``dequantize``: ``inject(..., mode="dequantize")``, evaluated;
- ``stream``: ``inject(..., mode="stream")`` then the receiver's suffix
  forward and first token (the TTFT bench's receiver, less transport): the
  decode overlaps the forward.

Prints a table, writes JSON.

    python bench/decode_threads.py [--context 4096] [--reps 7]
"""

from __future__ import annotations  # noqa: I001  (qkvshare_mlx before mlx, below)

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from report import command_line, finish, ms_cell, timing  # noqa: E402  (bench/report.py)
from transcript import transcript_tokens  # noqa: E402  (bench/transcript.py)

from qkvshare_mlx.blas import numpy_blas_threads_now  # noqa: E402
from qkvshare_mlx.capture import prefill  # noqa: E402
from qkvshare_mlx.card import CacheCard  # noqa: E402
from qkvshare_mlx.cli.options import recommended_model_config  # noqa: E402
from qkvshare_mlx.fingerprint import fingerprint  # noqa: E402
from qkvshare_mlx.formats import QuantConfig  # noqa: E402
from qkvshare_mlx.inject import inject  # noqa: E402
from qkvshare_mlx.models import load_model  # noqa: E402
from qkvshare_mlx.quant import fastpath  # noqa: E402
from qkvshare_mlx.quant.controllers import with_sensitivity  # noqa: E402
from qkvshare_mlx.quant.mlx_backend import quantize_cache  # noqa: E402
from qkvshare_mlx.sensitivity import shipped_profile  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SUFFIX = "\nYou are the reviewer agent. State the final answer as a number.\nReviewer:"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _no_limit(n):
    return contextlib.nullcontext()


def make_cards(model, tokenizer, n: int) -> dict[str, CacheCard]:
    ids = transcript_tokens(tokenizer, n)
    pre = prefill(model, ids, probe_queries=32)
    fp = fingerprint(model, tokenizer)
    lw = with_sensitivity(pre.stats, shipped_profile(model), len(pre.keys))
    settings = {
        "recommended 5.5-bit": (5.5, recommended_model_config(5.5, model), lw),
        "adaptive 3-bit (unrotated)": (3.0, QuantConfig(), pre.stats),
    }
    cards = {}
    for name, (budget, config, stats) in settings.items():
        qkv = quantize_cache(
            pre.keys,
            pre.values,
            controller="saliency",
            budget_bits=budget,
            stats=stats,
            config=config,
        )
        cards[name] = CacheCard.from_quantized(qkv, ids, fp, dtype="float32")
    return cards


def run_once(model, card, mode: str, suffix: list[int]) -> float:
    """Milliseconds of one receive (see the module docstring)."""
    t0 = time.perf_counter()
    cache = inject(card, model, mode=mode)
    if mode == "dequantize":
        mx.eval([c.state for c in cache])
    else:
        model(mx.array(suffix[:-1])[None], cache=cache)
        mx.eval(mx.argmax(model(mx.array(suffix[-1:])[None], cache=cache)[0, -1]))
    return 1000 * (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=Path, default=RESULTS / "decode_threads.json")
    args = p.parse_args(argv)

    tic = time.perf_counter()
    model, tokenizer = load_model(args.model)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    cards = make_cards(model, tokenizer, args.context)
    log(f"cards made ({time.perf_counter() - tic:.0f} s)")
    limit = fastpath.numpy_blas_threads
    jobs = [(c, m, b) for c in cards for m in ("dequantize", "stream")
            for b in ("limited", "threaded")]  # fmt: skip
    times: dict[tuple, list[float]] = {}
    for rep in range(args.reps + 1):  # rep 0 is the warm-up
        for card, mode, blas in random.Random(rep).sample(jobs, len(jobs)):
            fastpath.numpy_blas_threads = limit if blas == "limited" else _no_limit
            try:
                t = run_once(model, cards[card], mode, suffix)
            finally:
                fastpath.numpy_blas_threads = limit
            if rep:
                times.setdefault((card, mode, blas), []).append(t)
        log(f"rep {rep} done")
    rows = [
        {"card": c, "mode": m, "numpy_blas": b, **timing(times[(c, m, b)])}
        for c, m, b in jobs
    ]
    lines = [
        f"Context {args.context} tokens, {args.reps} shuffled repetitions "
        f"(numpy BLAS threads outside the limit: {numpy_blas_threads_now()}).",
        "",
        "| card | mode | numpy BLAS | ms (min-max) | limited / threaded |",
        "|---|---|---|---|---|",
    ]
    med = {(r["card"], r["mode"], r["numpy_blas"]): r["median_ms"] for r in rows}
    for r in rows:
        ratio = (
            med[(r["card"], r["mode"], "limited")]
            / med[(r["card"], r["mode"], "threaded")]
        )
        lines.append(
            f"| {r['card']} | {r['mode']} | {r['numpy_blas']} | {ms_cell(r)} | "
            f"{ratio:.2f} |"
        )
    result = {
        "bench": "decode_threads",
        "context": args.context,
        "reps": args.reps,
        "numpy_blas_threads": numpy_blas_threads_now(),
        "elapsed_s": round(time.perf_counter() - tic, 1),
        "rows": rows,
    }
    finish(args.json, lines, command_line("bench/decode_threads.py", argv), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
