"""GSM8K problems, answer extraction and answer matching.

The data is not shipped with the package: it lives in a ``shared/data/gsm8k`` folder
beside the repository (JSON lines with ``question`` and ``answer``; the gold answer
ends with ``#### <number>``), or wherever ``QKVSHARE_GSM8K`` points.

This module knows the data and its answer format only: no model, no MLX (the
demos and benchmarks import it cheaply); the agents' roles are in ``roles``.
"""

import json
import os
import re
from pathlib import Path

from ..errors import QKVShareError

DATA_ENV = "QKVSHARE_GSM8K"
_RELATIVE_DIR = Path("shared") / "data" / "gsm8k"
_FINAL_MARK = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def find_gsm8k_dir() -> Path:
    """The GSM8K data folder.

    ``$QKVSHARE_GSM8K`` if set; otherwise the first ``shared/data/gsm8k`` found
    walking up from the current directory, then from this repository's checkout.

    Raises:
        QKVShareError: No folder found (the message lists where it looked).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise QKVShareError(f"{DATA_ENV}={env} is not a folder")
        return path
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parents[2]]
    searched = []
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / _RELATIVE_DIR
            if candidate.is_dir():
                return candidate
            searched.append(str(folder))
    raise QKVShareError(
        f"GSM8K data not found: set {DATA_ENV} or put it in "
        f"<repo>/../{_RELATIVE_DIR} (looked for {_RELATIVE_DIR} under: "
        f"{', '.join(dict.fromkeys(searched))})"
    )


def _normalize_number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a GSM8K solution or a model's reply.

    Prefers ``#### <number>``; otherwise the last number in the text. Commas are
    dropped and trailing decimal zeros removed ("1,200.50" -> "1200.5").

    Returns:
        The number as a string, or None if the text contains no number.
    """
    marked = _FINAL_MARK.findall(text)
    if marked:
        return _normalize_number(marked[-1])
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def load_problems(
    split: str = "test", n: int | None = None, *, data_dir: Path | None = None
) -> list[dict]:
    """Load GSM8K problems in file order.

    Args:
        split: "test" or "train".
        n: Keep only the first ``n`` problems (all if None).
        data_dir: The data folder; default ``find_gsm8k_dir()``.

    Returns:
        A list of ``{"question", "answer", "final"}`` dicts, where ``final`` is
        the gold number as ``extract_answer`` normalises it.
    """
    if split not in ("test", "train"):
        raise QKVShareError(f"split must be 'test' or 'train' but got {split!r}")
    path = Path(data_dir or find_gsm8k_dir()) / f"{split}.jsonl"
    problems = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if n is not None and len(problems) >= n:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
            except (ValueError, KeyError) as e:
                raise QKVShareError(
                    f"{path}:{line_number}: expected a JSON object with 'question' "
                    f"and 'answer' but got {line[:60]!r}"
                ) from e
            problems.append(
                {
                    "question": question,
                    "answer": answer,
                    "final": extract_answer(answer),
                }
            )
    return problems


def numeric_match(predicted: str | None, gold: str | None) -> bool:
    """GSM8K exact match on normalized numbers ("18" == "18.0")."""
    if predicted is None or gold is None:
        return False
    try:
        return float(predicted) == float(gold)
    except ValueError:
        return predicted == gold
