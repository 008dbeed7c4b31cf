"""Where teacher-forced top-1 is lost: positions by the exact model's margin.

Each candidate (by its name in ``bench/fidelity_search.py``, plus a
float16 card: the exact cache stored at 16 bits) is fed the first
``--problems`` GSM8K chains at hop 1, the contexts of the fidelity search.
Every scored position is put in a bucket by the margin of the *exact*
next-token distribution between its two most likely tokens
(``p1 - p2``), and top-1 agreement and KL are counted per bucket. A
candidate that loses top-1 only where the exact model hesitates has
near-ties as its limit, not its error on decisive tokens.

Rows go to a resumable state file as they finish; prints a table per
candidate and writes JSON and markdown.

    python bench/near_ties.py --problems 150
"""

from __future__ import annotations  # noqa: I001  (qkvshare_mlx before mlx, below)

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_search as fs  # noqa: E402
from report import environment, write_reports  # noqa: E402  (bench/report.py)

RESULTS = Path(__file__).parent / "results"
EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # bucket edges of p1 - p2
DECISIVE = 0.1  # the summary's "decisive" positions: margin at least this
FLOAT16 = fs.Candidate("float16 card", "card", "uniform", 16.0)
LW = "saliency+hadamard+split, pre-RoPE card, widths 3-8, layer-weighted"
DEFAULT = [
    "float16 card",
    "mlx-lm kv-bits 8",
    f"{LW} @4.5",
    f"{LW} @5.0",
    f"{LW} @5.5",
    "saliency+hadamard @6.0",
]


def position_row(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-position KL(ref || got) and top-1 match of (N, V) logits, as
    JSON lists."""
    from qkvshare_mlx.divergence import per_position

    kl, match = per_position(ref, got)
    return {"kl": kl.tolist(), "match": match.astype(int).tolist()}


def margins(ref: np.ndarray) -> list[float]:
    """p1 - p2 of each position's exact (N, V) logits."""
    from qkvshare_mlx.divergence import log_softmax

    p = np.exp(log_softmax(ref.astype(np.float64)))
    top2 = np.sort(p, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]).tolist()


def run(model, tokenizer, state, n_problems, cands, *, sensitivity=None):
    def todo(i):
        names = ["exact", *(c.name for c in cands)]
        return [n for n in names if ("near_ties", i, n) not in state]

    for h in fs.gsm8k_contexts(model, tokenizer, n_problems, lambda i: not todo(i)):
        ref = np.asarray(h.ref_logits.astype(mx.float32))
        wanted = todo(h.problem)
        if "exact" in wanted:
            state.add(
                {"set": "near_ties", "item": h.problem, "name": "exact",
                 "margin": margins(ref)}
            )  # fmt: skip
        for c in cands:
            if c.name not in wanted:
                continue
            got, bits, _ = fs.candidate_logits(
                model, c, h.keys, h.values, h.stats, h.feed, h.first,
                sensitivity=sensitivity,
            )  # fmt: skip
            row = position_row(ref, np.asarray(got))
            state.add(
                {"set": "near_ties", "item": h.problem, "name": c.name,
                 "effective_bits": round(float(bits), 4), **row}
            )  # fmt: skip
        fs.log(f"problem {h.problem}: {len(wanted)} rows")


