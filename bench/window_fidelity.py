"""Handoff fidelity on a sliding-window model, past its window.

For the first N GSM8K test problems joined into one long context (default
600 tokens, past Gemma 3 270M's 512-token window), cards at several budgets
(saliency, and uniform as the baseline) are injected into the receiver and
the next ``--follow`` tokens of the text are fed through them, teacher-forced;
their logits are compared with the exact cache's (the same model, the same
tokens, in the same process): mean KL(exact || card) and top-1 agreement.
Every setting is made twice: with the local layers trimmed to their window
(the default, format version 3) and with every token in every layer
(``trim_windows=False``), so the table shows what the local layers drop.
Card bytes are reported against the full-length 16-bit card's. Prints a
table, writes JSON.

    python bench/window_fidelity.py --model gemma3-270m --context 600
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402

OUT = Path(__file__).parent / "results" / "window_fidelity_gemma3.json"
CONTROLLERS = ("uniform", "saliency")
BUDGETS = (3.0, 4.5, 6.0, 16.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--follow", type=int, default=64)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    from qkvshare_mlx.capture import sender_cache
    from qkvshare_mlx.evals import gsm8k
    from qkvshare_mlx.evals.metrics import compare_logits
    from qkvshare_mlx.handoff import make_card
    from qkvshare_mlx.inject import inject
    from qkvshare_mlx.models import load_model, resolve_model

    path = resolve_model(args.model)
    model, tok = load_model(path)
    text = " ".join(q["question"] for q in gsm8k.load_problems("test", n=60))
    ids = tok.encode(text)[: args.context + args.follow]
    context, follow = ids[: args.context], ids[args.context :]
    exact = sender_cache(model)
    model(mx.array([context]), cache=exact)
    ref = model(mx.array([follow]), cache=exact)[0]

    rows = []
    for controller in CONTROLLERS:
        for budget in BUDGETS:
            if budget == 16.0 and controller != "uniform":
                continue
            for trim in (True, False):
                tic = time.perf_counter()
                card = make_card(
                    model,
                    tok,
                    context,
                    controller=controller,
                    budget_bits=budget,
                    trim_windows=trim,
                )
                got = model(mx.array([follow]), cache=inject(card, model))[0]
                rows.append(
                    {
                        "controller": controller,
                        "budget_bits": budget,
                        "trimmed": trim,
                        "format_version": card.version,
                        "effective_bits": round(card.effective_bits, 4),
                        "card_bytes": len(card.to_bytes()),
                        **compare_logits(ref, got),
                        "seconds": round(time.perf_counter() - tic, 2),
                    }
                )
                print(rows[-1], flush=True)
    full = next(
        r["card_bytes"] for r in rows if r["budget_bits"] == 16.0 and not r["trimmed"]
    )
    print(
        f"\n{'controller':<10} {'budget':>6} {'rows':>7} {'eff bits':>8} {'MB':>6} "
        f"{'x16-bit':>7} {'KL':>8} {'top-1':>6}"
    )
    for r in rows:
        r["bytes_vs_16bit"] = round(r["card_bytes"] / full, 4)
        print(
            f"{r['controller']:<10} {r['budget_bits']:>6} "
            f"{'window' if r['trimmed'] else 'all':>7} {r['effective_bits']:>8.3f} "
            f"{r['card_bytes'] / 1e6:>6.2f} {r['bytes_vs_16bit']:>7.3f} "
            f"{r['kl']:>8.4f} {r['top1_agreement']:>6.3f}"
        )
    result = {
        "bench": "window_fidelity",
        "command": "python bench/window_fidelity.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "model": path,
        "context_tokens": len(context),
        "follow_tokens": len(follow),
        "note": "rows 'trimmed': local layers hold their window only (format "
        "v3); untrimmed: every token in every layer. bytes_vs_16bit: against the "
        "untrimmed 16-bit card",
        "machine": platform.platform(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
