"""Nodes of `evaluation`: every model on the data it should be judged on.

* the global model on the global test set, clean and as every imaging device renders it
  (including the device no hospital trained on);
* each hospital's personalized model on its own local test split, and on the unseen
  device's rendering of the global test set;
summarised as mean and worst site, with bootstrap 95% intervals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import experiment
from fedmic_pipeline.core.evaluation import SCALAR_METRICS, compute_metrics, predict_proba, summarize_sites
from fedmic_pipeline.core.models import model_from_record
from fedmic_pipeline.reporting import training_plots
from fedmic_pipeline.tracking import mlflow_logging

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def _load(value: Any) -> Any:
    return value() if callable(value) else value


def _metrics(model, x, y, num_classes: int, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    proba = predict_proba(model, x, batch_size=int(evaluation.get("batch_size", 1024)))
    return compute_metrics(
        y.numpy(), proba, num_classes, n_bootstrap=int(evaluation["n_bootstrap"]), seed=int(evaluation["seed"])
    )


def evaluate_federation(
    trained_models: Mapping[str, Callable[[], dict[str, Any]]],
    client_partitions: Mapping[str, Callable[[], Arrays]],
    global_test_set: Arrays,
    dataset_info: dict[str, Any],
    partition_manifest: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """The full evaluation report (JSON): global, per device, per site, summaries."""
    num_classes = int(dataset_info["n_classes"])
    held_out = partition_manifest.get("held_out_device")
    models = {key: model_from_record(_load(record)) for key, record in trained_models.items()}
    clients = {client.client_id: client for client in experiment.build_clients(client_partitions)}
    renderings = {name: experiment.global_test_tensors(global_test_set, name) for name in experiment.device_names(global_test_set)}
    clean_x, clean_y = experiment.global_test_tensors(global_test_set)

    report: dict[str, Any] = {
        "dataset": dataset_info.get("flag"),
        "class_names": [dataset_info.get("label_names", {}).get(str(k), str(k)) for k in range(num_classes)],
        "held_out_device": held_out,
        "global": None,
        "global_by_device": {},
    }
    if "global" in models:
        report["global"] = _metrics(models["global"], clean_x, clean_y, num_classes, evaluation)
        for name, (x, y) in renderings.items():
            report["global_by_device"][name] = _metrics(models["global"], x, y, num_classes, evaluation)

    sites, unseen = [], []
    for key in sorted(k for k in models if k != "global"):
        client = clients[experiment.client_id_of(key)]
        if client.test_y.shape[0] > 0:
            sites.append({"client_id": client.client_id, "device_id": client.device_id, **_metrics(models[key], client.test_x, client.test_y, num_classes, evaluation)})
        if held_out in renderings:
            x, y = renderings[held_out]
            unseen.append({"client_id": client.client_id, **_metrics(models[key], x, y, num_classes, {**evaluation, "n_bootstrap": 0})})
    report["sites"] = sites
    report["site_summary"] = summarize_sites(sites) if sites else None
    report["personalized_on_unseen_device"] = unseen
    report["personalized_on_unseen_device_summary"] = summarize_sites(unseen) if unseen else None
    _log_summary(report)
    return report


def _log_summary(report: dict[str, Any]) -> None:
    if report["global"] is not None:
        g = report["global"]
        logger.info("global model: accuracy %.3f [%.3f, %.3f], AUC %.3f", g["accuracy"], *g["ci"]["accuracy"], g["macro_auc"])
    if report["site_summary"]:
        s = report["site_summary"]
        logger.info(
            "personalized: mean accuracy %.3f, worst %.3f (site %s)",
            s["mean"]["accuracy"], s["worst"]["accuracy"], s["worst_site"]["accuracy"],
        )  # fmt: skip


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def summarize_metrics(evaluation_report: dict[str, Any], training_summary: dict[str, Any]) -> dict[str, Any]:
    """The flat headline numbers (DVC metrics file, MLflow final metrics, comparison rows)."""
    flat: dict[str, Any] = {"algorithm": training_summary["algorithm"]}
    g = evaluation_report["global"]
    for name in SCALAR_METRICS:
        flat[f"global.{name}"] = _clean(g[name]) if g else None
    if g:
        flat["global.accuracy_ci_low"], flat["global.accuracy_ci_high"] = g["ci"]["accuracy"]
    held_out = evaluation_report["held_out_device"]
    unseen = evaluation_report["global_by_device"].get(held_out) if held_out else None
    flat["unseen_device.global.accuracy"] = _clean(unseen["accuracy"]) if unseen else None
    for prefix, summary in (
        ("personalized", evaluation_report["site_summary"]),
        ("unseen_device.personalized", evaluation_report["personalized_on_unseen_device_summary"]),
    ):
        for name in SCALAR_METRICS:
            flat[f"{prefix}.mean.{name}"] = _clean(summary["mean"][name]) if summary else None
            flat[f"{prefix}.worst.{name}"] = _clean(summary["worst"][name]) if summary else None
    totals = training_summary["totals"]
    flat["communication.mb_up_total"] = totals["bytes_up_total"] / 1e6
    flat["communication.mb_down_total"] = totals["bytes_down_total"] / 1e6
    flat["communication.mb_dense_total"] = totals["bytes_dense_total"] / 1e6
    flat["communication.mb_up_per_client_per_round"] = training_summary["mb_up_per_client_per_round"]
    flat["wall_time_s"] = totals["wall_time_s"]
    return flat


def site_table(evaluation_report: dict[str, Any]) -> pd.DataFrame:
    """One row per hospital: its personalized model's metrics with 95% intervals."""
    rows = []
    for site in evaluation_report["sites"]:
        row = {"client_id": site["client_id"], "device_id": site["device_id"], "n_test": site["n"]}
        for name in SCALAR_METRICS:
            row[name] = site[name]
            low, high = site.get("ci", {}).get(name, (None, None))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)


