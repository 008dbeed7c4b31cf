"""Figures of the study: teacher-forced KL by bits, hops and controller.

matplotlib is optional (the ``eval`` extra, ``pip install 'qkvshare-mlx[eval]'``)
and imported only when a figure is drawn. The module draws aggregated rows
(``report``); it knows nothing about the state or the models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _panels(plt, tf, ctrls, panel, x, title, xlabel, path, width, log_x=False):
    """One figure: a panel per value of ``panel``, KL vs ``x`` per controller."""
    values = sorted({r[panel] for r in tf})
    fig, axes = plt.subplots(
        1, len(values), figsize=(width * len(values), 4), sharey=True
    )
    axes = np.atleast_1d(axes)
    for ax, v in zip(axes, values):
        for c in ctrls:
            pts = sorted(
                (r[x], r["kl"]) for r in tf if r["controller"] == c and r[panel] == v
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title.format(v))
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("teacher-forced KL vs exact")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(rows, prefix: Path) -> list[str]:
    """KL plots of the teacher-forced rows: ``<prefix>_bits.png`` (KL vs
    effective bits, a panel per hop count) and ``<prefix>_hops.png`` (KL vs
    hops, a panel per budget).

    Returns:
        The paths written (none when no row has a KL).

    Raises:
        ImportError: matplotlib is not installed (with the install command).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "the eval plots need matplotlib, which is not installed: "
            "pip install 'qkvshare-mlx[eval]'"
        ) from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = [r for r in rows if r["kl"] is not None]
    if not tf:
        return []
    ctrls = sorted({r["controller"] for r in tf})
    paths = [
        _panels(
            plt,
            tf,
            ctrls,
            "hops",
            "effective_bits",
            "{} hop(s)",
            "effective bits",
            str(prefix) + "_bits.png",
            4,
        ),
        _panels(
            plt,
            tf,
            ctrls,
            "budget_bits",
            "hops",
            "budget {} bits",
            "hops",
            str(prefix) + "_hops.png",
            3.5,
            log_x=True,
        ),
    ]
    plt.close("all")
    return paths
