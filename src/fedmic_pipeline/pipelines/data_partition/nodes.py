"""Kedro nodes of `data_partition`: thin wrappers that load, call the core, return outputs.

The flow is split so that the data gate judges the partition before any client file is
written: the plan (indices and devices only) and its placement table come first, the
validation suite and the gate next, and only the node that receives
`partition_gate_passed` renders the devices and materialises the arrays.

Pool convention: the official train split followed by the official val split; a pool
position is an image's `origin` in every client file, table and manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline.core.devices import (
    ASSIGN_STREAM,
    CLIENT_RENDER_STREAM,
    TEST_RENDER_STREAM,
    DevicesConfig,
    render_device,
)
from fedmic_pipeline.core.partition import (
    DIRICHLET_STREAM,
    LOCAL_SPLIT_STREAM,
    SPLIT_NAMES,
    PartitionConfig,
    PartitionPlan,
    label_entropy,
    mean_label_entropy,
    plan_partition,
)
from fedmic_pipeline.datasets import npy_bytes
from fedmic_pipeline.ingestion import pixel_sha1  # the one image identity of every data gate
from fedmic_pipeline.reporting.partition_plots import (
    class_client_bubble_figure,
    device_client_figure,
    device_examples_figure,
)

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
_REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels", "source_index"))


class PartitionInputError(ValueError):
    """The validated dataset or its info does not have the expected shape; names the fix."""


# ---- helpers (pure, no I/O) -----------------------------------------------------------

def client_ids(num_clients: int) -> list[str]:
    """`client_00`, `client_01`, ... (zero-padded so that file order equals client order)."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client_{k:0{width}d}" for k in range(num_clients)]


def _labels(dataset: Mapping[str, np.ndarray], split: str) -> np.ndarray:
    y = np.asarray(dataset[f"{split}_labels"])
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise PartitionInputError(f"{split}_labels must have shape (N,), got {y.shape}; re-run data_ingestion.")
    return y.astype(np.int64, copy=False)


