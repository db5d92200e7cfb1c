"""The hospitals of a run, built from the validated dataset: plan, device rendering, manifest.

These steps live outside `pipelines/` because three stages build federations with them:
`data_partition` (behind its data gate, written to disk), and `compare` and `ablation`
(one federation per lambda and seed, in memory only). The Kedro nodes wrap them.

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

from fedmic_pipeline.core.devices import (
    ASSIGN_STREAM,
    AUTO,
    CLIENT_RENDER_STREAM,
    TEST_RENDER_STREAM,
    DevicesConfig,
    render_device,
    resolve_auto,
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

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
_REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels", "source_index"))

Arrays = dict[str, np.ndarray]


class PartitionInputError(ValueError):
    """The validated dataset or its info does not have the expected shape; names the fix."""


def client_ids(num_clients: int) -> list[str]:
    """`client_00`, `client_01`, ... (zero-padded so that file order equals client order)."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client_{k:0{width}d}" for k in range(num_clients)]


def class_names(info: Mapping[str, Any], n_classes: int) -> list[str]:
    """Names from dataset_info's `label_names` (or medmnist's own `label` key), else the ids."""
    names = info.get("label_names") or info.get("label") or {}
    return [str(names.get(str(c), c)) for c in range(n_classes)]


def npy_sha256(array: np.ndarray) -> str:
    """sha256 of the array exactly as NpzDataset stores it (the .npy member's bytes)."""
    return hashlib.sha256(npy_bytes(array)).hexdigest()


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


def _devices_config(devices: Mapping[str, Any], info: Mapping[str, Any]) -> DevicesConfig:
    """The validated devices; with `profiles: auto` the preset must be the dataset's that was read."""
    config = DevicesConfig.from_params(devices)
    flag = info.get("flag")
    named = str(devices.get("dataset", "")).strip().lower()
    if devices.get("profiles") == AUTO and flag is not None and named != str(flag).strip().lower():
        raise PartitionInputError(
            f"devices.profiles: auto took the device preset of devices.dataset={devices.get('dataset')!r}, but the "
            f"validated dataset is {flag!r}: set `dataset: ${{dataset.name}}` under `devices:` so the two agree."
        )
    return config


