"""The global model's confusion matrix and reliability diagram, drawn by scikit-learn's displays.

Both read the evaluation report (no predictions are recomputed): the confusion counts
``compute_metrics`` returns, and the per-bin confidence and accuracy behind its ECE
(``core.evaluation.reliability_bins``). Built on ``matplotlib.figure.Figure`` directly, like
the other report figures, so nothing leaks through pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["confusion_matrix_figure", "reliability_figure"]


def _unavailable(title: str, why: str) -> Figure:
    figure = Figure(figsize=(4.5, 3.5))
    ax = figure.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return figure


def confusion_matrix_figure(report: Mapping[str, Any]) -> Figure:
    """Counts and row-normalised recall of the global model on the official test split."""
    from sklearn.metrics import ConfusionMatrixDisplay

    title = "Global model: confusion matrix (official test split)"
    metrics = report.get("global")
    if not metrics:
        return _unavailable(title, "This method has no global model.")
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    names = list(report.get("class_names") or range(counts.shape[0]))
    figure = Figure(figsize=(4.2 * 2, 3.8))
    left, right = figure.subplots(1, 2)
    ConfusionMatrixDisplay(counts, display_labels=names).plot(ax=left, colorbar=False, values_format="d")
    left.set_title("counts")
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ConfusionMatrixDisplay(recall, display_labels=names).plot(ax=right, colorbar=False, values_format=".2f")
    right.set_title("share of each true class (recall on the diagonal)")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def reliability_figure(report: Mapping[str, Any]) -> Figure:
    """Accuracy against confidence per bin (the diagonal is a perfectly calibrated model)."""
    from sklearn.calibration import CalibrationDisplay

    title = "Global model: reliability (official test split)"
    metrics = report.get("global")
    bins = (metrics or {}).get("reliability")
    if not bins:
        return _unavailable(title, "No global model, or a report written before reliability bins were recorded.")
    filled = [i for i, n in enumerate(bins["count"]) if n > 0]
    confidence = np.array([bins["mean_confidence"][i] for i in filled])
    accuracy = np.array([bins["accuracy"][i] for i in filled])
    figure = Figure(figsize=(4.8, 4.2))
    ax = figure.subplots()
    CalibrationDisplay(accuracy, confidence, y_prob=None).plot(ax=ax, name=f"ECE {metrics['ece']:.3f}")
    ax.set_xlabel("mean confidence of the predicted class")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(title)
    figure.tight_layout()
    return figure
