"""Writing a card: bytes in memory, and a file two ways, A/B in one process.

``CacheCard.save`` writes the card's arrays straight to the file while a
worker thread computes its SHA-256 (``container.write_tensors_file``). The
baseline is what ``save`` did before: assemble the whole card in memory
(``to_bytes``: checksum, then one ``b"".join``), then write those bytes
(``container.write_file``). Both give the same file, byte for byte (checked
on every card here).

Cards of the sender bench's prefill (``bench/sender.py``'s cache under
``--cache-dir``, reused; the prefill runs once where it is missing):
the 16-bit card, the 3-bit adaptive card and the CLI's recommended
5.5-bit card (with the shipped layer profile). Each repetition runs every
(card, way) once, in shuffled order:

- ``to_bytes``: the card as bytes in memory (what the memory and
  distributed transports send);
- ``bytes, then file``: the baseline file write;
- ``save (streamed)``: ``CacheCard.save``.

Peak traced memory (``tracemalloc``, which sees numpy's buffers) is
measured in one untimed run per (card, way): the memory a write needs on
top of the card.

    python bench/card_save.py [--context 8000] [--reps 7]
"""

from __future__ import annotations  # noqa: I001  (qkvshare_mlx before mlx, below)

import argparse
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import qkvshare_mlx

qkvshare_mlx.enable_openblas()  # before mlx is imported

sys.path.insert(0, str(Path(__file__).parent))
from report import command_line, finish, ms_cell, timing  # noqa: E402  (bench/report.py)
from sender import CACHE_DIR, sender_cache  # noqa: E402  (bench/sender.py)

from qkvshare_mlx.card import CacheCard, container  # noqa: E402
from qkvshare_mlx.cli.options import recommended_model_config  # noqa: E402
from qkvshare_mlx.fingerprint import fingerprint  # noqa: E402
from qkvshare_mlx.formats import QuantConfig  # noqa: E402
from qkvshare_mlx.models import load_model  # noqa: E402
from qkvshare_mlx.quant.controllers import with_sensitivity  # noqa: E402
from qkvshare_mlx.quant.mlx_backend import quantize_cache  # noqa: E402
from qkvshare_mlx.sensitivity import shipped_profile  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WAYS = ("to_bytes", "bytes, then file", "save (streamed)")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_cards(model, tokenizer, n: int, cache_dir: Path, tag: str) -> dict:
    keys, values, stats, ids = sender_cache(model, tokenizer, n, cache_dir, tag)
    fp = fingerprint(model, tokenizer)
    lw = with_sensitivity(stats, shipped_profile(model), len(keys))
    settings = {
        "16-bit": ("uniform", 16.0, QuantConfig(), stats),
        "adaptive 3-bit": ("saliency", 3.0, QuantConfig(), stats),
        "recommended 5.5-bit": (
            "saliency",
            5.5,
            recommended_model_config(5.5, model),
            lw,
        ),
    }
    cards = {}
    for name, (controller, budget, config, st) in settings.items():
        qkv = quantize_cache(
            keys,
            values,
            controller=controller,
            budget_bits=budget,
            stats=st,
            config=config,
        )
        cards[name] = CacheCard.from_quantized(qkv, ids, fp, dtype="float32")
    return cards


def write_once(card: CacheCard, way: str, path: Path) -> int:
    """One write of ``card`` the given way; its size in bytes."""
    if way == "to_bytes":
        return len(card.to_bytes())
    if way == "bytes, then file":
        container.write_file(path, card.to_bytes())
    else:
        card.save(path)
    return path.stat().st_size


def peak_mb(card: CacheCard, way: str, path: Path) -> float:
    """Peak traced allocation of one write, in MB."""
    tracemalloc.start()
    try:
        write_once(card, way, path)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=8000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--dir", type=Path, default=None, help="where files are written")
    p.add_argument("--json", type=Path, default=RESULTS / "card_save.json")
    args = p.parse_args(argv)

    tic = time.perf_counter()
    model, tokenizer = load_model(args.model)
    tag = (args.model or "default").replace("/", "_")
    cards = make_cards(model, tokenizer, args.context, args.cache_dir, tag)
    log(f"cards made ({time.perf_counter() - tic:.0f} s)")
    folder = Path(args.dir or tempfile.mkdtemp(prefix="card_save."))
    path = folder / "card.qkv"
    for name, card in cards.items():  # the two files are the same bytes
        container.write_file(path, card.to_bytes())
        old = path.read_bytes()
        card.save(path)
        if path.read_bytes() != old or old != card.to_bytes():
            raise SystemExit(f"{name}: save and to_bytes wrote different bytes")
    jobs = [(c, w) for c in cards for w in WAYS]
    times: dict[tuple, list[float]] = {}
    sizes = {}
    for rep in range(args.reps + 1):  # rep 0 is the warm-up
        for card, way in random.Random(rep).sample(jobs, len(jobs)):
            t0 = time.perf_counter()
            sizes[card] = write_once(cards[card], way, path)
            t = 1000 * (time.perf_counter() - t0)
            if rep:
                times.setdefault((card, way), []).append(t)
        log(f"rep {rep} done")
    peaks = {j: peak_mb(cards[j[0]], j[1], path) for j in jobs}
    path.unlink(missing_ok=True)
    rows = [
        {
            "card": card,
            "way": way,
            "card_mb": sizes[card] / 1e6,
            "peak_traced_mb": peaks[(card, way)],
            **timing(times[(card, way)]),
        }
        for card, way in jobs
    ]
    med = {(r["card"], r["way"]): r["median_ms"] for r in rows}
    lines = [
        f"Context {args.context} tokens, {args.reps} shuffled repetitions; files "
        f"in {folder} (fsync and rename included).",
        "",
        "| card | MB | way | ms (min-max) | / bytes, then file | peak traced MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["median_ms"] / med[(r["card"], "bytes, then file")]
        lines.append(
            f"| {r['card']} | {r['card_mb']:.1f} | {r['way']} | {ms_cell(r)} | "
            f"{ratio:.2f} | {r['peak_traced_mb']:.1f} |"
        )
    result = {
        "bench": "card_save",
        "context": args.context,
        "reps": args.reps,
        "folder": str(folder),
        "elapsed_s": round(time.perf_counter() - tic, 1),
        "rows": rows,
    }
    finish(args.json, lines, command_line("bench/card_save.py", argv), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
