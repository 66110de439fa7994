"""Figures for `bitfit compare` and `bitfit analyze` (matplotlib, Agg backend, small PNGs).

Every function writes its PNG atomically (temp file, then ``os.replace``) and returns the path.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

DPI = 110


def _save(fig, path: str) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], path: str,
            title: str = "", cbar_label: str = "", fmt: str = "{:.2g}") -> str:
    """A rows x columns heatmap with the value written in each cell (NaN cells left blank)."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * max(len(col_labels), 3), 0.9 + 0.42 * max(len(row_labels), 2)))
    masked = np.ma.masked_invalid(m)
    im = ax.imshow(masked, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), list(row_labels))
    ax.set_xlabel("layer")
    if title:
        ax.set_title(title, fontsize=10)
    finite = m[np.isfinite(m)]
    hi = finite.max() if finite.size else 0.0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * hi else "white")
    cb = fig.colorbar(im, ax=ax)
    if cbar_label:
        cb.set_label(cbar_label)
    return _save(fig, path)


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str,
              ylabel: str = "", title: str = "", annotations: Optional[Sequence[str]] = None) -> str:
    """Mean score per method with std error bars; ``annotations`` (e.g. trainable %) under each bar."""
    means = np.asarray(means, dtype=float)
    stds = np.nan_to_num(np.asarray(stds, dtype=float))
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(labels), 3.6))
    x = np.arange(len(labels))
    colors = plt.get_cmap("tab10")(np.arange(len(labels)) % 10)
    ax.bar(x, means, yerr=stds, capsize=4, color=colors)
    finite = means[np.isfinite(means)]
    if finite.size:
        top = float((finite + stds[np.isfinite(means)]).max())
        low = float((finite - stds[np.isfinite(means)]).min())
        # scores cluster (50-90): start the axis a little under the lowest bar so differences show
        lo = min(0.0, low) if low <= 0 else max(0.0, low - 0.5 * (top - low) - 5.0)
        ax.set_ylim(lo, top + 0.12 * (abs(top - lo) or 1.0))
    for xi, m in zip(x, means):
        if np.isfinite(m):
            ax.text(xi, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ticks = [f"{lab}\n{a}" for lab, a in zip(labels, annotations)] if annotations else list(labels)
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def learning_curves(curves: dict, path: str, ylabel: str = "", title: str = "") -> str:
    """``curves``: label -> list of (epoch, mean, std). One line per method with a std band."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in curves.items():
        if not pts:
            continue
        pts = sorted(pts)
        e = np.array([p[0] for p in pts], dtype=float)
        m = np.array([p[1] for p in pts], dtype=float)
        s = np.nan_to_num(np.array([p[2] for p in pts], dtype=float))
        ax.plot(e, m, marker="o", ms=3, label=label)
        ax.fill_between(e, m - s, m + s, alpha=0.15)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def size_curve(curves: dict, path: str, ylabel: str = "", title: str = "") -> str:
    """``curves``: label -> list of (train size, mean, std); log-scaled size axis."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in curves.items():
        pts = sorted(pts)
        n = np.array([p[0] for p in pts], dtype=float)
        m = np.array([p[1] for p in pts], dtype=float)
        s = np.nan_to_num(np.array([p[2] for p in pts], dtype=float))
        ax.errorbar(n, m, yerr=s, marker="o", ms=4, capsize=3, label=label)
    ax.set_xscale("log")
    sizes = sorted({p[0] for pts in curves.values() for p in pts})
    if sizes:
        ax.set_xticks(sizes, [f"{int(n):,}" for n in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training examples")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def nice(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.1f}"
