"""Small plotting helpers so every workbook figure has a title, labelled axes with units, and a legend when needed.

Leaves out: styling themes and interactive backends (notebooks use matplotlib inline; widgets
call these helpers inside their update function).

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> fig, ax = axes("Loss", "step", "loss (nats)")
>>> ax.get_xlabel(), ax.get_ylabel(), ax.get_title()
('step', 'loss (nats)', 'Loss')
"""
from __future__ import annotations

from pathlib import Path


def label(ax, title: str, xlabel: str, ylabel: str, legend: bool | None = None):
    """Set title and axis labels on `ax`; add a legend if asked, or (None) if more than one artist is labelled."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, _ = ax.get_legend_handles_labels()
    if legend or (legend is None and len(handles) > 1):
        ax.legend()
    return ax


def axes(title: str, xlabel: str, ylabel: str, figsize=(6.4, 3.6)):
    """(fig, ax): a new figure with one labelled axes."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    label(ax, title, xlabel, ylabel, legend=False)
    return fig, ax


def bars(ax, names, values, title: str, ylabel: str, xlabel: str = "", fmt: str = "{:.2f}"):
    """A bar chart on `ax` with each bar's value written above it."""
    rects = ax.bar([str(n) for n in names], values)
    for rect, value in zip(rects, values):
        ax.annotate(fmt.format(value), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center", va="bottom", fontsize=8)
    return label(ax, title, xlabel, ylabel, legend=False)


def save_png(fig, path, dpi: int = 100) -> Path:
    """Write `fig` to `path` as PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