def _check_dataset(dataset: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> int:
    missing = [k for k in _REQUIRED_KEYS if k not in dataset]
    if missing:
        raise PartitionInputError(f"validated_dataset lacks {missing}; re-run the data_ingestion pipeline.")
    if "n_classes" not in info:
        raise PartitionInputError("dataset_info has no 'n_classes'; re-run the data_ingestion pipeline.")
    n_classes = int(info["n_classes"])
    for split in ("train", "val", "test"):
        images, y = np.asarray(dataset[f"{split}_images"]), _labels(dataset, split)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[0] != y.shape[0]:
            raise PartitionInputError(
                f"{split}_images must be uint8 (N,H,W) or (N,H,W,3) with one label per image; got "
                f"{images.dtype} {images.shape} for {y.shape[0]} labels."
            )
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise PartitionInputError(f"{split}_labels outside [0, {n_classes}) (dataset_info.n_classes); re-run data_ingestion.")
    return n_classes


def _pool(dataset: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([dataset["train_images"], dataset["val_images"]])
    labels = np.concatenate([_labels(dataset, "train"), _labels(dataset, "val")])
    return images, labels


def _class_names(info: Mapping[str, Any], n_classes: int) -> list[str]:
    """Names from dataset_info's `label_names` (or medmnist's own `label` key), else the ids."""
    names = info.get("label_names") or info.get("label") or {}
    return [str(names.get(str(c), c)) for c in range(n_classes)]


def _npy_sha256(array: np.ndarray) -> str:
    """sha256 of the array exactly as NpzDataset stores it (the .npy member's bytes)."""
    return hashlib.sha256(npy_bytes(array)).hexdigest()


# ---- node A: the plan (indices and devices only) --------------------------------------

def build_partition_plan(
    validated_dataset: dict[str, np.ndarray],
    dataset_info: dict[str, Any],
    partition: dict[str, Any],
    devices: dict[str, Any],
) -> PartitionPlan:
    """Draw the Dirichlet partition, the local splits and each hospital's device."""
    _check_dataset(validated_dataset, dataset_info)
    config = PartitionConfig.from_params(partition)
    device_config = DevicesConfig.from_params(devices)
    _, pool_labels = _pool(validated_dataset)
    plan = plan_partition(pool_labels, config, device_config.assign(config.num_clients))
    logger.info(
        "Partition plan: %d pool images -> %d clients (lambda=%s, %d draw(s)); devices %s",
        pool_labels.size, plan.num_clients, config.dirichlet_lambda, plan.attempts,
        [device_config.names[d] for d in plan.client_devices],
    )
    return plan


def build_placement_table(
    validated_dataset: dict[str, np.ndarray],
    partition_plan: PartitionPlan,
    devices: dict[str, Any],
) -> tuple[pd.DataFrame, list[str]]:
    """One row per placed pool image, and the sha1 of every global test image, for the gate.

    Columns: origin, client (integer id k of `client_k`), local_split, label, device
    (name), pixel_sha1 (of the original, un-rendered image bytes, so a test image leaking
    into a client is caught whatever device renders it).
    """
    device_config = DevicesConfig.from_params(devices)
    pool_images, pool_labels = _pool(validated_dataset)
    origin, client, split = partition_plan.placement()
    names = np.asarray(device_config.names)
    placement = pd.DataFrame(
        {
            "origin": origin.astype(np.int64),
            "client": client.astype(np.int64),
            "local_split": split.astype(str),
            "label": pool_labels[origin].astype(np.int64),
            "device": names[partition_plan.client_devices[client]],
            "pixel_sha1": pixel_sha1(pool_images[origin]),
        }
    )
    test_hashes = pixel_sha1(np.asarray(validated_dataset["test_images"]))
    return placement, test_hashes


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
    from fedmic_pipeline.validation.gate import enforce_gate

    enforce_gate(
        partition_validation_report,
        hint="No client file was written. Fix the partition parameters (conf/base/parameters_data_partition.yml) "
        "or the ingested data named above, then re-run `kedro run --pipeline data_partition`.",
    )
    return True


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
    n_classes = _check_dataset(validated_dataset, dataset_info)
    config = PartitionConfig.from_params(partition)
    device_config = DevicesConfig.from_params(devices)
    pool_images, pool_labels = _pool(validated_dataset)
    if not np.array_equal(partition_plan.pool_labels, pool_labels) or partition_plan.num_clients != config.num_clients:
        raise RuntimeError("partition_plan was drawn from other data or parameters than this run's; re-run the whole pipeline.")
    ids = client_ids(partition_plan.num_clients)
    names = device_config.names

    clients: dict[str, dict[str, np.ndarray]] = {}
    for k, cid in enumerate(ids):
        device = int(partition_plan.client_devices[k])
        positions = partition_plan.client_indices(k)
        rendered = render_device(pool_images[positions], device_config.profiles[device], device_config.client_seed(k))
        arrays: dict[str, np.ndarray] = {"device": np.asarray(device, dtype=np.int64)}
        for split in SPLIT_NAMES:
            origin = partition_plan.client_splits[k][split]
            rows = np.searchsorted(positions, origin)  # positions is sorted and contains origin
            arrays[f"{split}_images"] = rendered[rows]
            arrays[f"{split}_labels"] = pool_labels[origin].astype(np.int64)
            arrays[f"{split}_origin"] = origin.astype(np.int64)
        clients[cid] = arrays

    test_images = np.asarray(validated_dataset["test_images"])
    global_test: dict[str, np.ndarray] = {
        "images": test_images,
        "labels": _labels(validated_dataset, "test"),
        "source_index": np.asarray(validated_dataset["test_source_index"]).astype(np.int64),
        "device_names": np.asarray(names, dtype=np.str_),
    }
    for d, profile in enumerate(device_config.profiles):
        global_test[f"images_{profile.name}"] = render_device(test_images, profile, device_config.test_seed(d))

    counts = partition_counts_table(partition_plan, pool_labels, n_classes, ids, names)
    manifest = _manifest(
        validated_dataset, dataset_info, partition_plan, config, device_config, clients, global_test,
        pool_labels, n_classes, ids, partition, devices,
    )
    logger.info(
        "Materialised %d client files and the global test set (%d images x %d devices); mean label entropy %.3f nats",
        len(clients), test_images.shape[0], len(names), manifest["mean_label_entropy_nats"],
    )
    return clients, global_test, manifest, counts


def partition_counts_table(
    plan: PartitionPlan, pool_labels: np.ndarray, n_classes: int, ids: list[str], device_names: list[str]
) -> pd.DataFrame:
    """Tidy counts: one row per (client, class, local_split), zeros included, with the device."""
    rows = []
    for k, cid in enumerate(ids):
        device = device_names[int(plan.client_devices[k])]
        for split in SPLIT_NAMES:
            per_class = np.bincount(pool_labels[plan.client_splits[k][split]], minlength=n_classes)
            for c in range(n_classes):
                rows.append((cid, c, device, split, int(per_class[c])))
    table = pd.DataFrame(rows, columns=["client", "class", "device", "local_split", "count"])
    return table.astype({"class": np.int64, "count": np.int64})


def _manifest(
    dataset: Mapping[str, np.ndarray],
    info: Mapping[str, Any],
    plan: PartitionPlan,
    config: PartitionConfig,
    device_config: DevicesConfig,
    clients: Mapping[str, Mapping[str, np.ndarray]],
    global_test: Mapping[str, np.ndarray],
    pool_labels: np.ndarray,
    n_classes: int,
    ids: list[str],
    partition_params: Mapping[str, Any],
    devices_params: Mapping[str, Any],
) -> dict[str, Any]:
    names = device_config.names
    counts: dict[str, dict[str, dict[str, int]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    client_devices: dict[str, dict[str, Any]] = {}
    for k, cid in enumerate(ids):
        device = int(plan.client_devices[k])
        per_class = np.bincount(pool_labels[plan.client_indices(k)], minlength=n_classes)
        counts[cid] = {str(c): {names[device]: int(per_class[c])} for c in range(n_classes)}
        sizes[cid] = {split: int(plan.client_splits[k][split].size) for split in SPLIT_NAMES}
        sizes[cid]["total"] = int(sum(sizes[cid][s] for s in SPLIT_NAMES))
        client_devices[cid] = {"device_id": device, "device_name": names[device]}
    n_train, n_val = int(dataset["train_labels"].shape[0]), int(dataset["val_labels"].shape[0])
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "dataset": {
            "flag": info.get("flag"),
            "n_classes": n_classes,
            "n_channels": info.get("n_channels"),
            "class_names": {str(c): name for c, name in enumerate(_class_names(info, n_classes))},
            "pool": "official train followed by official val; origin = position in this pool",
            "pool_size": int(pool_labels.size),
            "official_train_size": n_train,
            "official_val_size": n_val,
            "global_test_size": int(global_test["labels"].shape[0]),
        },
        "parameters": {"partition": _plain(partition_params), "devices": _plain(devices_params)},
        "seeds": {
            "partition_seed": config.seed,
            "device_seed": device_config.seed,
            "streams": {
                "dirichlet": [config.seed, DIRICHLET_STREAM],
                "local_split": [config.seed, LOCAL_SPLIT_STREAM, "client"],
                "device_assignment": [device_config.seed, ASSIGN_STREAM],
                "client_rendering": [device_config.seed, CLIENT_RENDER_STREAM, "client"],
                "global_test_rendering": [device_config.seed, TEST_RENDER_STREAM, "device"],
            },
        },
        "attempts_used": int(plan.attempts),
        "devices": names,
        "held_out_device": device_config.held_out,
        "client_devices": client_devices,
        "counts": counts,
        "split_sizes": sizes,
        "sha256": {cid: {key: _npy_sha256(arr) for key, arr in sorted(arrays.items())} for cid, arrays in clients.items()},
        "global_test_sha256": {key: _npy_sha256(arr) for key, arr in sorted(global_test.items())},
        "mean_label_entropy_nats": mean_label_entropy([plan.client_indices(k) for k in range(len(ids))], pool_labels, n_classes),
        "pool_label_entropy_nats": label_entropy(pool_labels, n_classes),
    }


def _plain(value: Any) -> Any:
    """Parameters as JSON-ready builtins (OmegaConf may hand over its own containers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- plot nodes ------------------------------------------------------------------------

def _pivot(counts: pd.DataFrame, row: str, rows: list, columns: list[str]) -> np.ndarray:
    table = counts.groupby([row, "client"], sort=True)["count"].sum().unstack("client", fill_value=0)
    return table.reindex(index=rows, columns=columns, fill_value=0).to_numpy(dtype=np.int64)


def plot_class_by_client(partition_counts: pd.DataFrame, dataset_info: dict[str, Any], partition: dict[str, Any]) -> Figure:
    """Bubble chart class x client (FedMIC Figure 3 style)."""
    n_classes = int(dataset_info["n_classes"])
    ids = client_ids(int(partition["num_clients"]))
    matrix = _pivot(partition_counts, "class", list(range(n_classes)), ids)
    return class_client_bubble_figure(matrix, _class_names(dataset_info, n_classes), ids, float(partition["dirichlet_lambda"]))


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
    return device_examples_figure(images, global_test_set["labels"], _class_names(dataset_info, n_classes), device_config.held_out)
