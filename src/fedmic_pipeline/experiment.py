"""Glue between the project's files/parameters and the torch-only core.

The core knows tensors and dataclasses; Kedro hands over catalog data (dicts of numpy
arrays, lazy partition loaders, YAML mappings). These functions translate one into the
other, so that training, evaluation, the comparison sweep, the benchmark and the Flower
apps all build a federation the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmic_pipeline.configuration import EXTRA_TRAINING_DATA, TrainingConfig, algorithm_params_for
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import to_client_data, to_tensors
from fedmic_pipeline.core.evaluation import (
    SCALAR_METRICS,
    compute_metrics,
    majority_class_metrics,
    predict_proba,
    summarize_sites,
)
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, FederatedAlgorithm
from fedmic_pipeline.core.simulation import SimulationResult, run_simulation

logger = logging.getLogger(__name__)

ArraysOrLoader = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]


def data_spec(dataset_info: Mapping[str, Any]) -> DataSpec:
    """Channels, classes and image size as ingestion recorded them."""
    return DataSpec(
        in_channels=int(dataset_info["n_channels"]),
        num_classes=int(dataset_info["n_classes"]),
        image_size=int(dataset_info.get("size", 28)),
    )


def _materialise(value: ArraysOrLoader) -> Mapping[str, np.ndarray]:
    return value() if callable(value) else value


def client_id_of(partition_id: str) -> int:
    """`client_07` -> 7 (the partition files' naming)."""
    try:
        return int(partition_id.rsplit("_", 1)[-1])
    except ValueError:
        raise ConfigurationError(f"Partition '{partition_id}' is not named client_<number>.") from None


def with_extra_training_data(arrays: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A client's arrays with `extra` (a synthetic or augmented set) appended to train only.

    Validation and test splits stay untouched: synthetic samples never reach a test set.
    """
    merged = dict(arrays)
    n_real = len(arrays["train_labels"])
    if extra is None or len(extra["labels"]) == 0:
        merged["train_is_synthetic"] = np.zeros(n_real, dtype=bool)
        return merged
    if extra["images"].shape[1:] != arrays["train_images"].shape[1:]:
        raise ConfigurationError(
            f"Extra training images have shape {extra['images'].shape[1:]}, the client's "
            f"{arrays['train_images'].shape[1:]}: regenerate the synthetic sets for this partition."
        )
    merged["train_images"] = np.concatenate([arrays["train_images"], extra["images"]])
    merged["train_labels"] = np.concatenate([arrays["train_labels"], extra["labels"].astype(np.int64)])
    flags = np.asarray(extra.get("is_synthetic", np.ones(len(extra["labels"]), dtype=bool)), dtype=bool)
    merged["train_is_synthetic"] = np.concatenate([np.zeros(n_real, dtype=bool), flags])
    return merged


def build_clients(
    client_partitions: Mapping[str, ArraysOrLoader],
    extra_training_sets: Mapping[str, ArraysOrLoader] | None = None,
) -> list[ClientData]:
    """Every hospital's ClientData (on the CPU; the runner moves them to the device once)."""
    if not client_partitions:
        raise ConfigurationError("No client partitions found: run `kedro run --pipelines data_partition` first.")
    clients = []
    for partition_id in sorted(client_partitions):
        arrays = _materialise(client_partitions[partition_id])
        extra = None
        if extra_training_sets is not None:
            if partition_id not in extra_training_sets:
                raise ConfigurationError(
                    f"No extra training set for {partition_id}: regenerate the synthetic sets "
                    "(`kedro run --pipelines synthetic_generation`) for the current partition."
                )
            extra = _materialise(extra_training_sets[partition_id])
        if extra is not None or "train_is_synthetic" not in arrays:
            arrays = with_extra_training_data(arrays, extra)
        clients.append(to_client_data(arrays, client_id_of(partition_id)))
    return clients


def global_test_tensors(global_test_set: Mapping[str, np.ndarray], device_name: str | None = None):
    """The global test set, clean or as imaging device `device_name` renders it."""
    key = "images" if device_name is None else f"images_{device_name}"
    if key not in global_test_set:
        available = [k.removeprefix("images_") for k in global_test_set if k.startswith("images_")]
        raise ConfigurationError(f"The global test set has no rendering '{device_name}'; devices: {available}.")
    return to_tensors(global_test_set[key], global_test_set["labels"])


def device_names(global_test_set: Mapping[str, np.ndarray]) -> list[str]:
    return [str(name) for name in np.asarray(global_test_set["device_names"]).tolist()]


def extra_training_sets(
    mode: str,
    client_partitions: Mapping[str, ArraysOrLoader],
    synthetic_sets: Mapping[str, ArraysOrLoader] | None,
    seed: int,
) -> dict[str, Mapping[str, np.ndarray]] | None:
    """What each hospital adds to its local training data (the FedSSG switch and ablation).

    `synthetic`: its FedSSG synthetic set. `augmented`: the same number of classically
    augmented real samples of the same classes (`core.augment`). `none`: nothing.
    """
    from fedmic_pipeline.core.augment import augment_like

    if mode not in EXTRA_TRAINING_DATA:
        raise ConfigurationError(f"training.extra_training_data must be one of {', '.join(EXTRA_TRAINING_DATA)}, got '{mode}'.")
    if mode == "none":
        return None
    if not synthetic_sets:
        raise ConfigurationError(
            f"training.extra_training_data={mode} needs the synthetic sets: run `kedro run --pipelines synthetic_generation` first."
        )
    missing = sorted(set(client_partitions) - set(synthetic_sets))
    if missing:
        raise ConfigurationError(f"No synthetic set for {missing}: regenerate the synthetic sets for the current partition.")
    sets = {key: _materialise(synthetic_sets[key]) for key in sorted(client_partitions)}
    if mode == "synthetic":
        return sets
    extra = {}
    for key, synthetic in sets.items():
        arrays = _materialise(client_partitions[key])
        extra[key] = augment_like(arrays["train_images"], arrays["train_labels"], synthetic["labels"], seed=seed + client_id_of(key))
    return extra


def make_algorithm(name: str, algorithm_params: Mapping[str, Any], spec: DataSpec) -> FederatedAlgorithm:
    return build_algorithm(name, algorithm_params_for(name, algorithm_params), spec)


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


def history_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per round (1-based) with the scalar curves of the run."""
    columns = (
        "train_loss", "train_accuracy", "lr", "global_val_accuracy", "global_val_balanced_accuracy",
        "personalized_val_accuracy", "personalized_val_balanced_accuracy",
        "bytes_up_total", "bytes_down_total", "bytes_dense_total", "train_time_s", "eval_time_s", "samples_per_s",
    )  # fmt: skip
    rows = []
    for record in history:
        row = {"round": record["round"] + 1, "num_sampled": len(record["sampled"])}
        row.update({key: record.get(key) for key in columns})
        row["sampled"] = " ".join(str(c) for c in record["sampled"])
        rows.append(row)
    return pd.DataFrame(rows)


def communication_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """Exact bytes per sampled client per round, beside FedAvg's dense size."""
    rows = [
        {
            "round": record["round"] + 1,
            "client_id": client,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_dense_one_way": record["bytes_dense_per_client"],
        }
        for record in history
        for client, up, down in zip(record["sampled"], record["bytes_up"], record["bytes_down"], strict=True)
    ]
    return pd.DataFrame(rows, columns=["round", "client_id", "bytes_up", "bytes_down", "bytes_dense_one_way"])


def run_summary(
    algorithm: FederatedAlgorithm, result: SimulationResult, clients: list[ClientData], extra_training_data: str = "none"
) -> dict[str, Any]:
    """What a run was (resolved config, runner settings) and what it cost (bytes, time)."""
    communication = communication_table(result.history)
    return {
        "algorithm": algorithm.name,
        "algorithm_config": algorithm.describe() if hasattr(algorithm, "describe") else {"algorithm": algorithm.name},
        "simulation": result.config_dict(),
        "totals": result.totals(),
        "selection": result.selector.summary(),
        "mb_up_per_client_per_round": float(communication["bytes_up"].mean() / 1e6) if len(communication) else 0.0,
        "mb_down_per_client_per_round": float(communication["bytes_down"].mean() / 1e6) if len(communication) else 0.0,
        "num_clients": len(clients),
        "train_samples": {f"client_{c.client_id:02d}": c.num_train for c in clients},
        "synthetic_train_samples": {
            f"client_{c.client_id:02d}": int(c.train_is_synthetic.sum()) if c.train_is_synthetic is not None else 0
            for c in clients
        },
        "extra_training_data": extra_training_data,
    }


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


def run_and_evaluate(
    method: str,
    algorithm_params: Mapping[str, Any],
    dataset_info: Mapping[str, Any],
    client_arrays: Mapping[str, ArraysOrLoader],
    global_test_set: Mapping[str, np.ndarray],
    held_out_device: str | None,
    training: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    extra: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], SimulationResult]:
    """One in-memory run of `method` and its evaluation (the comparison and the ablation).

    Returns the evaluation report, the run summary and the simulation result.
    """
    spec = data_spec(dataset_info)
    algorithm = make_algorithm(method, algorithm_params, spec)
    clients = build_clients(client_arrays, extra)
    config = TrainingConfig.from_params({**training, "algorithm": method})
    result = run_simulation(algorithm, clients, spec, config.simulation)
    report = evaluate_models(
        global_model=result.global_model(),
        personalized={c.client_id: result.personalized_model(c.client_id) for c in clients},
        clients=clients,
        global_test_set=global_test_set,
        dataset_info=dataset_info,
        held_out_device=held_out_device,
        evaluation=evaluation,
        last_global_model=result.last_global_model(),
        last_personalized={c.client_id: result.last_personalized_model(c.client_id) for c in clients},
    )
    return report, run_summary(algorithm, result, clients), result