def _pool(dataset: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([dataset["train_images"], dataset["val_images"]])
    labels = np.concatenate([_labels(dataset, "train"), _labels(dataset, "val")])
    return images, labels


def draw_plan(
    dataset: Mapping[str, np.ndarray], info: Mapping[str, Any], partition: Mapping[str, Any], devices: Mapping[str, Any]
) -> PartitionPlan:
    """The Dirichlet partition, the local splits and each hospital's device: indices only."""
    _check_dataset(dataset, info)
    config = PartitionConfig.from_params(partition)
    device_config = _devices_config(devices, info)
    _, pool_labels = _pool(dataset)
    plan = plan_partition(pool_labels, config, device_config.assign(config.num_clients))
    logger.info(
        "Partition plan: %d pool images -> %d clients (lambda=%s, %d draw(s)); devices %s",
        pool_labels.size, plan.num_clients, config.dirichlet_lambda, plan.attempts,
        [device_config.names[d] for d in plan.client_devices],
    )
    return plan


def placement_table(dataset: Mapping[str, np.ndarray], plan: PartitionPlan, devices: Mapping[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per placed pool image, and the sha1 of every global test image, for the gate.

    Columns: origin, client (integer id k of `client_k`), local_split, label, device
    (name), pixel_sha1 (of the original, un-rendered image bytes, so a test image leaking
    into a client is caught whatever device renders it).
    """
    device_config = DevicesConfig.from_params(devices)
    pool_images, pool_labels = _pool(dataset)
    origin, client, split = plan.placement()
    names = np.asarray(device_config.names)
    placement = pd.DataFrame(
        {
            "origin": origin.astype(np.int64),
            "client": client.astype(np.int64),
            "local_split": split.astype(str),
            "label": pool_labels[origin].astype(np.int64),
            "device": names[plan.client_devices[client]],
            "pixel_sha1": pixel_sha1(pool_images[origin]),
        }
    )
    return placement, pixel_sha1(np.asarray(dataset["test_images"]))


def materialise(
    dataset: Mapping[str, np.ndarray], info: Mapping[str, Any], plan: PartitionPlan, partition: Mapping[str, Any], devices: Mapping[str, Any]
) -> tuple[dict[str, Arrays], Arrays, dict[str, Any]]:
    """Client arrays (rendered by each hospital's device), the global test set and the manifest."""
    n_classes = _check_dataset(dataset, info)
    config = PartitionConfig.from_params(partition)
    device_config = _devices_config(devices, info)
    pool_images, pool_labels = _pool(dataset)
    if not np.array_equal(plan.pool_labels, pool_labels) or plan.num_clients != config.num_clients:
        raise RuntimeError("partition_plan was drawn from other data or parameters than this run's; re-run the whole pipeline.")

    clients: dict[str, Arrays] = {}
    for k, cid in enumerate(client_ids(plan.num_clients)):
        device = int(plan.client_devices[k])
        positions = plan.client_indices(k)
        rendered = render_device(pool_images[positions], device_config.profiles[device], device_config.client_seed(k))
        arrays: Arrays = {"device": np.asarray(device, dtype=np.int64)}
        for split in SPLIT_NAMES:
            origin = plan.client_splits[k][split]
            rows = np.searchsorted(positions, origin)  # positions is sorted and contains origin
            arrays[f"{split}_images"] = rendered[rows]
            arrays[f"{split}_labels"] = pool_labels[origin].astype(np.int64)
            arrays[f"{split}_origin"] = origin.astype(np.int64)
        clients[cid] = arrays

    test_images = np.asarray(dataset["test_images"])
    global_test: Arrays = {
        "images": test_images,
        "labels": _labels(dataset, "test"),
        "source_index": np.asarray(dataset["test_source_index"]).astype(np.int64),
        "device_names": np.asarray(device_config.names, dtype=np.str_),
    }
    for d, profile in enumerate(device_config.profiles):
        global_test[f"images_{profile.name}"] = render_device(test_images, profile, device_config.test_seed(d))

    manifest = _manifest(dataset, info, plan, pool_labels, n_classes, clients, global_test, partition, devices)
    logger.info(
        "Materialised %d client files and the global test set (%d images x %d devices); mean label entropy %.3f nats",
        len(clients), test_images.shape[0], len(device_config.names), manifest["mean_label_entropy_nats"],
    )
    return clients, global_test, manifest


def partition_in_memory(
    dataset: Mapping[str, np.ndarray], info: Mapping[str, Any], partition: Mapping[str, Any], devices: Mapping[str, Any]
) -> tuple[dict[str, Arrays], Arrays, dict[str, Any]]:
    """Plan and materialise in one step, for sweeps that train on a partition and never write
    it (so no data gate stands between the two: nothing reaches disk)."""
    return materialise(dataset, info, draw_plan(dataset, info, partition, devices), partition, devices)


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
    dataset: Mapping[str, np.ndarray], info: Mapping[str, Any], plan: PartitionPlan, pool_labels: np.ndarray, n_classes: int,
    clients: Mapping[str, Arrays], global_test: Arrays, partition: Mapping[str, Any], devices: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    config = PartitionConfig.from_params(partition)
    device_config = DevicesConfig.from_params(devices)
    names = device_config.names
    ids = list(clients)
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
            "class_names": {str(c): name for c, name in enumerate(class_names(info, n_classes))},
            "pool": "official train followed by official val; origin = position in this pool",
            "pool_size": int(pool_labels.size),
            "official_train_size": n_train,
            "official_val_size": n_val,
            "global_test_size": int(global_test["labels"].shape[0]),
        },
        # `profiles: auto` is recorded as the preset it resolved to (explicit profiles as given)
        "parameters": {"partition": _plain(partition), "devices": _plain(resolve_auto(devices))},
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
        "sha256": {cid: {key: npy_sha256(arr) for key, arr in sorted(arrays.items())} for cid, arrays in clients.items()},
        "global_test_sha256": {key: npy_sha256(arr) for key, arr in sorted(global_test.items())},
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
