"""The benches' long input: a multi-agent transcript of GSM8K train problems.

Imported by the bench scripts (run as ``python bench/<name>.py``, so this
folder is on ``sys.path``): ``ttft.py``, ``sender.py``, ``fidelity_search.py``.
"""

from __future__ import annotations


def transcript_tokens(tokenizer, n: int) -> list[int]:
    """The first ``n`` token ids of the transcript (planner, solver and
    checker turns over GSM8K train problems and their worked solutions)."""
    from qkvshare_mlx.evals.gsm8k import load_problems

    ids: list[int] = []
    for i, p in enumerate(load_problems("train", 2000)):
        turn = (
            f"[Turn {i + 1}] Planner: Problem {i + 1}: {p['question']}\n"
            f"Solver: {p['answer'].replace('####', 'Final answer:')}\n"
            f"Checker: I re-did the arithmetic; the answer {p['final']} holds.\n\n"
        )
        ids += tokenizer.encode(turn, add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"only {len(ids)} transcript tokens available, need {n}")
