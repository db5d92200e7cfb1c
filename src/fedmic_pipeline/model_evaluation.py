"""Every trained model on the data it should be judged on, and the run's headline numbers.

``evaluate_models`` scores the global model on the official test split (clean and as each
imaging device renders it) and on the hospitals' local test splits pooled, and each
hospital's personalized model on its own local test split and on the unseen device, with
the majority-class baseline beside both and constant predictors flagged.
``headline_metrics`` flattens that report and the run summary into the DVC metrics file,
MLflow's final metrics and the comparison's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedmic_pipeline.core.data import to_tensors
from fedmic_pipeline.core.evaluation import (
    SCALAR_METRICS,
    compute_metrics,
    majority_class_metrics,
    predict_proba,
    summarize_sites,
)
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError


def global_test_tensors(global_test_set: Mapping[str, np.ndarray], device_name: str | None = None):
    """The global test set, clean or as imaging device `device_name` renders it."""
    key = "images" if device_name is None else f"images_{device_name}"
    if key not in global_test_set:
        available = [k.removeprefix("images_") for k in global_test_set if k.startswith("images_")]
        raise ConfigurationError(f"The global test set has no rendering '{device_name}'; devices: {available}.")
    return to_tensors(global_test_set[key], global_test_set["labels"])


def device_names(global_test_set: Mapping[str, np.ndarray]) -> list[str]:
    return [str(name) for name in np.asarray(global_test_set["device_names"]).tolist()]


def _metrics(model, x, y, num_classes: int, evaluation: Mapping[str, Any], n_bootstrap: int | None = None) -> dict[str, Any]:
    proba = predict_proba(model, x, batch_size=int(evaluation.get("batch_size", 1024)))
    n_boot = int(evaluation["n_bootstrap"]) if n_bootstrap is None else n_bootstrap
    return compute_metrics(y.cpu().numpy(), proba, num_classes, n_bootstrap=n_boot, seed=int(evaluation["seed"]))


def _real_train_labels(client: ClientData) -> np.ndarray:
    labels = client.train_y.cpu().numpy()
    if client.train_is_synthetic is None:
        return labels
    return labels[~client.train_is_synthetic.cpu().numpy().astype(bool)]


#: A hospital's personalized model is judged for constancy where its test split can show it.
MIN_TEST_PER_CLASS = 5


def _two_class_site(site: Mapping[str, Any]) -> bool:
    per_class = np.asarray(site["confusion_matrix"]).sum(axis=1)
    return int((per_class >= MIN_TEST_PER_CLASS).sum()) >= 2


def evaluate_models(
    global_model,
    personalized: Mapping[int, Any],
    clients: list[ClientData],
    global_test_set: Mapping[str, np.ndarray],
    dataset_info: Mapping[str, Any],
    held_out_device: str | None,
    evaluation: Mapping[str, Any],
    last_global_model=None,
    last_personalized: Mapping[int, Any] | None = None,
) -> dict[str, Any]:
    """Every model on the data it should be judged on, with bootstrap 95% intervals.

    The global model (the round selected on validation) on the global test set, clean and
    as each imaging device renders it (the held-out device included), and on all
    hospitals' local test splits pooled (``global_pooled_local_test``: the number PFLlib
    reports); the last round's global model beside it (``global_last``); each hospital's
    personalized model on its own local test split and on the unseen device's rendering,
    with mean and worst site; and the majority-class baseline for both views (the pooled
    training labels' majority on the global test set, each hospital's own majority on
    its local test split).
    """
    num_classes = int(dataset_info["n_classes"])
    renderings = {name: global_test_tensors(global_test_set, name) for name in device_names(global_test_set)}
    clean_x, clean_y = global_test_tensors(global_test_set)
    report: dict[str, Any] = {
        "dataset": dataset_info.get("flag"),
        "class_names": [dataset_info.get("label_names", {}).get(str(k), str(k)) for k in range(num_classes)],
        "held_out_device": held_out_device,
        "global": None,
        "global_by_device": {},
    }
    pooled_train = np.concatenate([_real_train_labels(c) for c in clients])
    report["majority_class"] = majority_class_metrics(pooled_train, clean_y.numpy(), num_classes)
    if global_model is not None:
        report["global"] = _metrics(global_model, clean_x, clean_y, num_classes, evaluation)
        for name, (x, y) in renderings.items():
            report["global_by_device"][name] = _metrics(global_model, x, y, num_classes, evaluation)
        tested = [c for c in clients if c.test_y.shape[0] > 0]
        if tested:
            local_x = torch.cat([c.test_x.cpu() for c in tested])
            local_y = torch.cat([c.test_y.cpu() for c in tested])
            report["global_pooled_local_test"] = _metrics(global_model, local_x, local_y, num_classes, evaluation, 0)
    if last_global_model is not None:
        report["global_last"] = _metrics(last_global_model, clean_x, clean_y, num_classes, evaluation, n_bootstrap=0)
    sites, unseen, majority, last_sites = [], [], [], []
    for client in clients:
        model = personalized[client.client_id]
        if client.test_y.shape[0] > 0:
            metrics = _metrics(model, client.test_x, client.test_y, num_classes, evaluation)
            sites.append({"client_id": client.client_id, "device_id": client.device_id, **metrics})
            test_y = client.test_y.cpu().numpy()
            majority.append({"client_id": client.client_id, **majority_class_metrics(_real_train_labels(client), test_y, num_classes)})
            if last_personalized is not None:
                last = _metrics(last_personalized[client.client_id], client.test_x, client.test_y, num_classes, evaluation, 0)
                last_sites.append({"client_id": client.client_id, **last})
        if held_out_device in renderings:
            x, y = renderings[held_out_device]
            unseen.append({"client_id": client.client_id, **_metrics(model, x, y, num_classes, evaluation, n_bootstrap=0)})
    report["sites"] = sites
    report["site_summary"] = summarize_sites(sites) if sites else None
    eligible = [site for site in sites if _two_class_site(site)]
    report["two_class_sites"] = {
        "rule": f"local test split with >= {MIN_TEST_PER_CLASS} images of each of two or more classes",
        "client_ids": [site["client_id"] for site in eligible],
        "constant_client_ids": [site["client_id"] for site in eligible if site["constant_predictor"]],
    }
    report["majority_class_sites"] = majority
    report["majority_class_site_summary"] = summarize_sites(majority) if majority else None
    if last_sites:
        report["last_round_site_summary"] = summarize_sites(last_sites)
    report["personalized_on_unseen_device"] = unseen
    report["personalized_on_unseen_device_summary"] = summarize_sites(unseen) if unseen else None
    return report


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def headline_metrics(evaluation_report: dict[str, Any], training_summary: dict[str, Any]) -> dict[str, Any]:
    """The flat headline numbers of a run (DVC metrics file, MLflow final metrics, comparison rows)."""
    flat: dict[str, Any] = {"algorithm": training_summary["algorithm"]}
    g = evaluation_report["global"]
    for name in SCALAR_METRICS:
        flat[f"global.{name}"] = _clean(g[name]) if g else None
    flat["global.constant_predictor"] = float(g["constant_predictor"]) if g else None
    flat["global.top_class_share"] = _clean(g["top_class_share"]) if g else None
    if g and "ci" in g:  # no intervals when n_bootstrap is 0
        flat["global.accuracy_ci_low"], flat["global.accuracy_ci_high"] = g["ci"]["accuracy"]
        flat["global.balanced_accuracy_ci_low"], flat["global.balanced_accuracy_ci_high"] = g["ci"]["balanced_accuracy"]
    for key, view in (("global_last", "global_last"), ("global.pooled_local_test", "global_pooled_local_test")):
        m = evaluation_report.get(view)
        for name in ("accuracy", "balanced_accuracy", "macro_auc"):
            flat[f"{key}.{name}"] = _clean(m[name]) if m else None
        flat[f"{key}.constant_predictor"] = float(m["constant_predictor"]) if m else None
    majority = evaluation_report.get("majority_class")
    for name in ("accuracy", "balanced_accuracy", "macro_auc"):
        flat[f"majority_class.global.{name}"] = _clean(majority[name]) if majority else None
    held_out = evaluation_report["held_out_device"]
    unseen = evaluation_report["global_by_device"].get(held_out) if held_out else None
    flat["unseen_device.global.accuracy"] = _clean(unseen["accuracy"]) if unseen else None
    flat["unseen_device.global.balanced_accuracy"] = _clean(unseen["balanced_accuracy"]) if unseen else None
    for prefix, summary in (
        ("personalized", evaluation_report["site_summary"]),
        ("unseen_device.personalized", evaluation_report["personalized_on_unseen_device_summary"]),
    ):
        for name in SCALAR_METRICS:
            flat[f"{prefix}.mean.{name}"] = _clean(summary["mean"][name]) if summary else None
            flat[f"{prefix}.worst.{name}"] = _clean(summary["worst"][name]) if summary else None
        flat[f"{prefix}.num_sites"] = summary["num_sites"] if summary else None
        flat[f"{prefix}.num_constant_sites"] = summary["num_constant_sites"] if summary else None
    for prefix, key in (("majority_class.personalized", "majority_class_site_summary"), ("personalized_last", "last_round_site_summary")):
        summary = evaluation_report.get(key)
        for name in ("accuracy", "balanced_accuracy", "macro_auc"):
            flat[f"{prefix}.mean.{name}"] = _clean(summary["mean"][name]) if summary else None
    two_class = evaluation_report.get("two_class_sites")
    flat["personalized.num_two_class_sites"] = len(two_class["client_ids"]) if two_class else None
    flat["personalized.num_constant_two_class_sites"] = len(two_class["constant_client_ids"]) if two_class else None
    selection = training_summary.get("selection") or {}
    flat["selection.global_round"] = selection.get("global_round")
    totals = training_summary["totals"]
    flat["communication.mb_up_total"] = totals["bytes_up_total"] / 1e6
    flat["communication.mb_down_total"] = totals["bytes_down_total"] / 1e6
    flat["communication.mb_dense_total"] = totals["bytes_dense_total"] / 1e6
    flat["communication.mb_up_per_client_per_round"] = training_summary["mb_up_per_client_per_round"]
    flat["wall_time_s"] = totals["wall_time_s"]
    return flat