def device_table(evaluation_report: dict[str, Any]) -> pd.DataFrame:
    """The global model's metrics under each imaging device (held-out device flagged)."""
    rows = []
    for name, metrics in evaluation_report["global_by_device"].items():
        row = {"device": name, "held_out": name == evaluation_report["held_out_device"]}
        for metric in SCALAR_METRICS:
            row[metric] = metrics[metric]
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = metrics["ci"][metric]
        rows.append(row)
    return pd.DataFrame(rows, columns=["device", "held_out", *[c for m in SCALAR_METRICS for c in (m, f"{m}_ci_low", f"{m}_ci_high")]])


def class_table(evaluation_report: dict[str, Any]) -> pd.DataFrame:
    """Per-class recall of the global model and of the mean/worst personalized model."""
    names = evaluation_report["class_names"]
    rows = []
    for k, name in enumerate(names):
        row = {"class": name}
        g = evaluation_report["global"]
        row["global_recall"] = g["per_class_recall"][k] if g else None
        site_recalls = [s["per_class_recall"][k] for s in evaluation_report["sites"]]
        valid = [r for r in site_recalls if not math.isnan(r)]
        row["personalized_mean_recall"] = float(np.mean(valid)) if valid else None
        row["personalized_worst_recall"] = float(np.min(valid)) if valid else None
        rows.append(row)
    return pd.DataFrame(rows)


def plot_training_curves(training_history: pd.DataFrame, training_summary: dict[str, Any]) -> Figure:
    return training_plots.training_curves(training_history, str(training_summary["algorithm"]))


def plot_site_metrics(site_metrics: pd.DataFrame, device_metrics: pd.DataFrame, training_summary: dict[str, Any]) -> Figure:
    return training_plots.site_and_device_accuracy(site_metrics, device_metrics, str(training_summary["algorithm"]))


def track_evaluation(
    evaluation_metrics: dict[str, Any],
    evaluation_report: dict[str, Any],
    training_tracking: dict[str, Any],
    training_history: pd.DataFrame,
    site_metrics: pd.DataFrame,
    device_metrics: pd.DataFrame,
    training_summary: dict[str, Any],
) -> dict[str, Any]:
    """Final metrics, the report and its plots into the training run's MLflow entry.

    Logged by run id rather than into whatever run is active, so that an `evaluation`
    run started on its own (the DVC stage) completes the run that trained the models.
    The plots are drawn again here because Kedro's matplotlib dataset is write-only.
    """
    return mlflow_logging.log_evaluation(
        run_id=training_tracking.get("mlflow_run_id"),
        metrics=evaluation_metrics,
        report=evaluation_report,
        figures={
            "training_curves.png": plot_training_curves(training_history, training_summary),
            "site_and_device_accuracy.png": plot_site_metrics(site_metrics, device_metrics, training_summary),
        },
    )
