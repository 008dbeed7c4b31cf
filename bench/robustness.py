"""Fuzz campaign against the CacheCard reader: counts per category and outcome.

Every case mutates a small valid card (qkvshare_mlx.testing.mutations), loads
it with the expected model fingerprint under tracemalloc, and classifies the result:
typed error (a CardError), accepted-identical (re-serialises to the original
bytes), accepted-different or other (a crash): the last two are reader bugs.
The ``auth_*`` categories mutate a card signed with the kit's key and load it
holding that key: every one must be refused.

    python bench/robustness.py --cases 10000 --seed 0 \
        --json bench/results/robustness.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from qkvshare_mlx.testing import mutations as F

OUTCOMES = ("error", "identical", "different", "crash")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10000, help="mutated cards to load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results to this path")
    return p


def run_campaign(cases: int, seed: int) -> dict:
    """Run ``cases`` random mutations (categories round-robin) and summarise."""
    original = F.small_card_bytes(seed)
    signed = F.small_card_bytes(seed, key=F.KEY)
    rng = np.random.default_rng(seed)
    categories = sorted(F.MUTATIONS) + sorted(F.AUTH_MUTATIONS)
    counts: dict[str, Counter] = defaultdict(Counter)
    errors: dict[str, Counter] = defaultdict(Counter)
    bugs = []
    peak = {"bytes": 0, "ratio": 0.0, "category": None}
    slowest = {"seconds": 0.0, "category": None}
    t0 = time.perf_counter()
    for i in range(cases):
        category = categories[i % len(categories)]
        keyed = category in F.AUTH_MUTATIONS
        base = signed if keyed else original
        category, data = F.mutate(base, rng, category)
        opts = {"key": F.KEY} if keyed else {}
        out = F.load_outcome(base, data, expect=F.FINGERPRINT, **opts)
        counts[category][out.kind] += 1
        if out.error:
            errors[category][out.error] += 1
        if out.kind in ("different", "crash") and len(bugs) < 50:
            bugs.append({"case": i, "category": category, **out.__dict__})
        ratio = out.peak_bytes / F.memory_cap(len(data))
        if ratio > peak["ratio"]:
            peak = {
                "bytes": out.peak_bytes,
                "ratio": ratio,
                "category": category,
                "input_bytes": len(data),
            }
        if out.seconds > slowest["seconds"]:
            slowest = {"seconds": out.seconds, "category": category}
        if (i + 1) % 1000 == 0 or i + 1 == cases:
            print(
                f"  {i + 1}/{cases} cases, {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    flips = counts["flip_payload"]
    auth = Counter()
    for c in F.AUTH_MUTATIONS:
        auth.update(counts[c])
    return {
        "cases": cases,
        "seed": seed,
        "card_bytes": len(original),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "memory_cap": "4 * input_bytes + 1 MiB (tracemalloc peak per load)",
        "max_peak": peak,
        "slowest_load": slowest,
        "payload_flips_detected": f"{flips['error']}/{sum(flips.values())}",
        "forged_signatures_refused": f"{auth['error']}/{sum(auth.values())}",
        "per_category": {
            c: {
                "outcomes": {k: counts[c][k] for k in OUTCOMES},
                "errors": dict(errors[c]),
            }
            for c in categories
        },
        "bugs": bugs,
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
    }


def print_table(res: dict) -> None:
    head = f"{'category':30s}" + "".join(f"{k:>11s}" for k in OUTCOMES)
    print(head)
    print("-" * len(head))
    total = Counter()
    for c, row in res["per_category"].items():
        o = row["outcomes"]
        total.update(o)
        print(f"{c:30s}" + "".join(f"{o[k]:>11d}" for k in OUTCOMES))
    print("-" * len(head))
    print(f"{'total':30s}" + "".join(f"{total[k]:>11d}" for k in OUTCOMES))
    p = res["max_peak"]
    print(
        f"\nmax tracemalloc peak: {p['bytes']} bytes = {p['ratio']:.3f} of the cap "
        f"({res['memory_cap']}), category {p['category']}"
    )
    print(
        f"slowest load: {res['slowest_load']['seconds'] * 1e3:.1f} ms "
        f"({res['slowest_load']['category']})"
    )
    print(f"single-byte payload flips detected: {res['payload_flips_detected']}")
    print(f"forged signed cards refused: {res['forged_signatures_refused']}")
    print(
        f"{res['cases']} cases in {res['wall_seconds']} s; card {res['card_bytes']} B"
    )


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    res = run_campaign(args.cases, args.seed)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    bad = sum(
        r["outcomes"]["different"] + r["outcomes"]["crash"]
        for r in res["per_category"].values()
    )
    refused, total = map(int, res["forged_signatures_refused"].split("/"))
    return 1 if bad or refused != total or res["max_peak"]["ratio"] > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
