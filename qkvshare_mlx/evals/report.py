"""Aggregation of the study's state into one JSON, a markdown table and plots.

Rows average only the problems whose grid is complete (a run stopped midway
leaves a partial problem out), so every row of a table averages the same
problems. The module reads the state's rows; it knows nothing about models
or how the rows were produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .plots import plot


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def complete(rows: list[dict], size: int) -> list[dict]:
    """Rows of the problems whose grid is complete (so every row averages
    the same problems; a run stopped midway leaves a partial problem out)."""
    count = {}
    for r in rows:
        count[r["problem"]] = count.get(r["problem"], 0) + 1
    return [r for r in rows if count[r["problem"]] >= size]


def _all(flags):
    """True/False over the flags that were checked; None if none was."""
    flags = [f for f in flags if f is not None]
    return all(flags) if flags else None


def aggregate(state, args) -> list[dict]:
    """One row per (controller, budget, hops): teacher-forced and generation
    means over the problems whose grid (``args``' hops, budgets and
    controllers) is complete."""
    tf, gen = {}, {}
    tf_size = len(args.hops) * len(args.budgets) * len(args.controllers)
    gen_size = len(args.gen_hops) * (len(args.budgets) * len(args.gen_controllers) + 2)
    for r in complete(state.of_kind("tf"), tf_size):
        tf.setdefault((r["mode"], r["budget_bits"], r["hops"]), []).append(r)
    for r in complete(state.of_kind("gen"), gen_size):
        gen.setdefault((r["mode"], r["budget_bits"], r["hops"]), []).append(r)
    rows = []
    for key in sorted(set(tf) | set(gen), key=lambda k: (k[0], k[1] or 0, k[2])):
        mode, budget, hops = key
        t, g = tf.get(key, []), gen.get(key, [])
        divs = [r["first_divergence"] for r in g]
        row = {
            "controller": mode,
            "budget_bits": budget,
            "hops": hops,
            "effective_bits": _mean([r["effective_bits"] for r in t])
            or _mean([r.get("effective_bits") for r in g]),
            "kl": _mean([r["kl"] for r in t]),
            "top1_agreement": _mean([r["top1_agreement"] for r in t]),
            "card_bytes": _mean([r["payload_bytes"] for r in t])
            or _mean([r.get("payload_bytes") for r in g]),
            "fp16_bytes": _mean([r["fp16_bytes"] for r in t]),
            "card_tokens": _mean([r["tokens"] for r in t]),
            "hop1_bits_identical": _all([r["hop1_bits_identical"] for r in t]),
            "problems": len(t),
            "accuracy": _mean([float(r["correct"]) for r in g]),
            "agreement": _mean([float(r["agreement"]) for r in g]),
            "identical_answer_reply": _mean([float(d is None) for d in divs]),
            "first_divergence_mean": _mean([d for d in divs if d is not None]),
            "gen_problems": len(g),
            "replay_s": _mean([r["seconds"] for r in t]),
            "gen_wall_s": _mean([r.get("wall_s") for r in g]),
        }
        rows.append(row)
    return rows


def _fmt(x, f="{:.4f}"):
    return "-" if x is None else f.format(x)


def markdown(rows, meta) -> str:
    """The results table (one line per aggregated row), then :func:`pivot`."""
    lines = [
        "# GSM8K agent chains: handoff fidelity",
        "",
        "Commands that produced the state: "
        + ", ".join(f"`{c}`" for c in meta["commands"])
        + "  ",
        f"Model: {meta['model']}, {meta['dtype']}, {meta['machine']}. "
        f"Teacher-forced metrics on {meta['tf_problems']} problems, generation "
        f"metrics on {meta['gen_problems']} problems (per-row counts below).",
        "",
        "| controller | budget | hops | eff. bits | KL | top-1 | acc. | agree | "
        "same reply | 1st div. | card KB | fp16 KB | hop-1 bits kept | n tf | n gen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['controller']} | {_fmt(r['budget_bits'], '{}')} | {r['hops']} | "
            f"{_fmt(r['effective_bits'], '{:.3f}')} | {_fmt(r['kl'])} | "
            f"{_fmt(r['top1_agreement'], '{:.3f}')} | "
            f"{_fmt(r['accuracy'], '{:.2f}')} | "
            f"{_fmt(r['agreement'], '{:.2f}')} | "
            f"{_fmt(r['identical_answer_reply'], '{:.2f}')} | "
            f"{_fmt(r['first_divergence_mean'], '{:.1f}')} | "
            f"{_fmt(r['card_bytes'] and r['card_bytes'] / 1024, '{:.0f}')} | "
            f"{_fmt(r['fp16_bytes'] and r['fp16_bytes'] / 1024, '{:.0f}')} | "
            f"{_fmt(r['hop1_bits_identical'], '{}')} | {r['problems']} | "
            f"{r['gen_problems']} |"
        )
    return "\n".join(lines + [""] + pivot(rows)) + "\n"


def pivot(rows) -> list[str]:
    """KL and top-1 per controller and budget, one column per hop count."""
    tf = {(r["controller"], r["budget_bits"], r["hops"]): r for r in rows if r["kl"]}
    hops = sorted({k[2] for k in tf})
    if not hops:
        return []
    lines = [
        "Teacher-forced KL (top-1) by hop count:",
        "",
        "| controller | budget | " + " | ".join(f"{h} hop(s)" for h in hops) + " |",
        "|---|---|" + "---|" * len(hops),
    ]
    for c, b in sorted({k[:2] for k in tf}, key=lambda k: (k[1], k[0])):
        cells = [
            f"{tf[c, b, h]['kl']:.4f} ({tf[c, b, h]['top1_agreement']:.3f})"
            if (c, b, h) in tf
            else "-"
            for h in hops
        ]
        lines.append(f"| {c} | {b} | " + " | ".join(cells) + " |")
    return lines


def report(state, args, meta) -> dict:
    """Aggregate ``state`` and write ``args.json``, the markdown beside it and
    (unless ``args.quick``) the plots.

    Returns:
        The JSON written: ``meta``, the problem counts, the hop-1 bit checks,
        the commands that wrote the state, and ``rows``.
    """
    rows = aggregate(state, args)
    meta = dict(meta)
    # problems whose grid is complete (the rows average exactly these)
    meta["tf_problems"] = max([r["problems"] for r in rows] or [0])
    meta["gen_problems"] = max([r["gen_problems"] for r in rows] or [0])
    checked = [r["hop1_bits_identical"] for r in state.of_kind("tf")]
    meta["hop1_bits_identical_all"] = _all(checked)
    meta["hop1_bits_checks"] = sum(c is not None for c in checked)
    meta["commands"] = [r["command"] for r in state.of_kind("meta")]
    result = {**meta, "rows": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    if not args.quick:
        result["plots"] = plot(rows, out.with_suffix(""))
    return result


def summary(result: dict, json_path: str | Path) -> str:
    """What ``qkvshare eval`` prints: the markdown table written beside
    ``json_path``, then whether every later card kept the hop-1 codes."""
    table = Path(json_path).with_suffix(".md").read_text()
    return (
        f"{table}\nhop-1 codes bit-identical in every later card: "
        f"{result['hop1_bits_identical_all']}"
    )
