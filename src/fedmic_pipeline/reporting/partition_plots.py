"""Figures of a federated partition: who holds which classes, which devices, what they look like.

Built on `matplotlib.figure.Figure` directly, never `pyplot`: no global figure registry,
no backend switch, nothing to leak between Kedro nodes or tests; a figure is freed when
its last reference goes. Inputs are plain numpy arrays so the functions serve the
pipeline, notebooks and tests alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .image_cells import show_image

_CELL_IN = 0.75  # inches per grid cell of the bubble charts
_DEVICE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_HELD_OUT_COLOUR = "#7f7f7f"


def _bubble_sizes(counts: np.ndarray, cell_in: float) -> np.ndarray:
    """Marker areas (points^2) proportional to the counts; the largest fills 90% of a cell."""
    peak = float(counts.max()) if counts.size and counts.max() > 0 else 1.0
    diameter_pt = 0.9 * cell_in * 72.0
    return counts.astype(np.float64) / peak * diameter_pt**2


def _annotate_bubbles(ax, xs: np.ndarray, ys: np.ndarray, counts: np.ndarray, sizes: np.ndarray) -> None:
    """Write each count in its bubble when it fits, else just above it."""
    for x, y, n, s in zip(xs, ys, counts, sizes):
        if n == 0:
            continue
        label = str(int(n))
        fits = math.sqrt(s) > 7.0 * len(label) + 4.0
        if fits:
            ax.annotate(label, (x, y), ha="center", va="center", fontsize=8, color="white", fontweight="bold")
        else:
            ax.annotate(label, (x, y), xytext=(0, 0.5 * math.sqrt(s) + 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="black")


def class_client_bubble_figure(
    counts: np.ndarray,
    class_names: Sequence[str],
    client_names: Sequence[str],
    dirichlet_lambda: float,
) -> Figure:
    """Class (y) by client (x) bubble chart, area proportional to count (FedMIC's Figure 3).

    `counts` has shape (n_classes, n_clients).
    """
    counts = np.asarray(counts)
    n_classes, n_clients = counts.shape
    fig = Figure(figsize=(max(6.0, _CELL_IN * n_clients + 2.5), max(2.5, _CELL_IN * n_classes + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    ys, xs = np.meshgrid(np.arange(n_classes), np.arange(n_clients), indexing="ij")
    sizes = _bubble_sizes(counts, _CELL_IN)
    colours = np.broadcast_to(np.arange(n_classes)[:, None], counts.shape)
    ax.scatter(xs.ravel(), ys.ravel(), s=sizes.ravel(), c=colours.ravel(), cmap="tab10", vmin=0, vmax=9,
               alpha=0.75, edgecolors="black", linewidths=0.5)
    _annotate_bubbles(ax, xs.ravel(), ys.ravel(), counts.ravel(), sizes.ravel())
    totals = counts.sum(axis=0)
    ax.set_xticks(range(n_clients), [f"{name}\nn={int(t)}" for name, t in zip(client_names, totals)], fontsize=8)
    ax.set_yticks(range(n_classes), list(class_names))
    ax.set_xlim(-0.6, n_clients - 0.4)
    ax.set_ylim(-0.6, n_classes - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("client (hospital)")
    ax.set_ylabel("class")
    ax.grid(True, linestyle=":", linewidth=0.5, alpha=0.6)
    ax.set_axisbelow(True)
    ax.set_title(f"Images per class and client: Dirichlet \u03bb = {dirichlet_lambda:g}, K = {n_clients} clients "
                 f"({int(counts.sum())} images; bubble area \u221d count)", fontsize=10)
    return fig


def device_client_figure(
    counts: np.ndarray,
    device_names: Sequence[str],
    client_names: Sequence[str],
    held_out: str | None,
) -> Figure:
    """Device (y) by client (x) bubble chart; the held-out device's row is marked unseen.

    `counts` has shape (n_devices, n_clients): images of each client under each device
    (one device per client, so one bubble per column).
    """
    counts = np.asarray(counts)
    n_devices, n_clients = counts.shape
    fig = Figure(figsize=(max(6.0, _CELL_IN * n_clients + 4.0), max(2.5, _CELL_IN * n_devices + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    sizes = _bubble_sizes(counts, _CELL_IN)
    for d, name in enumerate(device_names):
        if name == held_out:
            ax.axhspan(d - 0.5, d + 0.5, color=_HELD_OUT_COLOUR, alpha=0.15, hatch="//", linewidth=0)
            ax.annotate("held out: never assigned, global test only (unseen device)", (n_clients / 2 - 0.5, d),
                        ha="center", va="center", fontsize=8, color="#404040", style="italic")
            continue
        xs = np.arange(n_clients)
        mask = counts[d] > 0
        colour = _DEVICE_COLOURS[d % len(_DEVICE_COLOURS)]
        ax.scatter(xs[mask], np.full(mask.sum(), d), s=sizes[d][mask], color=colour, alpha=0.8,
                   edgecolors="black", linewidths=0.5)
        _annotate_bubbles(ax, xs[mask], np.full(mask.sum(), d), counts[d][mask], sizes[d][mask])
    per_device_clients = (counts > 0).sum(axis=1)
    labels = []
    for d, name in enumerate(device_names):
        if name == held_out:
            labels.append(f"{name}\n(held out, unseen)")
        else:
            labels.append(f"{name}\n{int(per_device_clients[d])} client(s), {int(counts[d].sum())} img")
    ax.set_yticks(range(n_devices), labels, fontsize=8)
    ax.set_xticks(range(n_clients), list(client_names), fontsize=8)
    ax.set_xlim(-0.6, n_clients - 0.4)
    ax.set_ylim(-0.6, n_devices - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("client (hospital)")
    ax.grid(True, linestyle=":", linewidth=0.5, alpha=0.6)
    ax.set_axisbelow(True)
    ax.set_title("Imaging device of each hospital (bubble area \u221d the hospital's images)", fontsize=10)
    return fig


def device_examples_figure(
    images_by_device: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    held_out: str | None,
    per_class: int = 3,
) -> Figure:
    """One row per device, `per_class` images of each class rendered by that device.

    The same test images (the first `per_class` of each class, by position) appear in
    every row, so rows differ only by the device. The held-out device's row says unseen.
    """
    y = np.asarray(labels)
    picks: list[tuple[int, int]] = []  # (class, image index)
    for c in range(len(class_names)):
        for i in np.flatnonzero(y == c)[:per_class]:
            picks.append((c, int(i)))
    names = list(images_by_device)
    n_rows, n_cols = len(names), max(1, len(picks))
    fig = Figure(figsize=(max(4.0, 0.95 * n_cols + 2.2), 1.0 * n_rows + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, name in enumerate(names):
        images = images_by_device[name]
        for col in range(n_cols):
            ax = axes[r, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(picks):
                ax.set_axis_off()
                continue
            c, i = picks[col]
            show_image(ax, images[i])
            if r == 0:
                ax.set_title(str(class_names[c]), fontsize=8)
            if col == 0:
                label = f"{name}\n(unseen)" if name == held_out else name
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center",
                              color="#b00000" if name == held_out else "black")
    fig.suptitle("The same global-test images as each imaging device renders them", fontsize=10)
    return fig
