"""Figures of the synthetic samples: real beside synthetic, one row per (class, device).

Built on `matplotlib.figure.Figure` directly (never `pyplot`), like partition_plots.py:
no global figure registry, nothing leaks between Kedro nodes or tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .image_cells import show_image

__all__ = ["synthetic_grid_figure"]


def synthetic_grid_figure(
    real: Mapping[tuple[int, int], np.ndarray],
    synthetic: Mapping[tuple[int, int], np.ndarray],
    class_names: Sequence[str],
    device_names: Sequence[str],
    per_side: int = 4,
    title: str | None = None,
) -> Figure:
    """Rows = (class, device) cells in the order of ``synthetic``; left ``per_side`` real
    images of the cell, right ``per_side`` synthetic ones (uint8, (k,H,W) or (k,H,W,3)).

    A cell without real examples leaves its left half empty. With no rows at all (the
    synthetic stage disabled) the figure carries one line of text saying so.
    """
    rows = list(synthetic)
    if not rows:
        fig = Figure(figsize=(6.0, 1.5), layout="constrained")
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, title or "No synthetic samples (synthetic.enabled is false)", ha="center", va="center")
        return fig
    n_cols = 2 * per_side
    fig = Figure(figsize=(0.95 * n_cols + 2.6, 0.95 * len(rows) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), n_cols, squeeze=False))
    for r, key in enumerate(rows):
        c, d = key
        sides = (np.asarray(real.get(key, np.zeros((0,)))), np.asarray(synthetic[key]))
        for col in range(n_cols):
            ax = axes[r, col]
            ax.set_xticks([])
            ax.set_yticks([])
            side, j = divmod(col, per_side)
            images = sides[side]
            if images.ndim < 3 or j >= images.shape[0]:
                ax.set_axis_off()
            else:
                show_image(ax, images[j])
                for spine in ax.spines.values():
                    spine.set_edgecolor("#1f77b4" if side == 0 else "#d62728")
                    spine.set_linewidth(1.5)
            if r == 0 and j == 0:
                ax.set_title("real (global test)" if side == 0 else "synthetic", fontsize=8, loc="left",
                             color="#1f77b4" if side == 0 else "#d62728")
            if col == 0:
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f"{class_names[c]}\n{device_names[d]}", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title or "Real vs synthetic images per (class, device)", fontsize=10)
    return fig
