"""Codebooks, residuals and outliers against the card's affine groups, at equal
effective bits (issue 22).

The question: would a per-vector norm plus a Lloyd-Max codebook on
Hadamard-rotated coordinates (TurboQuant, PolarQuant) move the fidelity
knee enough to reach today's 6-bit quality at 4.5 bits? This measures the
reconstruction error of both quantizers on the same real cache, before
building either into the card format.

On the sender's exact cache of ``--context`` transcript tokens (the TTFT
bench's text, bench/sender.py's cache), every layer's keys and values
rotated as the cards rotate them (``QuantConfig(rotation="hadamard")``):

- ``affine``: the card's quantizer (``mx.quantize``, groups of 64 along
  the head dim, float16 scale and bias: ``b + 0.5`` bits at D = 64), per
  token; keys also per channel (groups of 64 tokens, the card's default
  key layout);
- ``norm+gauss``: each head vector's norm in float16, then its coordinates
  scaled to unit variance and rounded to the 2**b-level Lloyd-Max
  codebook of a standard normal (data-oblivious, as TurboQuant):
  ``b + 16/D`` bits;
- ``norm+fitted``: the same with a Lloyd-Max codebook fitted per layer
  and K/V on this cache (its 2**b float16 levels counted too);
- ``affine/token+rank{r}``: the affine rows plus a rank-``r`` float16
  factorisation of each head's (T, D) residual (GEAR's low-rank residual:
  ``16 r (T + D) / (T D)`` bits more);
- ``unrotated+sparse1%``: KVQuant's dense-and-sparse split on the
  *unrotated* cache: the 1% largest magnitudes of each layer kept exactly
  (float16 value and a 16-bit position each: 0.32 bits more), the rest
  clipped to their range and quantized affine per token.

Reported: relative squared error ``sum |x - x'|^2 / sum |x|^2`` over the
whole cache, K and V, and for each codebook row the affine bits that
reach the same error (log-linear interpolation between affine rows):
the codebook's gain in bits at that quality.

    python bench/codebook_mse.py --context 4096
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

from qkvshare_mlx.models import load_model  # noqa: E402
from qkvshare_mlx.quant.mlx_backend import decode, encode  # noqa: E402
from qkvshare_mlx.rotation import rotation_matrix  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sender import CACHE_DIR, sender_cache  # noqa: E402  (bench/sender.py)

RESULTS = Path(__file__).parent / "results"
BITS = (2, 3, 4, 5, 6)
GROUP = 64


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lloyd_max(samples: np.ndarray, bits: int, iters: int = 60) -> np.ndarray:
    """The 2**bits levels minimising squared error on ``samples`` (1-D),
    by Lloyd's iterations from the samples' quantiles; float16-rounded."""
    x = np.sort(samples.astype(np.float64))
    n = 1 << bits
    levels = np.quantile(x, (np.arange(n) + 0.5) / n)
    for _ in range(iters):
        edges = np.searchsorted(x, (levels[1:] + levels[:-1]) / 2)
        sums = np.add.reduceat(x, np.r_[0, edges])
        counts = np.diff(np.r_[0, edges, x.size])
        keep = counts > 0
        levels[keep] = sums[keep] / counts[keep]
    return np.sort(levels).astype(np.float16).astype(np.float32)


def gauss_codebook(bits: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return lloyd_max(rng.standard_normal(2_000_000), bits)


def codebook_roundtrip(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(..., D) rows: float16 norm, unit-variance coordinates to the nearest level."""
    D = x.shape[-1]
    norm = np.linalg.norm(x, axis=-1, keepdims=True).astype(np.float16)
    norm = norm.astype(np.float32)
    safe = np.where(norm > 0, norm, 1.0)
    u = x * (np.sqrt(D) / safe)
    mids = (levels[1:] + levels[:-1]) / 2
    q = levels[np.searchsorted(mids, u)]
    return q * (norm / np.sqrt(D))


def affine_roundtrip(x: np.ndarray, bits: int, layout: str) -> np.ndarray:
    enc = encode(mx.array(x), bits, layout, GROUP, "float16")
    return np.array(decode(enc, bits, mx.float32))


def low_rank_fix(x: np.ndarray, xq: np.ndarray, rank: int) -> np.ndarray:
    """``xq`` plus the float16 rank-``rank`` SVD of each head's residual."""
    out = xq.copy()
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            u, s, vt = np.linalg.svd(x[b, h] - xq[b, h], full_matrices=False)
            left = (u[:, :rank] * s[:rank]).astype(np.float16).astype(np.float32)
            right = vt[:rank].astype(np.float16).astype(np.float32)
            out[b, h] += left @ right
    return out


