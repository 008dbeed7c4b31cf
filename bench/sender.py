"""The sender's cost: making a CacheCard against mlx-lm's own quantization.

The sender has prefilled a context (the TTFT bench's multi-agent
transcript) and holds its exact K/V cache. Each mode turns that cache into
what it hands on, in the same process, on the same arrays, repetitions
shuffled:

- ``mlx_q4`` / ``mlx_q8`` (the baselines): mlx-lm's ``KVCache.to_quantized``
  (group 64), evaluated; ``+save`` adds ``save_prompt_cache`` to bytes;
- ``card_exact`` (16-bit), ``card_uniform4`` (4.5 bits), ``card_adaptive``
  (saliency, 3 bits), ``card_adaptive_rot`` (the same, Hadamard-rotated)
  and ``card_recommended`` (6 bits, Hadamard: the CLI's default until
  the layer-weighted 5.5-bit setting):
  ``quantize_cache`` + ``CacheCard.from_quantized`` (arrays on the host);
  ``+save`` adds ``CacheCard.to_bytes`` (metadata, SHA-256, safetensors).

The sender's prefill (with its 32 probe queries, what the saliency
controller reads) is kept per context under ``--cache-dir`` so a rerun
resumes without it; rows go to the JSON as each context finishes.

    python bench/sender.py [--contexts 2000,8000] [--reps 5]
"""

from __future__ import annotations  # noqa: I001  (qkvshare_mlx before mlx, below)

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import KVCache, save_prompt_cache  # noqa: E402

