"""Figure of the FedSSG ablation: each metric, method and arm as grouped bars with seed spread."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def ablation_bars(runs: pd.DataFrame, columns: list[str], headings: list[str], arms: tuple[str, ...]) -> Figure:
    methods = list(dict.fromkeys(runs["method"]))
    figure = Figure(figsize=(3.2 * len(columns), 3.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(columns), sharey=True))
    width = 0.8 / len(arms)
    for ax, column, heading in zip(axes, columns, headings, strict=True):
        for j, arm in enumerate(arms):
            means, stds = [], []
            for method in methods:
                values = runs[(runs["method"] == method) & (runs["arm"] == arm)][column].dropna().astype(float)
                means.append(values.mean() if len(values) else np.nan)
                stds.append(values.std(ddof=1) if len(values) > 1 else 0.0)
            x = np.arange(len(methods)) + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=2, label=arm, color=f"C{j}")
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_title(heading, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mean over seeds (bars: ± std)")
    axes[-1].legend(title="extra data", fontsize=8)
    return figure