def sparse_roundtrip(x: np.ndarray, bits: int, frac: float = 0.01) -> np.ndarray:
    """Dense-and-sparse: the ``frac`` largest magnitudes exact (float16), the
    rest clipped to the remaining range and quantized affine per token."""
    limit = np.quantile(np.abs(x), 1.0 - frac)
    outlier = np.abs(x) > limit
    dense = affine_roundtrip(np.clip(x, -limit, limit), bits, "token")
    exact = x.astype(np.float16).astype(np.float32)
    return np.where(outlier, exact, dense)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--json", type=Path, default=RESULTS / "codebook_mse.json")
    args = p.parse_args()
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    keys, values, _, _ = sender_cache(
        model, tokenizer, args.context, args.cache_dir, args.model or "default"
    )
    D = keys[0].shape[-1]
    r = rotation_matrix("hadamard", D)
    data_raw = {
        "K": [np.asarray(k, np.float32) for k in keys],
        "V": [np.asarray(v, np.float32) for v in values],
    }
    data = {kv: [x @ r for x in xs] for kv, xs in data_raw.items()}
    n_el = sum(x.size for x in data["K"])
    gauss = {b: gauss_codebook(b) for b in BITS}
    rows = []

    def add(method, kv, bits, eff, err):
        rows.append(dict(method=method, kv=kv, bits=bits, eff_bits=eff, rel_err=err))
        log(f"{kv} {method} b={bits}: eff {eff:.3f} bits, rel err {err:.3e}")

    for kv, xs in data.items():
        energy = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xs)
        layouts = ("token", "channel") if kv == "K" else ("token",)
        for b in BITS:
            for layout in layouts:
                err = sum(
                    float(np.sum((affine_roundtrip(x, b, layout) - x) ** 2)) for x in xs
                )
                add(f"affine/{layout}", kv, b, b + 32 / GROUP, err / energy)
            err = sum(
                float(np.sum((codebook_roundtrip(x, gauss[b]) - x) ** 2)) for x in xs
            )
            add("norm+gauss", kv, b, b + 16 / D, err / energy)
            err, book_bits = 0.0, 0
            for x in xs:
                u = x * (np.sqrt(D) / np.linalg.norm(x, axis=-1, keepdims=True))
                sample = u.reshape(-1)[:: max(1, u.size // 400_000)]
                levels = lloyd_max(sample, b)
                err += float(np.sum((codebook_roundtrip(x, levels) - x) ** 2))
                book_bits += 16 << b
            add(
                "norm+fitted",
                kv,
                b,
                b + 16 / D + book_bits / n_el,
                err / energy,
            )
        for b in BITS:
            for rank in (2, 4):
                err, extra = 0.0, 0
                for x in xs:
                    xq = affine_roundtrip(x, b, "token")
                    err += float(np.sum((low_rank_fix(x, xq, rank) - x) ** 2))
                    B, H, T, _ = x.shape
                    extra += B * H * 16 * rank * (T + D)
                add(
                    f"affine/token+rank{rank}",
                    kv,
                    b,
                    b + 0.5 + extra / n_el,
                    err / energy,
                )
            raw = data_raw[kv]
            err = sum(float(np.sum((sparse_roundtrip(x, b) - x) ** 2)) for x in raw)
            add("unrotated+sparse1%", kv, b, b + 0.5 + 0.01 * 32, err / energy)
    for row in rows:
        row["affine_bits_same_error"] = _equivalent(rows, row)
    result = {
        "command": "python " + shlex.join(sys.argv),
        "context": args.context,
        "model": args.model or "default",
        "head_dim": D,
        "rows": rows,
        "elapsed_s": time.perf_counter() - t_start,
        "env": {"platform": platform.platform(), "mlx": mx.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    md = report(result)
    args.json.with_suffix(".md").write_text(md)
    print(md)


def _equivalent(rows, row) -> float | None:
    """Effective bits the per-token affine quantizer needs for ``row``'s error
    (log-linear between its two nearest rows), or None outside their range."""
    ref = sorted(
        (r["eff_bits"], np.log(r["rel_err"]))
        for r in rows
        if r["kv"] == row["kv"] and r["method"] == "affine/token"
    )
    target = np.log(row["rel_err"])
    for (b0, e0), (b1, e1) in zip(ref, ref[1:]):
        if e1 <= target <= e0:
            return b0 + (b1 - b0) * (e0 - target) / (e0 - e1)
    return None


def report(result) -> str:
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Context {result['context']} tokens, head dim {result['head_dim']}, "
        "Hadamard-rotated K and V. Relative squared error over the whole cache; "
        "last column: the per-token affine bits with the same error.",
        "",
        "| K/V | method | b | eff. bits | rel. error | affine bits, same error |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        eq = r["affine_bits_same_error"]
        lines.append(
            f"| {r['kv']} | {r['method']} | {r['bits']} | {r['eff_bits']:.3f} | "
            f"{r['rel_err']:.3e} | {'-' if eq is None else f'{eq:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
