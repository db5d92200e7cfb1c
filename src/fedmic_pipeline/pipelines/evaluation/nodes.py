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

from fedmic_pipeline import federation
from fedmic_pipeline import model_evaluation
from fedmic_pipeline.core.evaluation import SCALAR_METRICS
from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.core.models import model_from_record
from fedmic_pipeline.reporting import evaluation_plots, training_plots
from fedmic_pipeline.tracking import mlflow_logging

from . import run_binding

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def _load(value: Any) -> Any:
    return value() if callable(value) else value


def evaluate_federation(
    trained_models: Mapping[str, Callable[[], dict[str, Any]]],
    training_summary: dict[str, Any],
    client_partitions: Mapping[str, Callable[[], Arrays]],
    global_test_set: Arrays,
    dataset_info: dict[str, Any],
    partition_manifest: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """The full evaluation report (JSON): global, per device, per site, summaries.

    Only models that training produced on the current partition are scored: the summary's
    manifest hash and model digests are checked first (`run_binding`), and the client
    files against the manifest (`federation.build_clients`).
    """
    run_binding.check_trained_on_this_partition(training_summary, partition_manifest)
    hospitals = sorted(client_partitions)
    missing = [key for key in hospitals if key not in trained_models]
    if missing:
        raise ConfigurationError(
            f"No trained model for {missing} in data/06_models ({len(trained_models)} model files for {len(hospitals)} "
            "hospitals): the models were trained on another partition. Retrain on this one: "
            "`kedro run --pipelines federated_training,evaluation`."
        )
    records = {key: _load(value) for key, value in trained_models.items()}
    run_binding.check_models_match_training(records, training_summary)
    models = {key: model_from_record(records[key]) for key in hospitals}
    report = model_evaluation.evaluate_models(
        global_model=model_from_record(records["global"]) if "global" in records else None,
        last_global_model=model_from_record(records["global_last"]) if "global_last" in records else None,
        personalized={federation.client_id_of(key): model for key, model in models.items()},
        clients=federation.build_clients(client_partitions, partition_manifest=partition_manifest),
        global_test_set=global_test_set,
        dataset_info=dataset_info,
        held_out_device=partition_manifest.get("held_out_device"),
        evaluation=evaluation,
    )
    _log_summary(report)
    return report


def _log_summary(report: dict[str, Any]) -> None:
    if report["global"] is not None:
        g = report["global"]
        logger.info(
            "global model (selected on validation): balanced accuracy %.3f [%.3f, %.3f], AUC %.3f, accuracy %.3f%s",
            g["balanced_accuracy"], *g["ci"]["balanced_accuracy"], g["macro_auc"], g["accuracy"],
            "  CONSTANT PREDICTOR" if g["constant_predictor"] else "",
        )  # fmt: skip
        if report.get("majority_class"):
            m = report["majority_class"]
            logger.info("majority-class baseline: balanced accuracy %.3f, accuracy %.3f", m["balanced_accuracy"], m["accuracy"])
    if report["site_summary"]:
        s = report["site_summary"]
        logger.info(
            "personalized (%d sites): mean balanced accuracy %.3f, worst %.3f (site %s); %d constant predictor(s)",
            s["num_sites"], s["mean"]["balanced_accuracy"], s["worst"]["balanced_accuracy"],
            s["worst_site"]["balanced_accuracy"], s["num_constant_sites"],
        )  # fmt: skip


def summarize_metrics(evaluation_report: dict[str, Any], training_summary: dict[str, Any]) -> dict[str, Any]:
    """The flat headline numbers (DVC metrics file, MLflow final metrics)."""
    return model_evaluation.headline_metrics(evaluation_report, training_summary)


def site_table(evaluation_report: dict[str, Any]) -> pd.DataFrame:
    """One row per hospital: its personalized model's metrics with 95% intervals."""
    rows = []
    for site in evaluation_report["sites"]:
        row = {"client_id": site["client_id"], "device_id": site["device_id"], "n_test": site["n"]}
        row["test_classes"] = sum(1 for count in np.sum(site["confusion_matrix"], axis=1) if count > 0)
        for name in SCALAR_METRICS:
            row[name] = site[name]
            low, high = site.get("ci", {}).get(name, (None, None))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
        row["top_class_share"] = site["top_class_share"]
        row["constant_predictor"] = site["constant_predictor"]
        rows.append(row)
    return pd.DataFrame(rows)


def device_table(evaluation_report: dict[str, Any]) -> pd.DataFrame:
    """The global model's metrics under each imaging device (held-out device flagged)."""
    rows = []
    for name, metrics in evaluation_report["global_by_device"].items():
        row = {"device": name, "held_out": name == evaluation_report["held_out_device"]}
        for metric in SCALAR_METRICS:
            row[metric] = metrics[metric]
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = metrics.get("ci", {}).get(metric, (None, None))
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


def plot_confusion_matrix(evaluation_report: dict[str, Any]) -> Figure:
    """The global model's confusion counts and recall shares (scikit-learn's display)."""
    return evaluation_plots.confusion_matrix_figure(evaluation_report)


def plot_reliability(evaluation_report: dict[str, Any]) -> Figure:
    """The global model's reliability diagram behind its ECE (scikit-learn's display)."""
    return evaluation_plots.reliability_figure(evaluation_report)


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
            "confusion_matrix.png": plot_confusion_matrix(evaluation_report),
            "reliability.png": plot_reliability(evaluation_report),
        },
    )


def promote_champion(
    evaluation_metrics: dict[str, Any],
    training_tracking: dict[str, Any],
    evaluation_tracking: dict[str, Any],
    training_summary: dict[str, Any],
    partition_manifest: dict[str, Any],
    promotion: dict[str, Any],
) -> dict[str, Any]:
    """Move the registry's `champion` alias to this run's global model only if it earned it.

    Runs after `track_evaluation` (it takes its output) because the rule reads the
    `final.*` metrics from MLflow: the candidate's must be there for the next run's
    comparison. In a full run an evaluation that refused the models stops it; run alone
    (`--nodes promote_champion`) it checks itself that the run was trained on the current
    partition and that the evaluation results are this run's. The rule itself (same data
    version, minimum improvement) is in `tracking.registry`; this node only hands it the
    run and writes the decision file.
    """
    run_binding.check_trained_on_this_partition(training_summary, partition_manifest)
    run_binding.check_metrics_belong_to_run(training_tracking, evaluation_tracking)
    from fedmic_pipeline.tracking import registry

    return registry.promote_from_tracking(training_tracking, evaluation_metrics, promotion)