from qkvshare_mlx.card import CacheCard  # noqa: E402
from qkvshare_mlx.fingerprint import fingerprint  # noqa: E402
from qkvshare_mlx.formats import QuantConfig  # noqa: E402
from qkvshare_mlx.models import load_model, model_dtype  # noqa: E402
from qkvshare_mlx.quant.controllers import TokenStats  # noqa: E402
from qkvshare_mlx.quant.mlx_backend import quantize_cache  # noqa: E402
from qkvshare_mlx.rope import from_mlx_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE_DIR = Path.home() / ".cache" / "qkvshare-mlx" / "bench-sender"
# name: (controller, budget bits, QuantConfig keywords)
CARD_MODES = {
    "card_exact": ("uniform", 16.0, {}),
    "card_uniform4": ("uniform", 4.5, {}),
    "card_adaptive": ("saliency", 3.0, {}),
    "card_adaptive_rot": ("saliency", 3.0, {"rotation": "hadamard"}),
    "card_recommended": ("saliency", 6.0, {"rotation": "hadamard"}),
    # keys rotated back before RoPE (the model's RoPE probed once, not timed)
    "card_adaptive_prerope": ("saliency", 3.0, {"pre_rope": True}),
}
MLX_MODES = {"mlx_q4": 4, "mlx_q8": 8}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sender_cache(model, tokenizer, n: int, cache_dir: Path, tag: str):
    """(keys, values, stats, ids) of the sender's exact prefill of ``n``
    transcript tokens, from ``cache_dir`` when an earlier run kept it."""
    from transcript import transcript_tokens  # bench/transcript.py

    from qkvshare_mlx.capture import prefill

    ids = transcript_tokens(tokenizer, n)
    path = cache_dir / f"{tag}-{n}.safetensors"
    if path.exists():
        arrays = mx.load(str(path))
        L = sum(1 for k in arrays if k.startswith("k."))
        keys = [arrays[f"k.{i}"] for i in range(L)]
        values = [arrays[f"v.{i}"] for i in range(L)]
        att = np.asarray(arrays["attention"]).astype(np.float64)
        return keys, values, TokenStats(attention=att), ids
    t0 = time.perf_counter()
    pre = prefill(model, ids, probe_queries=32)
    log(f"ctx {n}: sender prefill {time.perf_counter() - t0:.1f} s")
    keys, values = pre.keys, pre.values
    mx.eval(keys, values)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"k.{i}": k for i, k in enumerate(keys)}
    arrays.update({f"v.{i}": v for i, v in enumerate(values)})
    arrays["attention"] = mx.array(pre.stats.attention.astype(np.float32))
    tmp = path.with_name(path.name + ".part.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)
    att = pre.stats.attention.astype(np.float32).astype(np.float64)
    return keys, values, TokenStats(attention=att), ids


def run_mlx(keys, values, bits: int, save: bool) -> tuple[float, int]:
    """ms and bytes of mlx-lm's ``to_quantized`` (+ ``save_prompt_cache``)."""
    t0 = time.perf_counter()
    caches = []
    for k, v in zip(keys, values):
        c = KVCache()
        c.keys, c.values, c.offset = k, v, k.shape[2]
        caches.append(c.to_quantized(group_size=64, bits=bits))
    mx.eval([c.state for c in caches])
    size = 0
    if save:
        buf = _NamedBytes()
        save_prompt_cache(buf, caches)
        size = len(buf.getvalue())
    return 1000.0 * (time.perf_counter() - t0), size


class _NamedBytes(io.BytesIO):
    name = "prompt_cache.safetensors"  # save_prompt_cache needs a .name


def run_card(
    keys, values, stats, ids, fp, dtype, mode, save, key_rope=None
) -> tuple[float, int]:
    """ms and bytes of one card: quantize + from_quantized (+ to_bytes)."""
    controller, budget, config = CARD_MODES[mode]
    config = dict(config)
    if config.pop("pre_rope", False):
        config["key_rope"] = key_rope
    t0 = time.perf_counter()
    qkv = quantize_cache(
        keys,
        values,
        controller=controller,
        budget_bits=budget,
        stats=stats,
        config=QuantConfig(**config),
    )
    card = CacheCard.from_quantized(qkv, ids, fp, dtype=dtype)
    size = len(card.to_bytes()) if save else 0
    return 1000.0 * (time.perf_counter() - t0), size


def sweep(model, tokenizer, fp, n, args, tag) -> list[dict]:
    keys, values, stats, ids = sender_cache(model, tokenizer, n, args.cache_dir, tag)
    dtype = str(keys[0].dtype).split(".")[-1]
    key_rope = from_mlx_model(model)
    jobs = [(m, s) for m in list(MLX_MODES) + list(CARD_MODES) for s in (False, True)]
    times = {j: [] for j in jobs}
    sizes = {}
    for j in jobs:  # warm-up (compilation, first-touch pages), not timed
        _one(j, keys, values, stats, ids, fp, dtype, key_rope)
    rng = random.Random(n)
    for rep in range(args.reps):
        order = jobs[:]
        rng.shuffle(order)
        for j in order:
            t, size = _one(j, keys, values, stats, ids, fp, dtype, key_rope)
            times[j].append(t)
            if size:
                sizes[j[0]] = size
        log(f"ctx {n}: rep {rep + 1}/{args.reps}")
    rows = []
    for (mode, save), ts in times.items():
        rows.append(
            {
                "context": n,
                "mode": mode,
                "stage": "make+serialize" if save else "make",
                "ms": statistics.median(ts),
                "ms_min": min(ts),
                "ms_max": max(ts),
                "bytes": sizes.get(mode),
            }
        )
    return rows


def _one(job, keys, values, stats, ids, fp, dtype, key_rope):
    mode, save = job
    if mode in MLX_MODES:
        return run_mlx(keys, values, MLX_MODES[mode], save)
    return run_card(keys, values, stats, ids, fp, dtype, mode, save, key_rope)


def acceptance(rows) -> list[dict]:
    """The accelerator issue's sender checks, per context and stage."""
    out = []
    by = {(r["context"], r["mode"], r["stage"]): r for r in rows}
    for n, stage in sorted({(r["context"], r["stage"]) for r in rows}):
        base = by.get((n, "mlx_q4", stage))
        if base is None:
            continue
        for mode, limit in (("card_adaptive", 2.0), ("card_exact", 1.0)):
            r = by.get((n, mode, stage))
            if r is None:
                continue
            ratio = r["ms"] / base["ms"]
            out.append(
                {
                    "context": n,
                    "stage": stage,
                    "check": f"{mode} <= {limit:g} x mlx_q4",
                    "ratio": ratio,
                    "limit": limit,
                    "pass": ratio <= limit,
                }
            )
    return out


def table(rows) -> str:
    base = {(r["context"], r["stage"]): r["ms"] for r in rows if r["mode"] == "mlx_q4"}
    lines = [
        "| context | mode | stage | ms (min-max) | x mlx_q4 | MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["context"], r["stage"], r["ms"])):
        b = base.get((r["context"], r["stage"]))
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else ""
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['stage']} | {r['ms']:.0f} "
            f"({r['ms_min']:.0f}-{r['ms_max']:.0f}) | "
            f"{r['ms'] / b:.2f} | {mb} |"
            if b
            else f"| {r['context']} | {r['mode']} | {r['stage']} | {r['ms']:.0f} | | |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", default="2000,8000")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=RESULTS / "sender.json")
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    model, tokenizer = load_model(args.model)
    fp = fingerprint(model, tokenizer)
    tag = (args.model or "default").replace("/", "_")
    command = " ".join(["python", "bench/sender.py", *(argv or sys.argv[1:])])
    rows = []
    t_start = time.perf_counter()
    for n in contexts:
        rows += sweep(model, tokenizer, fp, n, args, tag)
        result = {
            "bench": "sender",
            "command": command,
            "contexts": contexts,
            "reps": args.reps,
            "dtype": str(model_dtype(model)),
            "rows": rows,
            "acceptance": acceptance(rows),
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "env": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "qkvshare_mlx": qkvshare_mlx.__version__,
                "device": str(mx.default_device()),
                "model": args.model or "default (SmolLM2-135M-Instruct)",
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        checks = "\n".join(
            f"- ctx {a['context']} {a['stage']}: {a['check']}: "
            f"{a['ratio']:.2f} ({'pass' if a['pass'] else 'FAIL'})"
            for a in result["acceptance"]
        )
        args.out.with_suffix(".md").write_text(
            f"Command: `{command}`\n\n{table(rows)}\n{checks}\n"
        )
    print(table(rows))
    for a in acceptance(rows):
        print(
            f"ctx {a['context']} {a['stage']}: {a['check']}: {a['ratio']:.2f} "
            f"({'pass' if a['pass'] else 'FAIL'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
