"""Figures of the method comparison: accuracy per round, and accuracy against bytes uploaded."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_MARKERS = "osD^v<>pP*hX"


def _panels(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One panel per scenario: lambda, and the join ratio when the grid varies it."""
    keys = ["lambda", "join_ratio"] if "join_ratio" in frame and frame["join_ratio"].nunique() > 1 else ["lambda"]
    panels = []
    for values, sub in frame.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        title = f"Dirichlet λ = {values[0]}" + (f", {values[1]:.0%} of hospitals per round" if len(values) > 1 else "")
        panels.append((title, sub))
    return panels


def accuracy_per_round(curves: pd.DataFrame) -> Figure:
    """One panel per lambda: each method's mean (over seeds) accuracy against the round.

    Validation balanced accuracy: the personalized models on their own splits for every
    method (solid), the global model on the pooled splits where the method has one (dashed).
    """
    panels = _panels(curves)
    figure = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    methods = list(dict.fromkeys(curves["method"]))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (title, sub) in zip(axes, panels, strict=True):
        for method in methods:
            mean = sub[sub["method"] == method].groupby("round")[["personalized_val_balanced_accuracy", "global_val_balanced_accuracy"]].mean()
            if mean.empty:
                continue
            ax.plot(mean.index, mean["personalized_val_balanced_accuracy"], color=colors[method], lw=1.6, label=method)
            if mean["global_val_balanced_accuracy"].notna().any():
                ax.plot(mean.index, mean["global_val_balanced_accuracy"], color=colors[method], lw=1, ls="--", alpha=0.7)
        ax.set(title=title, xlabel="round", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation balanced accuracy (solid: personalized, dashed: global)")
    axes[-1].legend(fontsize=8, loc="lower right", ncol=2)
    return figure


def accuracy_vs_communication(runs: pd.DataFrame) -> Figure:
    """Personalized balanced accuracy against MB uploaded over the run, one point per method x lambda."""
    panels = _panels(runs)
    figure = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    methods = list(dict.fromkeys(runs["method"]))
    for ax, (title, sub) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            group = sub[sub["method"] == method]
            if group.empty:
                continue
            x = group["communication.mb_up_total"].astype(float)
            y = group["personalized.mean.balanced_accuracy"].astype(float)
            ax.errorbar(
                x.mean(), y.mean(), xerr=x.std(ddof=1) if len(group) > 1 else None,
                yerr=y.std(ddof=1) if len(group) > 1 else None,
                marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", ms=7, capsize=3, label=method, ls="none",
            )  # fmt: skip
        ax.set(title=title, xlabel="MB uploaded over the run (all clients)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("personalized balanced accuracy (mean over hospitals)")
    axes[-1].legend(fontsize=8, loc="lower right", ncol=2)
    return figure
