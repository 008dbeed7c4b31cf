"""What a bench's result records about its run, and how it is written.

Imported after ``qkvshare_mlx.enable_openblas()`` (it imports MLX).
"""

from __future__ import annotations

import json
import platform
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
