"""Every figure of the package, as PNG files: perplexity by position (``eval ppl``) and the needle
accuracy heatmap (``niah``). matplotlib is optional: without it each plot function writes nothing
and returns False (the commands print the same numbers as tables)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List

import numpy as np

from .stream import StreamReport, format_tokens

__all__ = ["have_matplotlib", "figure", "plot_ppl", "plot_heatmap"]


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def figure(w: float, h: float):
    """A matplotlib Figure with an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> bool:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return True


def plot_ppl(report: StreamReport, path: str, title: str = "") -> bool:
    """Perplexity by position bucket as a PNG; False (nothing written) without matplotlib."""
    if not have_matplotlib():
        return False
    bs = [b for b in report.buckets if b.tokens]
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(bs)))  # buckets double in width: evenly spaced = log scale
    ax.plot(xs, [b.ppl for b in bs], marker="o")
    ax.set_xticks(xs)
    ax.set_xticklabels([b.label for b in bs], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "perplexity by position", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(results: List[Dict[str, Any]], path: str, title: str = "") -> bool:
    """Accuracy heatmap (depth bucket x length), one panel per n-iter; False without matplotlib."""
    if not have_matplotlib():
        return False
    lengths = sorted({r["length"] for r in results})
    iters = sorted({r["iters"] for r in results})
    nb = len(results[0]["by_depth"])
    fig = figure(2.2 + 1.1 * len(lengths) * len(iters), 3.6)
    for k, n in enumerate(iters):
        ax = fig.add_subplot(1, len(iters), k + 1)
        grid = np.full((nb, len(lengths)), np.nan)
        for r in results:
            if r["iters"] != n:
                continue
            j = lengths.index(r["length"])
            for i, b in enumerate(r["by_depth"]):
                if b["accuracy"] is not None:
                    grid[i, j] = b["accuracy"]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(nb):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([format_tokens(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(nb))
        ax.set_yticklabels([f"{b['lo']:.1f}-{b['hi']:.1f}" for b in results[0]["by_depth"]],
                           fontsize=7)
        ax.set_xlabel("context length")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{n}-iter", fontsize=9)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
