"""Kedro nodes of `data_partition`: thin wrappers over `fedmic_pipeline.partitioning`.

The flow is split so that the data gate judges the partition before any client file is
written: the plan (indices and devices only) and its placement table come first, the
validation suite and the gate next, and only the node that receives
`partition_gate_passed` renders the devices and materialises the arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import partitioning
from fedmic_pipeline.core.devices import DevicesConfig
from fedmic_pipeline.core.partition import PartitionPlan
from fedmic_pipeline.partitioning import PartitionInputError  # noqa: F401  (what these nodes raise; tests catch it here)
from fedmic_pipeline.partitioning import class_names, client_ids, partition_counts_table
from fedmic_pipeline.reporting.partition_plots import (
    class_client_bubble_figure,
    device_client_figure,
    device_examples_figure,
)
from fedmic_pipeline.validation.stage_gate import enforce_stage_gate


# ---- node A: the plan (indices and devices only) --------------------------------------

def build_partition_plan(
    validated_dataset: dict[str, np.ndarray],
    dataset_info: dict[str, Any],
    partition: dict[str, Any],
    devices: dict[str, Any],
) -> PartitionPlan:
    """Draw the Dirichlet partition, the local splits and each hospital's device."""
    return partitioning.draw_plan(validated_dataset, dataset_info, partition, devices)


def build_placement_table(
    validated_dataset: dict[str, np.ndarray],
    partition_plan: PartitionPlan,
    devices: dict[str, Any],
) -> tuple[pd.DataFrame, list[str]]:
    """One row per placed pool image, and the sha1 of every global test image, for the gate."""
    return partitioning.placement_table(validated_dataset, partition_plan, devices)


# ---- nodes B and C: the data gate -----------------------------------------------------

def validate_partition_placement(
    partition_placement: pd.DataFrame,
    partition_plan: PartitionPlan,
    global_test_hashes: list[str],
    partition: dict[str, Any],
    partition_gate: dict[str, Any],
) -> dict[str, Any]:
    """Run the partition expectation suite (disjoint, complete, sizes, no test leakage)."""
    from fedmic_pipeline.validation.partition_suite import validate_partition  # GX imports slowly

    return validate_partition(
        partition_placement,
        int(partition_plan.pool_labels.size),
        global_test_hashes,
        int(partition["min_samples_per_client"]),
        str(partition_gate["docs_dir"]),
        num_clients=partition_plan.num_clients,
    )


def enforce_partition_gate(partition_validation_report: dict[str, Any]) -> bool:
    """Stop the run (raise) when the suite failed; otherwise unlock materialisation."""
    return enforce_stage_gate(partition_validation_report, "data_partition", withheld="client file", upstream="the ingested data")


# ---- node D: render and materialise ---------------------------------------------------

def materialise_partition(
    validated_dataset: dict[str, np.ndarray],
    dataset_info: dict[str, Any],
    partition_plan: PartitionPlan,
    partition: dict[str, Any],
    devices: dict[str, Any],
    partition_gate_passed: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, Any], pd.DataFrame]:
    """Client files (rendered by each hospital's device), the global test set, manifest, counts."""
    if partition_gate_passed is not True:
        raise RuntimeError("The partition data gate did not pass; refusing to write client files.")
    clients, global_test, manifest = partitioning.materialise(validated_dataset, dataset_info, partition_plan, partition, devices)
    n_classes = int(manifest["dataset"]["n_classes"])
    counts = partition_counts_table(partition_plan, partition_plan.pool_labels, n_classes, list(clients), manifest["devices"])
    return clients, global_test, manifest, counts


# ---- plot nodes ------------------------------------------------------------------------

def _pivot(counts: pd.DataFrame, row: str, rows: list, columns: list[str]) -> np.ndarray:
    table = counts.groupby([row, "client"], sort=True)["count"].sum().unstack("client", fill_value=0)
    return table.reindex(index=rows, columns=columns, fill_value=0).to_numpy(dtype=np.int64)


def plot_class_by_client(partition_counts: pd.DataFrame, dataset_info: dict[str, Any], partition: dict[str, Any]) -> Figure:
    """Bubble chart class x client (FedMIC Figure 3 style)."""
    n_classes = int(dataset_info["n_classes"])
    ids = client_ids(int(partition["num_clients"]))
    matrix = _pivot(partition_counts, "class", list(range(n_classes)), ids)
    return class_client_bubble_figure(matrix, class_names(dataset_info, n_classes), ids, float(partition["dirichlet_lambda"]))


def plot_device_by_client(partition_counts: pd.DataFrame, partition: dict[str, Any], devices: dict[str, Any]) -> Figure:
    """Bubble chart device x client with the held-out device's row marked unseen."""
    device_config = DevicesConfig.from_params(devices)
    ids = client_ids(int(partition["num_clients"]))
    matrix = _pivot(partition_counts, "device", device_config.names, ids)
    return device_client_figure(matrix, device_config.names, ids, device_config.held_out)


def plot_device_examples(global_test_set: dict[str, np.ndarray], dataset_info: dict[str, Any], devices: dict[str, Any]) -> Figure:
    """Grid: one row per device, the same test images of each class as that device renders them."""
    device_config = DevicesConfig.from_params(devices)
    n_classes = int(dataset_info["n_classes"])
    images = {name: global_test_set[f"images_{name}"] for name in device_config.names}
    return device_examples_figure(images, global_test_set["labels"], class_names(dataset_info, n_classes), device_config.held_out)
