"""Cross-runtime handoff: do 16-bit cards continue exactly in the other runtime?

For the first N GSM8K test prompts (chat template), in both directions:

- mlx->hf: the MLX sender makes a lossless card (``handoff.make_card``,
  uniform width 16 stored as float32); transformers continues from it
  (``continue_hf``) and from its own prefill (``hf_greedy_tokens``).
- hf->mlx: transformers makes the card (``hf_prefill`` +
  ``dynamic_cache_to_card``); MLX continues from it
  (``handoff.continue_from_card``) and from its own prefill
  (``handoff.greedy_tokens``).

Greedy decoding, float32 models, the same process and inputs for the card
and the baseline. The claim checked (issue 5): identical greedy tokens on at
least 19 of the first 20 prompts. Prints a table, writes JSON.

    python bench/cross_runtime.py --n-prompts 20 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

OUT = Path(__file__).parent / "results" / "cross_runtime.json"
DIRECTIONS = ("mlx->hf", "hf->mlx")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="model folder or hub id (default model)"
    )
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=DIRECTIONS)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def environment() -> dict:
    import mlx.core as mx
    import mlx_lm
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "mlx_device": str(mx.default_device()),
        "versions": {
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "qkvshare_mlx": qkvshare_mlx.__version__,
        },
    }


def prompts(hf_tok, n: int) -> list[np.ndarray]:
    from qkvshare_mlx.evals.gsm8k import load_problems

    out = []
    for problem in load_problems("test", n):
        messages = [{"role": "user", "content": problem["question"]}]
        enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def run_mlx_to_hf(ids, models, max_tokens):
    from qkvshare_converters.hf_cache import continue_hf, hf_greedy_tokens
    from qkvshare_mlx.card import CacheCard
    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.handoff import make_card

    mlx_model, mlx_tok, hf_model, hf_tok = models
    tic = time.perf_counter()
    card = make_card(
        mlx_model,
        mlx_tok,
        ids,
        controller="uniform",
        budget_bits=32,
        config=QuantConfig(float_dtype="float32"),
    )
    card = CacheCard.from_bytes(card.to_bytes())
    t_card = time.perf_counter() - tic
    tic = time.perf_counter()
    got = continue_hf(card, hf_model, hf_tok, ids, max_tokens=max_tokens).tokens
    t_got = time.perf_counter() - tic
    tic = time.perf_counter()
    ref = hf_greedy_tokens(
        hf_model, ids, max_tokens=max_tokens, eos={hf_tok.eos_token_id}
    )
    t_ref = time.perf_counter() - tic
    return got, ref, {"card_s": t_card, "card_continue_s": t_got, "own_s": t_ref}


def run_hf_to_mlx(ids, models, max_tokens):
    from qkvshare_converters.hf_cache import dynamic_cache_to_card, hf_prefill
    from qkvshare_mlx.card import CacheCard
    from qkvshare_mlx.formats import QuantConfig
    from qkvshare_mlx.handoff import continue_from_card, greedy_tokens

    mlx_model, mlx_tok, hf_model, hf_tok = models
    tic = time.perf_counter()
    cache, _, _ = hf_prefill(hf_model, ids)
    card = dynamic_cache_to_card(
        cache,
        ids,
        hf_model,
        hf_tok,
        controller="uniform",
        budget_bits=32,
        config=QuantConfig(float_dtype="float32"),
    )
    card = CacheCard.from_bytes(card.to_bytes())
    t_card = time.perf_counter() - tic
    tic = time.perf_counter()
    got = continue_from_card(
        card, mlx_model, mlx_tok, ids, max_tokens=max_tokens
    ).tokens
    t_got = time.perf_counter() - tic
    tic = time.perf_counter()
    eos = set(getattr(mlx_tok, "eos_token_ids", None) or [])
    ref = greedy_tokens(mlx_model, ids, max_tokens=max_tokens, eos=eos)
    t_ref = time.perf_counter() - tic
    return got, ref, {"card_s": t_card, "card_continue_s": t_got, "own_s": t_ref}


RUNNERS = {"mlx->hf": run_mlx_to_hf, "hf->mlx": run_hf_to_mlx}


def summarize(rows: list[dict], directions, n_prompts: int) -> dict:
    out = {}
    for d in directions:
        mine = [r for r in rows if r["direction"] == d]
        out[d] = {
            "prompts": len(mine),
            "identical": sum(r["identical"] for r in mine),
            "claim_met": sum(r["identical"] for r in mine) >= n_prompts - 1
            if len(mine) == n_prompts
            else None,
            "median_card_continue_s": float(
                np.median([r["card_continue_s"] for r in mine])
            )
            if mine
            else None,
            "median_own_s": float(np.median([r["own_s"] for r in mine]))
            if mine
            else None,
        }
    return out


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    from qkvshare_converters.hf_model import load_hf_model
    from qkvshare_mlx.models import load_model, resolve_model

    path = resolve_model(args.model)
    mlx_model, mlx_tok = load_model(path, dtype="float32")
    hf_model, hf_tok = load_hf_model(path, dtype="float32")
    models = (mlx_model, mlx_tok, hf_model, hf_tok)
    env = environment()
    result = {
        "bench": "cross_runtime",
        "model": str(path),
        "dtype": "float32",
        "card": "uniform width 16 stored as float32 (lossless)",
        "decoding": "greedy",
        "n_prompts": args.n_prompts,
        "max_tokens": args.max_tokens,
        "environment": env,
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"{'#':>3} {'dir':8} {'prompt':>6} {'gen':>4} {'same':>5} {'1st diff':>8}"
    print(header)
    print("-" * len(header))
    for i, ids in enumerate(prompts(hf_tok, args.n_prompts)):
        for d in args.directions:
            got, ref, times = RUNNERS[d](ids, models, args.max_tokens)
            diff = first_difference(got, ref)
            row = {
                "prompt": i,
                "direction": d,
                "prompt_tokens": len(ids),
                "generated": len(got),
                "baseline_generated": len(ref),
                "identical": got == ref,
                "first_difference": diff,
                **times,
            }
            result["rows"].append(row)
            print(
                f"{i:>3} {d:8} {len(ids):>6} {len(got):>4} {str(got == ref):>5} "
                f"{'-' if diff is None else diff:>8}",
                flush=True,
            )
            # partial results survive an interrupted run
            result["summary"] = summarize(
                result["rows"], args.directions, args.n_prompts
            )
            args.out.write_text(json.dumps(result, indent=2))
    env["load_average_end"] = os.getloadavg()
    result["summary"] = summarize(result["rows"], args.directions, args.n_prompts)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    for d, s in result["summary"].items():
        print(
            f"{d}: identical greedy tokens on {s['identical']}/{s['prompts']} prompts "
            f"(median continue {s['median_card_continue_s']:.2f}s from card, "
            f"{s['median_own_s']:.2f}s own prefill)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
