"""Aggregation of the study's state: complete problems only, JSON, markdown, plots."""

import argparse
import json
from pathlib import Path

import numpy as np

from qkvshare_mlx.evals.report import complete, report
from qkvshare_mlx.evals.state import State


def test_complete_keeps_only_whole_problems():
    # only problems with a complete grid are aggregated
    part = [{"problem": 0}, {"problem": 0}, {"problem": 1}]
    assert [r["problem"] for r in complete(part, 2)] == [0, 0]


def test_report_averages_complete_problems(tmp_path):
    """report(): rows average only problems whose grid is complete; the
    table, the JSON and both plots are written."""
    state = State(tmp_path / "state.jsonl")
    state.add(
        {
            "kind": "meta",
            "problem": -1,
            "mode": "command",
            "budget_bits": None,
            "hops": 0,
            "command": "cmd",
        }
    )
    kls = {0: 0.2, 1: 0.4, 2: 9.0}  # problem 2 stays partial
    for i, kl in kls.items():
        for c in ("uniform", "saliency"):
            for h in (1, 2):
                if i == 2 and h == 2:
                    continue
                state.add(
                    {
                        "kind": "tf",
                        "problem": i,
                        "mode": c,
                        "budget_bits": 3.0,
                        "hops": h,
                        "kl": kl * h + (c == "saliency"),
                        "top1_agreement": 1.0 - kl,
                        "tokens": 10 * h,
                        "effective_bits": 3.0,
                        "payload_bytes": 100,
                        "fp16_bytes": 500,
                        "hop1_bits_identical": (h > 1) or None,
                        "seconds": 1.0,
                    }
                )
    args = argparse.Namespace(
        hops=[1, 2],
        budgets=[3.0],
        controllers=["uniform", "saliency"],
        gen_hops=[],
        gen_controllers=[],
        json=str(tmp_path / "out.json"),
        quick=False,
    )
    res = report(state, args, {"model": "m", "dtype": "float32", "machine": "x"})
    rows = {(r["controller"], r["hops"]): r for r in res["rows"]}
    assert set(rows) == {(c, h) for c in ("uniform", "saliency") for h in (1, 2)}
    assert all(r["problems"] == 2 for r in rows.values())
    assert np.isclose(rows["uniform", 2]["kl"], (0.4 + 0.8) / 2)
    assert np.isclose(rows["saliency", 1]["kl"], (1.2 + 1.4) / 2)
    assert np.isclose(rows["uniform", 1]["top1_agreement"], 0.7)
    assert rows["uniform", 2]["hop1_bits_identical"] is True
    assert rows["uniform", 1]["hop1_bits_identical"] is None
    assert res["tf_problems"] == 2 and res["commands"] == ["cmd"]
    md = (tmp_path / "out.md").read_text()
    assert "| uniform | 3.0 | 2 | 3.000 | 0.6000 |" in md
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == res["rows"]
    for p in res["plots"]:
        assert Path(p).stat().st_size > 1000
