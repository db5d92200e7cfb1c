"""Training never runs on a partial or foreign set of client files, and a failure while Kedro
saves the models keeps the checkpoint, so the run can be resumed instead of lost.

Files are real (the catalog's datasets on a temp folder); the failing save is a
TorchModelDataset that raises for one hospital, as a full disk would.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner

from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.core.simulation import TIMING_KEYS
from fedmic_pipeline.datasets import AtomicPartitionedDataset, TorchModelDataset
from fedmic_pipeline.datasets.npz_dataset import save_npz_deterministic
from fedmic_pipeline.pipelines.federated_training.nodes import train_federated
from fedmic_pipeline.pipelines.federated_training.pipeline import create_pipeline as training_pipeline
from fixtures_pipelines import small_federation, training_params, write_partition

REWRITE = r"kedro run --pipelines data_partition"


@pytest.fixture(scope="module")
def federation():
    """Four hospitals (client arrays, global test set, dataset_info, manifest)."""
    return small_federation(num_clients=4, n_train=300, n_val=60, n_test=60)


@pytest.fixture
def client_folder(federation, tmp_path):
    clients, global_test, _, manifest = federation
    write_partition(tmp_path, clients, global_test, manifest)
    return tmp_path / "data/05_model_input/clients"


def _train_on_files(folder, federation, **training):
    _, _, info, manifest = federation
    params = training_params(algorithm="fedavg", **training)
    partitions = AtomicPartitionedDataset(path=str(folder), dataset="fedmic_pipeline.datasets.NpzDataset", filename_suffix=".npz")
    return train_federated(partitions.load(), manifest, info, params["training"], params["algorithm_params"])


def test_a_deleted_client_file_is_refused_with_the_fix(client_folder, federation):
    (client_folder / "client_02.npz").unlink()
    with pytest.raises(ConfigurationError, match=rf"lists 4 hospitals: missing client_02\.npz .*{REWRITE}"):
        _train_on_files(client_folder, federation)


def test_an_extra_client_file_is_refused_with_the_fix(client_folder, federation):
    shutil.copy(client_folder / "client_00.npz", client_folder / "client_04.npz")
    with pytest.raises(ConfigurationError, match=rf"extra client_04\.npz \(not in the manifest\).*{REWRITE}"):
        _train_on_files(client_folder, federation)


def test_a_client_file_of_other_split_sizes_is_refused(client_folder, federation):
    clients = federation[0]
    shrunk = {**clients["client_01"], "train_images": clients["client_01"]["train_images"][:-2],
              "train_labels": clients["client_01"]["train_labels"][:-2]}  # fmt: skip
    save_npz_deterministic(client_folder / "client_01.npz", shrunk)
    n_train = len(clients["client_01"]["train_labels"])
    with pytest.raises(ConfigurationError, match=rf"client_01\.npz holds {n_train - 2} train .* records {n_train} train.*{REWRITE}"):
        _train_on_files(client_folder, federation)


class DiskFullForClient03(TorchModelDataset):
    """The real model dataset, except that writing client_03.pt fails as on a full disk."""

    def save(self, data):
        if str(self._filepath).endswith("client_03.pt"):
            raise OSError(28, "No space left on device")
        super().save(data)


def _catalog(federation, models_folder, model_dataset, **training) -> DataCatalog:
    clients, _, info, manifest = federation
    params = training_params(algorithm="fedavg", num_rounds=3, **training)
    inputs = {"client_partitions": clients, "partition_manifest": manifest, "dataset_info": info,
              "params:training": params["training"], "params:algorithm_params": params["algorithm_params"],
              "synthetic_client_sets": {}}  # fmt: skip
    catalog = DataCatalog({name: MemoryDataset(value) for name, value in inputs.items()})
    catalog["trained_models"] = AtomicPartitionedDataset(
        path=str(models_folder), dataset={"type": model_dataset}, filename_suffix=".pt"
    )
    catalog["training_history"] = MemoryDataset()
    return catalog


def _run(catalog: DataCatalog) -> pd.DataFrame:
    pipeline = training_pipeline().only_nodes("train_federated", "discard_checkpoint")
    SequentialRunner().run(pipeline, catalog)
    return catalog.load("training_history")


def test_a_failed_model_save_keeps_the_checkpoint_and_the_run_resumes(federation, tmp_path):
    checkpoints = {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 1, "seed": 3}
    uninterrupted = _run(_catalog(federation, tmp_path / "reference", TorchModelDataset, **checkpoints))
    assert list((tmp_path / "ckpt").iterdir()) == []  # removed once the outputs were saved

    with pytest.raises(DatasetError, match="No space left on device"):
        _run(_catalog(federation, tmp_path / "models", DiskFullForClient03, **checkpoints))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["fedavg-seed3.pt"]  # the run is not lost
    assert not (tmp_path / "models").exists()  # and no subset of the models was left behind

    resumed = _run(_catalog(federation, tmp_path / "models", TorchModelDataset, resume=True, **checkpoints))
    assert list((tmp_path / "ckpt").iterdir()) == []
    timing = [c for c in TIMING_KEYS if c in resumed.columns]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), uninterrupted.drop(columns=timing), check_exact=True)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(p.name for p in (tmp_path / "reference").iterdir())
