"""``qkvshare doctor``: is this installation fast and are both runtimes in agreement?

Reports versions, MLX's device, the OpenBLAS preload with measured matmul speed
(with and without it), and the cross-runtime check: the default model's
last-position logits for a fixed 64-token prompt in MLX and in transformers.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from .. import blas
from ..models import resolve_model

# Any fixed text works; it is repeated until it covers PROMPT_TOKENS tokens.
PROMPT_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May? "
)
PROMPT_TOKENS = 64
LOGITS_TOLERANCE = 1e-2  # float32 MLX vs transformers on the same weights


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkvshare doctor", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: SmolLM2-135M)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--skip-models",
        action="store_true",
        help="skip the MLX vs transformers logits check",
    )
    return parser


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def measure_matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` fp32 ``n x n`` matmul speed in MLX, after one warm-up."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32, key=mx.random.key(0))
    b = mx.random.normal((n, n), dtype=mx.float32, key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure_unpatched_gflops(n: int = 1024) -> float | None:
    """``measure_matmul_gflops`` in a fresh interpreter with the preload disabled."""
    code = (
        "from qkvshare_mlx.cli.doctor import measure_matmul_gflops; "
        f"print(measure_matmul_gflops({n}))"
    )
    env = {**os.environ, blas.OPT_OUT_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


def prompt_token_ids(tokenizer, n_tokens: int = PROMPT_TOKENS) -> list[int]:
    """The first ``n_tokens`` tokens of PROMPT_TEXT repeated."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(PROMPT_TEXT * 4, add_special_tokens=False)
    return ids[:n_tokens]


def cross_runtime_check(model_path: str, n_tokens: int = PROMPT_TOKENS) -> dict:
    """Last-position logits of one prompt in MLX and transformers, both float32."""
    import mlx.core as mx
    import numpy as np

    from qkvshare_converters.hf_model import load_hf_model

    from ..models import load_model

    mlx_model, tokenizer = load_model(model_path, dtype="float32")
    hf_model, _ = load_hf_model(model_path, dtype="float32")
    ids = prompt_token_ids(tokenizer, n_tokens)
    mlx_logits = np.array(mlx_model(mx.array([ids]))[0, -1])

    import torch

    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    return {
        "prompt_tokens": len(ids),
        "logits_max_abs_diff": float(np.abs(mlx_logits - hf_logits).max()),
        "argmax_agree": bool(mlx_logits.argmax() == hf_logits.argmax()),
        "argmax_token": tokenizer.decode([int(mlx_logits.argmax())]),
    }


def collect(model: str | None, *, skip_models: bool = False) -> dict:
    """Everything ``doctor`` reports, as one dict."""
    model_path = resolve_model(model)  # fail fast on a bad --model

    import mlx.core as mx

    report = {
        "qkvshare_mlx_version": _version("qkvshare-mlx"),
        "python_version": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx_version": mx.__version__,
        "mlx_lm_version": _version("mlx-lm"),
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "mlx_default_device": str(mx.default_device()),
    }
    status = blas.openblas_status()
    report.update(
        openblas_preloaded=status["preloaded"],
        openblas_effective=status["effective"],
        openblas_path=status["path"],
        openblas_coretype=status["coretype"],
        openblas_note=status["note"],
        blas_matmul_size=1024,
        blas_gflops=round(measure_matmul_gflops(1024), 1),
    )
    unpatched = measure_unpatched_gflops(1024)
    report["blas_gflops_unpatched"] = None if unpatched is None else round(unpatched, 1)
    report["blas_speedup"] = (
        round(report["blas_gflops"] / unpatched, 1) if unpatched else None
    )
    report["model"] = model_path
    if skip_models:
        report.update(logits_max_abs_diff=None, argmax_agree=None)
    elif report["torch_version"] is None or report["transformers_version"] is None:
        report.update(
            logits_max_abs_diff=None,
            argmax_agree=None,
            cross_runtime_note="skipped: pip install 'qkvshare-mlx[hf]'",
        )
    else:
        report.update(cross_runtime_check(model_path))
    return report


def verdict(report: dict) -> list[str]:
    """The checks that failed (empty: the installation is healthy)."""
    failed = []
    if sys.platform.startswith("linux") and os.environ.get(blas.OPT_OUT_ENV, "") in (
        "",
        "0",
    ):
        if not report["openblas_effective"]:
            failed.append(f"OpenBLAS preload: {report['openblas_note']}")
    if report.get("argmax_agree") is False:
        failed.append("MLX and transformers disagree on the next token")
    diff = report.get("logits_max_abs_diff")
    if diff is not None and diff > LOGITS_TOLERANCE:
        failed.append(f"MLX vs transformers logits differ by {diff:.2e}")
    return failed


def _print_human(report: dict) -> None:
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    report = collect(args.model, skip_models=args.skip_models)
    failed = verdict(report)
    report["verdict"] = "ok" if not failed else "FAIL: " + "; ".join(failed)
    if args.json:
        print(json.dumps(report))
    else:
        _print_human(report)
    return 1 if failed else 0
