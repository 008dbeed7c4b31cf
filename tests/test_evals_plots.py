"""The study's figures: matplotlib is optional, its absence says how to install it."""

import sys

import pytest

from qkvshare_mlx.evals.plots import plot

ROWS = [
    {"controller": c, "budget_bits": 3.0, "hops": h, "effective_bits": 3.0, "kl": kl}
    for c, kl in (("uniform", 0.5), ("saliency", 0.2))
    for h in (1, 2)
]


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'qkvshare-mlx\[eval\]'"):
        plot(ROWS, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plot(ROWS, tmp_path / "p")
    assert paths == [str(tmp_path / "p_bits.png"), str(tmp_path / "p_hops.png")]
    assert all((tmp_path / p).stat().st_size > 1000 for p in paths)
    assert plot([{**r, "kl": None} for r in ROWS], tmp_path / "q") == []


def test_quality_against_bytes_figure(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {
            **r,
            "card_bytes": 1e6 * r["budget_bits"],
            "agreement": 0.5,
            "top1_agreement": 0.9,
        }
        for r in ROWS
    ]
    paths = plot(rows, tmp_path / "p")
    assert paths[-1] == str(tmp_path / "p_quality_bytes.png")
    assert (tmp_path / "p_quality_bytes.png").stat().st_size > 1000
