"""Glue between the project's files/parameters and the torch-only core.

The core knows tensors and dataclasses; Kedro hands over catalog data (dicts of numpy
arrays, lazy partition loaders, YAML mappings). These functions translate one into the
other, so that training, evaluation, the comparison sweep, the benchmark and the Flower
apps all build a federation the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmic_pipeline.core.algorithms import ALGORITHMS, build_algorithm
from fedmic_pipeline.core.data import to_client_data, to_tensors
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, FederatedAlgorithm
from fedmic_pipeline.core.simulation import SimulationConfig

logger = logging.getLogger(__name__)

ArraysOrLoader = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]
SIMULATION_KEYS = ("num_rounds", "join_ratio", "seed", "device", "amp", "eval_every", "progress", "num_threads")


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


def algorithm_params_for(name: str, algorithm_params: Mapping[str, Any]) -> dict[str, Any]:
    """`common` merged with the method's own block (the method's values win)."""
    if name not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm '{name}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))}.")
    common = dict(algorithm_params.get("common") or {})
    own = dict(algorithm_params.get(name) or {})
    return {**common, **own}


def make_algorithm(name: str, algorithm_params: Mapping[str, Any], spec: DataSpec) -> FederatedAlgorithm:
    return build_algorithm(name, algorithm_params_for(name, algorithm_params), spec)


def simulation_config(training: Mapping[str, Any]) -> SimulationConfig:
    """The runner's settings from `params:training` (other keys belong to other stages)."""
    return SimulationConfig(**{key: training[key] for key in SIMULATION_KEYS if key in training})


