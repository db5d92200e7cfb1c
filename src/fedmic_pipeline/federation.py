"""A federation built from the project's catalog data: the one translation into the core.

The core knows tensors and dataclasses; Kedro hands over catalog data (dicts of numpy
arrays, lazy partition loaders, YAML mappings). These functions turn one into the other,
so that training, evaluation, the comparison, the ablation and the recipe benchmark all
build hospitals, extra training data and algorithms the same way (the Flower apps load
the same files through ``flower/task.py`` and the same ``to_client_data``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmic_pipeline.configuration import EXTRA_TRAINING_DATA, TrainingConfig, algorithm_params_for
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import to_client_data, to_tensors
from fedmic_pipeline.core.pretraining import PretrainingConfig, ServerPretraining
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, FederatedAlgorithm
from fedmic_pipeline.core.simulation import SimulationResult, run_simulation
from fedmic_pipeline.model_evaluation import evaluate_models
from fedmic_pipeline.run_records import run_summary

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
    partition_manifest: Mapping[str, Any] | None = None,
) -> list[ClientData]:
    """Every hospital's ClientData (on the CPU; the runner moves them to the device once).

    With `partition_manifest`, the files must be exactly the hospitals it lists, with the
    split sizes it records: a deleted, added or foreign client file would otherwise run a
    federation of other hospitals than the partition describes, without a word.
    """
    if not client_partitions:
        raise ConfigurationError("No client partitions found: run `kedro run --pipelines data_partition` first.")
    if partition_manifest is not None:
        _check_files_against_manifest(client_partitions, partition_manifest)
    clients = []
    for partition_id in sorted(client_partitions):
        arrays = _materialise(client_partitions[partition_id])
        if partition_manifest is not None:
            _check_split_sizes(partition_id, arrays, partition_manifest)
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


_REWRITE_PARTITION = (
    "A partition write was interrupted, or client files were added, deleted or copied from another partition. "
    "Rewrite the partition (client files and manifest together): `kedro run --pipelines data_partition`."
)


def _check_files_against_manifest(client_partitions: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    listed = set(manifest.get("split_sizes") or manifest.get("sha256") or manifest.get("counts") or {})
    missing, extra = sorted(listed - set(client_partitions)), sorted(set(client_partitions) - listed)
    if missing or extra:
        found = [f"missing {', '.join(f'{c}.npz' for c in missing)} (listed in the manifest)"] if missing else []
        found += [f"extra {', '.join(f'{c}.npz' for c in extra)} (not in the manifest)"] if extra else []
        raise ConfigurationError(
            f"The client files do not match partition_manifest.json, which lists {len(listed)} hospitals: "
            f"{'; '.join(found)}. {_REWRITE_PARTITION}"
        )


def _check_split_sizes(partition_id: str, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> None:
    recorded = (manifest.get("split_sizes") or {}).get(partition_id) or {}
    splits = [split for split in ("train", "val", "test") if split in recorded and f"{split}_labels" in arrays]
    found = {split: len(arrays[f"{split}_labels"]) for split in splits}
    if any(found[split] != int(recorded[split]) for split in splits):
        sizes = " / ".join(f"{found[split]} {split}" for split in splits)
        expected = " / ".join(f"{recorded[split]} {split}" for split in splits)
        raise ConfigurationError(
            f"{partition_id}.npz holds {sizes} images, partition_manifest.json records {expected}: the file is not "
            f"the one this partition wrote. {_REWRITE_PARTITION}"
        )


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


def server_pretraining(
    config: PretrainingConfig | None, synthetic_sets: Mapping[str, ArraysOrLoader] | None
) -> ServerPretraining | None:
    """The engine callback that pretrains the shared model on the synthetic pool (the union of
    the hospitals' synthetic sets, which the server sampled from its own generator and the
    synthetic gate passed), or None when pretraining is off."""
    if config is None:
        return None
    sets = [_materialise(synthetic_sets[key]) for key in sorted(synthetic_sets or {})]
    sets = [s for s in sets if len(s["labels"])]
    if not sets:
        raise ConfigurationError(
            "training.pretraining is on but there are no synthetic samples to pretrain on: run "
            "`kedro run --pipelines synthetic_generation` with synthetic.enabled: true, or set "
            "training.pretraining.enabled: false."
        )
    images = np.concatenate([s["images"] for s in sets])
    labels = np.concatenate([np.asarray(s["labels"]).reshape(-1) for s in sets])
    return ServerPretraining(*to_tensors(images, labels), config)


def make_algorithm(name: str, algorithm_params: Mapping[str, Any], spec: DataSpec) -> FederatedAlgorithm:
    return build_algorithm(name, algorithm_params_for(name, algorithm_params), spec)


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
    synthetic_sets: Mapping[str, ArraysOrLoader] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], SimulationResult]:
    """One in-memory run of `method` and its evaluation (the comparison and the ablation).

    `synthetic_sets` feed the server's pretraining when `training.pretraining` is on.
    Returns the evaluation report, the run summary and the simulation result.
    """
    spec = data_spec(dataset_info)
    algorithm = make_algorithm(method, algorithm_params, spec)
    clients = build_clients(client_arrays, extra)
    config = TrainingConfig.from_params({**training, "algorithm": method})
    pretraining = server_pretraining(config.pretraining, synthetic_sets)
    result = run_simulation(algorithm, clients, spec, config.simulation, callbacks=[pretraining] if pretraining else [])
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
    summary = run_summary(algorithm, result, clients, pretraining=pretraining.summary if pretraining else None)
    return report, summary, result
