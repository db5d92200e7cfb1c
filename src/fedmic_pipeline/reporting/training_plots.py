"""Figures of a training run: learning curves, communication, per-site and per-device accuracy.

Built on `matplotlib.figure.Figure` directly (no pyplot state), so nodes can return them
to Kedro's matplotlib dataset and tests can draw them in parallel safely.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def training_curves(history: pd.DataFrame, algorithm: str) -> Figure:
    """Validation balanced accuracy per round (global on the pooled validation splits,
    personalized on each hospital's own) and MB moved per round. No test set is scored per
    round: the test sets are touched only by the final evaluation."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    rounds = history["round"].to_numpy()
    for column, label in (
        ("global_val_balanced_accuracy", "global model, pooled validation"),
        ("personalized_val_balanced_accuracy", "personalized models, own validation (mean)"),
        ("train_accuracy", "local training batches (accuracy)"),
    ):
        if column in history and history[column].notna().any():
            left.plot(rounds, history[column].astype(float), marker="o", ms=3, label=label)
    left.set(xlabel="round", ylabel="balanced accuracy", title=f"{algorithm}: validation per round", ylim=(0, 1.02))
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    width = 0.4
    right.bar(rounds - width / 2, history["bytes_up_total"] / 1e6, width, label="uploaded")
    right.bar(rounds + width / 2, history["bytes_down_total"] / 1e6, width, label="downloaded")
    dense = history["bytes_dense_total"] / 2e6
    right.plot(rounds, dense, "k--", lw=1, label="FedAvg dense, one way")
    right.set(xlabel="round", ylabel="MB (all sampled clients)", title="communication per round")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    return figure


def site_and_device_accuracy(sites: pd.DataFrame, devices: pd.DataFrame, algorithm: str) -> Figure:
    """Each hospital's personalized balanced accuracy and the global model's under each device, with 95% CIs."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    if len(sites):
        x = np.arange(len(sites))
        acc = sites["balanced_accuracy"].to_numpy(float)
        err = np.vstack([acc - sites["balanced_accuracy_ci_low"].to_numpy(float), sites["balanced_accuracy_ci_high"].to_numpy(float) - acc])
        left.bar(x, acc, yerr=np.nan_to_num(err), capsize=3, color="tab:blue", alpha=0.8)
        left.axhline(float(np.nanmean(acc)), color="k", ls="--", lw=1, label=f"mean {np.nanmean(acc):.3f}")
        left.set_xticks(x, [f"client_{c:02d}" for c in sites["client_id"]], rotation=45, ha="right", fontsize=8)
        left.legend(fontsize=8)
    left.set(ylabel="balanced accuracy (local test)", title=f"{algorithm}: personalized model per hospital", ylim=(0, 1.05))
    left.grid(alpha=0.3, axis="y")
    if len(devices):
        x = np.arange(len(devices))
        acc = devices["balanced_accuracy"].to_numpy(float)
        err = np.vstack([acc - devices["balanced_accuracy_ci_low"].to_numpy(float), devices["balanced_accuracy_ci_high"].to_numpy(float) - acc])
        colors = ["tab:red" if held else "tab:green" for held in devices["held_out"]]
        right.bar(x, acc, yerr=err, capsize=3, color=colors, alpha=0.8)
        labels = [f"{name}\n(unseen)" if held else name for name, held in zip(devices["device"], devices["held_out"], strict=True)]
        right.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        right.set(title="global model per imaging device")
    else:
        right.text(0.5, 0.5, "no global model\n(local-only / FedBN)", ha="center", va="center", transform=right.transAxes)
        right.set_xticks([])
    right.set(ylabel="balanced accuracy (global test)", ylim=(0, 1.05))
    right.grid(alpha=0.3, axis="y")
    return figure
