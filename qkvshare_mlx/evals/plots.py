"""Figures of the study: teacher-forced KL by bits, hops and controller, and
quality (answer agreement, top-1) against card bytes.

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


def quality_vs_bytes(plt, rows, path: str) -> str | None:
    """Answer agreement and teacher-forced top-1 against mean card bytes, per
    controller, at 1 hop: ``<prefix>_quality_bytes.png``."""
    one = [r for r in rows if r["hops"] == 1 and r.get("card_bytes")]
    if not one:
        return None
    ctrls = sorted({r["controller"] for r in one})
    colour = {c: plt.get_cmap("tab10")(k % 10) for k, c in enumerate(ctrls)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "agreement", "answer agreement with the exact chain"),
        (axes[1], "top1_agreement", "teacher-forced top-1 agreement"),
    ):
        for c in ctrls:
            pts = sorted(
                (r["card_bytes"] / 1e6, r[key])
                for r in one
                if r["controller"] == c and r.get(key) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, color=colour[c])
        ax.set_xlabel("mean card MB (1 hop)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("quality against card bytes (budgets 2.5 to 6 bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(rows, prefix: Path) -> list[str]:
    """KL plots of the teacher-forced rows: ``<prefix>_bits.png`` (KL vs
    effective bits, a panel per hop count) and ``<prefix>_hops.png`` (KL vs
    hops, a panel per budget); ``<prefix>_quality_bytes.png`` (agreement and
    top-1 vs card bytes).

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
    extra = quality_vs_bytes(plt, rows, str(prefix) + "_quality_bytes.png")
    plt.close("all")
    return paths + ([extra] if extra else [])
