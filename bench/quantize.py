"""Controller x budget ablation of the mixed-precision quantizer (issue 3).

On the default model (or --model), contexts are multi-turn GSM8K transcripts
(few-shot exemplars from the train file, then a test question, about 1K
tokens). For each controller and budget the sender's cache is quantized, and
the receiver's next 64 tokens (the reference solution) are teacher-forced
with the quantized cache and with the exact one. Reported per row:

- effective and nominal bits, K and V relative Frobenius error;
- attention-output error on held-out queries (the continuation's own
  queries, never seen by the controller), relative, mean over layers;
- KL(exact || quantized) of the next-token distribution and top-1 agreement.

Also: the key-layout ablation (per-token vs per-channel keys), the rotation
ablation (``QuantConfig(rotation="hadamard")``) and the
quantization time against the sender's prefill time at 1K/4K/8K contexts.

    python bench/quantize.py --quick              # < 60 s
    python bench/quantize.py --json bench/results/quantize.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from qkvshare_mlx import capture
from qkvshare_mlx.evals import gsm8k
from qkvshare_mlx.formats import QuantConfig
from qkvshare_mlx.models import load_model
from qkvshare_mlx.quant.controllers import HandoffPlan
from qkvshare_mlx.quant.mlx_backend import dequantize_cache, quantize_cache

CONTROLLERS = [
    "uniform",
    "sink-recent",
    "saliency",
    "saliency-keynorm",
    "saliency-both",
    "topology",
]
BUDGETS = [2.5, 3.0, 4.0, 4.5, 6.0]
RESULTS = Path(__file__).parent / "results"


def build_context(tokenizer, problem, shots) -> list[int]:
    messages = []
    for ex in shots:
        messages += [
            {"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": ex["answer"]},
        ]
    messages.append({"role": "user", "content": problem["question"]})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def kv_cache(keys, values) -> list:
    cache = []
    for k, v in zip(keys, values):
        c = KVCache()
        c.update_and_fetch(k, v)
        cache.append(c)
    return cache


def held_out_queries(model, keys, values, continuation):
    """Post-RoPE queries of the continuation tokens, per layer (exact cache)."""
    attns = capture._attention_modules(model)
    if attns is None:
        return None
    n = len(continuation)
    records = [capture._RecordQueries(a.q_proj, n) for a in attns]
    for a, r in zip(attns, records):
        a.q_proj = r
    try:
        logits = model(mx.array(continuation)[None], cache=kv_cache(keys, values))
        mx.eval(logits, [r.recorded for r in records])
    finally:
        for a, r in zip(attns, records):
            a.q_proj = r.inner
    offset = keys[0].shape[2]
    out = []
    for a, r in zip(attns, records):
        B, P, _ = r.recorded.shape
        q = r.recorded.reshape(B, P, a.n_heads, -1).transpose(0, 2, 1, 3)
        out.append((a.rope(q, offset=offset), a.scale))
    return logits[0].astype(mx.float32), out


def attention_output(q, scale, k, v):
    B, Hq, P, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, Hq // Hkv * P, D)
    p = mx.softmax((q * scale) @ k.swapaxes(-1, -2), axis=-1, precise=True)
    return p @ v


def fidelity(model, ref_logits, queries, keys, values, qk, qv, continuation):
    logits = model(mx.array(continuation)[None], cache=kv_cache(qk, qv))[0]
    logits = logits.astype(mx.float32)
    lp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).mean().item()

    def rel(a, b):
        return (mx.sqrt(((a - b) ** 2).sum()) / mx.sqrt((b**2).sum())).item()

    k_err = float(np.mean([rel(a, b) for a, b in zip(qk, keys)]))
    v_err = float(np.mean([rel(a, b) for a, b in zip(qv, values)]))
    attn_err = None
    if queries is not None:
        errs = []
        for (q, scale), k, v, kq, vq in zip(queries, keys, values, qk, qv):
            o = attention_output(q, scale, k, v)
            errs.append(rel(attention_output(q, scale, kq, vq), o))
        attn_err = float(np.mean(errs))
    return {
        "kl": kl,
        "top1_agreement": top1,
        "k_rel_err": k_err,
        "v_rel_err": v_err,
        "attn_out_rel_err": attn_err,
    }


def run_grid(model, contexts, controllers, budgets, config, label):
    rows = []
    for controller in controllers:
        for budget in budgets:
            acc = []
            t_quant = []
            for ctx in contexts:
                t0 = time.perf_counter()
                qkv = quantize_cache(
                    ctx["keys"],
                    ctx["values"],
                    controller=controller,
                    budget_bits=budget,
                    config=config,
                    stats=ctx["stats"],
                    plan=HandoffPlan(hops_remaining=0),
                )
                t_quant.append(time.perf_counter() - t0)
                qk, qv = dequantize_cache(qkv)
                m = fidelity(
                    model,
                    ctx["ref"],
                    ctx["queries"],
                    ctx["keys"],
                    ctx["values"],
                    qk,
                    qv,
                    ctx["continuation"],
                )
                m["effective_bits"] = qkv.effective_bits
                m["nominal_bits"] = qkv.nominal_bits
                acc.append(m)
            row = {
                "controller": controller,
                "budget_bits": budget,
                "key_layout": config.key_layout,
                "rotation": config.rotation,
                "config": label,
                "contexts": len(contexts),
                "quantize_ms": 1000 * float(np.median(t_quant)),
            }
            for key in acc[0]:
                vals = [a[key] for a in acc if a[key] is not None]
                row[key] = float(np.mean(vals)) if vals else None
            rows.append(row)
            print(
                f"{label:8s} {controller:17s} {budget:4.1f}"
                f"  eff={row['effective_bits']:.3f}"
                f"  kl={row['kl']:.4f}  top1={row['top1_agreement']:.3f}"
                f"  K={row['k_rel_err']:.3f} V={row['v_rel_err']:.3f}"
                f"  attn={row['attn_out_rel_err'] or 0:.3f}",
                flush=True,
            )
    return rows


def throughput(model, tokenizer, lengths, controller, budget, reps=1):
    """Quantization time vs the sender's own prefill time, same context."""
    text = "\n\n".join(
        p["question"] + "\n" + p["answer"] for p in gsm8k.load_problems("train", 400)
    )
    corpus = tokenizer.encode(text)
    rows = []
    for n in lengths:
        ids = corpus[:n]
        t0 = time.perf_counter()
        pre = capture.prefill(model, ids, probe_queries=32)
        mx.eval(pre.keys, pre.values)
        t_prefill = time.perf_counter() - t0
        times = []
        for _ in range(reps + 1):  # the first run is warm-up
            t0 = time.perf_counter()
            quantize_cache(
                pre.keys,
                pre.values,
                controller=controller,
                budget_bits=budget,
                stats=pre.stats,
            )
            times.append(time.perf_counter() - t0)
        t_q = float(np.median(times[1:]))
        rows.append(
            {
                "context": len(ids),
                "prefill_s": t_prefill,
                "quantize_s": t_q,
                "ratio": t_q / t_prefill,
                "controller": controller,
                "budget_bits": budget,
            }
        )
        print(
            f"context {len(ids):5d}: prefill {t_prefill:7.2f} s  quantize {t_q:6.2f} s"
            f"  ratio {t_q / t_prefill:.3f}",
            flush=True,
        )
        del pre
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    main = [r for r in rows if r["config"] == "default"]
    for c in sorted({r["controller"] for r in main}):
        pts = sorted(
            (r["effective_bits"], r["kl"]) for r in main if r["controller"] == c
        )
        ax.plot(*zip(*pts), marker="o", label=c)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (scales included)")
    ax.set_ylabel("teacher-forced KL vs exact cache")
    ax.set_title("Controllers on SmolLM2-135M, GSM8K transcripts")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--shots", type=int, default=6)
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--controllers", default=",".join(CONTROLLERS))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument(
        "--throughput",
        default="1024,4096,8000",
        help="context lengths for the quantize-vs-prefill timing ('' to skip)",
    )
    p.add_argument(
        "--quick", action="store_true", help="2 problems, 3 controllers, 1K timing"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=str(RESULTS / "quantize_kl.png"))
    args = p.parse_args()
    controllers = args.controllers.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    n_problems, shots, lengths = args.problems, args.shots, args.throughput
    if args.quick:
        n_problems, shots = 2, 3
        controllers = ["uniform", "sink-recent", "saliency"]
        budgets = [3.0, 4.5]
        lengths = "1024"
    lengths = [int(x) for x in lengths.split(",") if x]

    model, tokenizer = load_model(args.model)
    exemplars = gsm8k.load_problems("train", shots)
    problems = gsm8k.load_problems("test", n_problems)
    contexts = []
    t0 = time.perf_counter()
    for prob in problems:
        ids = build_context(tokenizer, prob, exemplars)
        cont = tokenizer.encode(prob["answer"], add_special_tokens=False)
        cont = cont[: args.continuation]
        pre = capture.prefill(model, ids, probe_queries=32)
        ref, queries = held_out_queries(model, pre.keys, pre.values, cont) or (
            None,
            None,
        )
        contexts.append(
            {
                "keys": pre.keys,
                "values": pre.values,
                "stats": pre.stats,
                "continuation": cont,
                "ref": ref,
                "queries": queries,
            }
        )
    ctx_len = [c["keys"][0].shape[2] for c in contexts]
    print(
        f"{len(contexts)} contexts, {np.mean(ctx_len):.0f} tokens on average "
        f"(prefill {time.perf_counter() - t0:.1f} s)"
    )

    rows = run_grid(model, contexts, controllers, budgets, QuantConfig(), "default")
    layout = QuantConfig(key_layout="token")
    ablation_ctrl = [c for c in ("uniform", "saliency") if c in controllers]
    rows += run_grid(model, contexts, ablation_ctrl, budgets, layout, "tokenkey")
    rotated = QuantConfig(rotation="hadamard")
    rows += run_grid(model, contexts, ablation_ctrl, budgets, rotated, "hadamard")
    speed = throughput(model, tokenizer, lengths, "saliency", 3.0) if lengths else []

    result = {
        "bench": "quantize",
        "command": "python " + " ".join(sys.argv),
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "dtype": "float32",
        "machine": f"{platform.system()} {platform.machine()}",
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "problems": len(contexts),
        "context_tokens_mean": float(np.mean(ctx_len)),
        "continuation_tokens": args.continuation,
        "rows": rows,
        "throughput": speed,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot and not args.quick:
        plot(rows, args.plot)

    print(
        "\n| controller | keys | rotation | budget | eff. bits | KL | top-1 "
        "| attn-out err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['controller']} | {r['key_layout']} | {r['rotation']} | "
            f"{r['budget_bits']} | "
            f"{r['effective_bits']:.3f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | "
            f"{(r['attn_out_rel_err'] or 0):.3f} |"
        )


if __name__ == "__main__":
    main()