def buckets(state, names) -> list[dict]:
    """Per candidate and margin bucket: positions, top-1, KL, and the
    bucket's share of the candidate's mismatches."""
    items = sorted({k[1] for k in state.rows if k[0] == "near_ties"})
    out = []
    for name in names:
        have = [i for i in items if ("near_ties", i, name) in state]
        if not have:
            continue
        m = np.concatenate(
            [state.rows[("near_ties", i, "exact")]["margin"] for i in have]
        )
        rows = [state.rows[("near_ties", i, name)] for i in have]
        match = np.concatenate([r["match"] for r in rows]).astype(bool)
        kl = np.concatenate([r["kl"] for r in rows])
        bits = float(np.mean([r["effective_bits"] for r in rows]))
        misses = max(int((~match).sum()), 1)
        for lo, hi in zip(EDGES[:-1], EDGES[1:]):
            sel = (m >= lo) & ((m < hi) if hi < 1.0 else (m <= hi))
            out.append(
                {
                    "name": name,
                    "problems": len(have),
                    "effective_bits": bits,
                    "margin": [lo, hi],
                    "positions": int(sel.sum()),
                    "share_of_positions": float(sel.mean()),
                    "top1": float(match[sel].mean()) if sel.any() else None,
                    "kl": float(kl[sel].mean()) if sel.any() else None,
                    "share_of_mismatches": float((~match & sel).sum() / misses),
                }
            )
        decisive = m >= DECISIVE
        out.append(
            {
                "name": name,
                "problems": len(have),
                "effective_bits": bits,
                "margin": "all",
                "positions": int(m.size),
                "top1": float(match.mean()),
                # fidelity_search's top-1: the mean of each problem's
                "top1_per_problem": float(np.mean([np.mean(r["match"]) for r in rows])),
                "kl": float(kl.mean()),
                "kl_per_problem": float(np.mean([np.mean(r["kl"]) for r in rows])),
                "top1_decisive": (
                    float(match[decisive].mean()) if decisive.any() else None
                ),
                "mismatches": int((~match).sum()),
                "mismatches_below_decisive": int((~match & ~decisive).sum()),
            }
        )
    return out


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows) -> str:
    summary = [r for r in rows if r["margin"] == "all"]
    lines = [
        f"Summary (decisive: exact margin p1 - p2 >= {DECISIVE}; top-1 and KL "
        "over all positions, and the mean of each problem's as in "
        "bench/fidelity_search.py):",
        "",
        "| method | n | eff. bits | positions | top-1 | top-1, mean per problem "
        "| KL | KL, mean per problem | top-1, decisive | mismatches "
        "| of them near-ties |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['name']} | {r['problems']} | {r['effective_bits']:.3f} | "
            f"{r['positions']} | {r['top1']:.4f} | {r['top1_per_problem']:.4f} | "
            f"{r['kl']:.5f} | {r['kl_per_problem']:.5f} | "
            f"{_num(r['top1_decisive'], 4)} | {r['mismatches']} | "
            f"{r['mismatches_below_decisive']} |"
        )
    lines += [
        "",
        "By the exact margin:",
        "",
        "| method | margin | share of positions | top-1 | KL | share of mismatches |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["margin"] == "all":
            continue
        lo, hi = r["margin"]
        top1, kl = _num(r["top1"], 4), _num(r["kl"], 5)
        lines.append(
            f"| {r['name']} | {lo:g}-{hi:g} | {r['share_of_positions']:.4f} | "
            f"{top1} | {kl} | {r['share_of_mismatches']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--problems", type=int, default=150)
    p.add_argument(
        "--only",
        default=";".join(DEFAULT),
        help="candidate names (bench/fidelity_search.py's, or 'float16 card'), "
        "separated by ';'",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "near_ties.json")
    fs.add_run_options(p)
    args = p.parse_args(argv)

    from qkvshare_mlx.models import load_model
    from qkvshare_mlx.sensitivity import LayerSensitivity

    known = {c.name: c for c in [FLOAT16, *fs.CANDIDATES]}
    names = [n for n in args.only.split(";") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--only: unknown candidates {unknown}")
    cands = [known[n] for n in names]
    sensitivity = None
    if any(c.config.get("layer_weights") for c in cands) and not args.report:
        sensitivity = LayerSensitivity.load(args.sensitivity)
    state = fs.RowState(args.state or args.out.with_suffix(".state.jsonl"))
    command = shlex.join(["python", "bench/near_ties.py", *(argv or sys.argv[1:])])
    tic = time.perf_counter()
    old = {}
    if args.report:
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        command = old.get("command", command)
    else:
        model, tokenizer = load_model(args.model)
        run(model, tokenizer, state, args.problems, cands, sensitivity=sensitivity)
    rows = buckets(state, names)
    table = markdown(rows)
    print(table)
    result = {
        "bench": "near_ties",
        "command": command,
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "problems": len({k[1] for k in state.rows if k[0] == "near_ties"}),
        "edges": list(EDGES),
        "decisive_margin": DECISIVE,
        "note": "hop 1, teacher-forced against the exact cache (float32 here)",
        **environment(),
        "numpy": np.__version__,
        "elapsed_s": old.get("elapsed_s")
        if args.report
        else round(time.perf_counter() - tic, 1),
        "rows": rows,
    }
    write_reports(args.out, result, f"Command: `{command}`\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
