"""What a bench's result records about its run, and how it is written.

Imported after ``qkvshare_mlx.enable_openblas()`` (it imports MLX).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx


def environment() -> dict:
    """The machine, MLX version and default device of this run."""
    return {
        "machine": platform.platform(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
    }


def write_reports(out: Path, result: dict, markdown: str) -> None:
    """``result`` as JSON at ``out`` and ``markdown`` beside it (``.md``)."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out}")


def command_line(script: str, argv=None) -> str:
    """The command that ran ``script`` (``bench/<name>.py``) with ``argv``
    (default: this process's arguments)."""
    return " ".join(["python", script, *(argv or sys.argv[1:])])


def timing(ts: list[float]) -> dict:
    """Median, extremes and every run of millisecond timings, as row fields."""
    return {
        "median_ms": statistics.median(ts),
        "min_ms": min(ts),
        "max_ms": max(ts),
        "runs_ms": ts,
    }


def ms_cell(row: dict) -> str:
    """A row's :func:`timing` as a table cell: ``median (min-max)``."""
    return f"{row['median_ms']:.0f} ({row['min_ms']:.0f}-{row['max_ms']:.0f})"


def finish(out: Path, markdown_lines: list[str], command: str, result: dict) -> None:
    """Print the table, then write ``result`` (with ``command`` and the
    environment) and the markdown (the command, then the table)."""
    table = "\n".join(markdown_lines) + "\n"
    print(table)
    result = {"command": command, **result, **environment()}
    write_reports(out, result, f"Command: `{command}`\n\n" + table)
