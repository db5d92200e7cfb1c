"""Synthetic datasets, project parameters and throw-away projects shared by the pipeline tests.

A helper module, not a test module (pytest collects only ``test_*.py``): the pipeline
tests of every stage build their data from the same small, imbalanced, MedMNIST-shaped set
and the shipped parameters, so a change to either shows up everywhere at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from fedmic_pipeline.datasets.npz_dataset import save_npz_deterministic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 3


def synthetic_dataset(n_train: int = 500, n_val: int = 100, n_test: int = 60, size: int = 16, rgb: bool = False, seed: int = 0):
    """A small, imbalanced, MedMNIST-shaped `validated_dataset` and `dataset_info`."""
    rng = np.random.default_rng(seed)
    dataset = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.choice(N_CLASSES, size=n, p=[0.2, 0.3, 0.5]).astype(np.int64)
        shape = (n, size, size, 3) if rgb else (n, size, size)
        base = (40 + 60 * labels).reshape((n,) + (1,) * (len(shape) - 1))
        images = np.clip(base + rng.integers(0, 80, size=shape), 0, 255).astype(np.uint8)
        dataset[f"{split}_images"] = images
        dataset[f"{split}_labels"] = labels
        dataset[f"{split}_source_index"] = np.arange(n, dtype=np.int64)
    info = {
        "flag": "synthetic",
        "n_classes": N_CLASSES,
        "n_channels": 3 if rgb else 1,
        "label_names": {"0": "calm", "1": "mild", "2": "severe"},
    }
    return dataset, info


def project_params(**partition_overrides):
    """The shipped partition and device parameters with `partition` overrides."""
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_data_partition.yml").read_text())
    params["partition"].update(partition_overrides)
    return params


def training_params(**overrides):
    """The shipped training parameters, shrunk for tests: 2 rounds, half the clients, one thread."""
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_federated_training.yml").read_text())
    params["training"].update({"num_rounds": 2, "join_ratio": 0.5, "num_threads": 1, **overrides})
    params["algorithm_params"]["fedmic"].update({"teacher_model": "student_cnn"})
    params["algorithm_params"]["common"].update({"batch_size": 16})
    return params


def small_federation(num_clients: int = 10, **dataset_sizes):
    """An easy 3-class task split over ``num_clients`` hospitals in memory (no files):
    (client arrays, global test set, dataset_info with the 16 px size, partition manifest)."""
    from fedmic_pipeline.partitioning import partition_in_memory

    dataset, info = synthetic_dataset(**dataset_sizes)
    params = project_params(num_clients=num_clients, min_samples_per_client=15)
    clients, global_test, manifest = partition_in_memory(dataset, info, params["partition"], params["devices"])
    return clients, global_test, {**info, "size": 16}, manifest


def copy_project(tmp: Path) -> Path:
    """An empty Kedro project under ``tmp``: the repository's conf/ and pyproject.toml, no data."""
    project = tmp / "project"
    project.mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("credentials*", "local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # Kedro requires the folder; the package itself is the installed one
    return project


def make_project(tmp: Path) -> Path:
    """A throw-away Kedro project under ``tmp`` holding the synthetic dataset as its ingested
    data, ready for ``kedro run --pipelines data_partition``."""
    project = copy_project(tmp)
    params = project_params(min_samples_per_client=15)
    (project / "conf/base/parameters_data_partition.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    dataset, info = synthetic_dataset()
    save_npz_deterministic(project / "data/03_primary/dataset.npz", dataset)
    (project / "data/03_primary/dataset_info.json").write_text(json.dumps(info))
    return project


def write_partition(project: Path, clients: dict, global_test: dict, manifest: dict) -> None:
    """Client files, global test set and manifest where ``data_partition`` writes them."""
    for name, arrays in clients.items():
        save_npz_deterministic(project / f"data/05_model_input/clients/{name}.npz", arrays)
    save_npz_deterministic(project / "data/05_model_input/global_test.npz", global_test)
    (project / "data/05_model_input/partition_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_training_params(project: Path, params: dict) -> None:
    """Write ``params`` as the project's training parameters; record the 16 px image size."""
    (project / "conf/base/parameters_federated_training.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    info_path = project / "data/03_primary/dataset_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "size": 16}))
