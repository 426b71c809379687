"""The agreement figures of a dataset's measurements against an expert's: Bland–Altman and AI against manual,
as PNG bytes (``metrics.stats`` computes the numbers they show).

Drawn on matplotlib's object-oriented Agg canvas, not pyplot, so they are safe in worker threads and leak no
figures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from nnsam2_assets.metrics.stats import bland_altman, paired_values

if TYPE_CHECKING:  # matplotlib loads only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100


def _figure(size_px: tuple[int, int]) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def bland_altman_png(
    ai: Sequence[float] | pd.Series,
    manual: Sequence[float] | pd.Series,
    title: str = "",
    ddof: int = 1,
    units: str = "",
    size_px: tuple[int, int] = (600, 400),
) -> bytes:
    """Bland–Altman plot (mean vs difference, bias and LoA lines) as PNG bytes, ~600×400 px by default."""
    a, m = paired_values(ai, manual)
    ba = bland_altman(a, m, ddof=ddof)
    fig, ax = _figure(size_px)
    mean = (a + m) / 2
    diff = a - m
    outside = (diff < ba.loa_lower) | (diff > ba.loa_upper)
    ax.scatter(mean[~outside], diff[~outside], s=10, alpha=0.6, color="tab:blue")
    ax.scatter(
        mean[outside], diff[outside], s=14, alpha=0.8, color="tab:red", label=f"outside LoA ({ba.n_outliers})"
    )
    ax.axhline(ba.bias, color="k", lw=1, label=f"bias {ba.bias:.3g}")
    for y in (ba.loa_lower, ba.loa_upper):
        ax.axhline(y, color="gray", ls="--", lw=1)
    ax.axhline(0, color="lightgray", lw=0.8, zorder=0)
    u = f" ({units})" if units else ""
    ax.set_xlabel(f"mean of AI and manual{u}")
    ax.set_ylabel(f"AI − manual{u}")
    ax.set_title(
        title or f"Bland–Altman (LoA {ba.loa_lower:.3g} to {ba.loa_upper:.3g}, SD ddof={ddof})", fontsize=10
    )
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def scatter_png(
    ai: Sequence[float] | pd.Series,
    manual: Sequence[float] | pd.Series,
    title: str = "",
    units: str = "",
    size_px: tuple[int, int] = (400, 400),
) -> bytes:
    """AI against manual with the identity line, as PNG bytes (the companion of ``bland_altman_png``)."""
    a, m = paired_values(ai, manual)
    fig, ax = _figure(size_px)
    ax.scatter(m, a, s=12, alpha=0.7, color="tab:blue")
    lo, hi = float(min(a.min(), m.min())), float(max(a.max(), m.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", ls="--", lw=1, label="identity")
    u = f" ({units})" if units else ""
    ax.set_xlabel(f"manual{u}")
    ax.set_ylabel(f"AI{u}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)
