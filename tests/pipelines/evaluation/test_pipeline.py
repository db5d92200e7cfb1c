"""The `evaluation` pipeline in the spaceflights style: a node test, an error test and a slice
of training + evaluation run by Kedro's runner on an in-memory catalog (no KedroSession, no
files, no MLflow): what the models are scored on, and that the tables agree with the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.partitioning import partition_in_memory
from fedmic_pipeline.pipelines.evaluation import nodes
from fedmic_pipeline.pipelines.evaluation.pipeline import create_pipeline as evaluation_pipeline
from fedmic_pipeline.pipelines.federated_training.pipeline import create_pipeline as training_pipeline

from fixtures_pipelines import project_params, synthetic_dataset, training_params

#: The nodes of the slice: training and the evaluation nodes that need no tracking server.
SLICE = ["train_federated", "evaluate_federation", "summarize_metrics", "site_table", "device_table", "class_table"]


@pytest.fixture(scope="module")
def catalog_inputs() -> dict:
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15, num_clients=4)
    clients, global_test, manifest = partition_in_memory(dataset, info, params["partition"], params["devices"])
    run = training_params(algorithm="fedavg", join_ratio=1.0)
    evaluation = {**run["evaluation"], "n_bootstrap": 20}
    return {
        "client_partitions": clients,
        "synthetic_client_sets": {},
        "global_test_set": global_test,
        "dataset_info": {**info, "size": 16},
        "partition_manifest": manifest,
        "params:training": run["training"],
        "params:algorithm_params": run["algorithm_params"],
        "params:evaluation": evaluation,
    }


class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner does not empty after its last reader, so the test can look."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="module")
def slice_outputs(catalog_inputs: dict) -> DataCatalog:
    catalog = DataCatalog({name: MemoryDataset(value) for name, value in catalog_inputs.items()})
    for name in ("trained_models", "training_summary", "evaluation_report"):
        catalog[name] = KeptDataset()
    pipeline = (training_pipeline() + evaluation_pipeline()).only_nodes(*SLICE)
    SequentialRunner().run(pipeline, catalog)
    return catalog


def test_the_slice_scores_each_model_where_it_should_be_judged(slice_outputs: DataCatalog, catalog_inputs: dict) -> None:
    report = slice_outputs.load("evaluation_report")
    n_test = len(catalog_inputs["global_test_set"]["labels"])
    assert report["global"]["n"] == n_test  # the global model on the official test split
    assert set(report["global_by_device"]) == {str(n) for n in catalog_inputs["global_test_set"]["device_names"]}
    clients = catalog_inputs["client_partitions"]
    assert [s["n"] for s in report["sites"]] == [len(clients[k]["test_labels"]) for k in sorted(clients)]
    assert report["majority_class"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert report["global"]["balanced_accuracy"] > report["majority_class"]["balanced_accuracy"]  # an easy task: it learns


def test_the_tables_and_headline_agree_with_the_report(slice_outputs: DataCatalog) -> None:
    report = slice_outputs.load("evaluation_report")
    headline = slice_outputs.load("evaluation_metrics")
    sites: pd.DataFrame = slice_outputs.load("site_metrics")
    assert headline["global.balanced_accuracy"] == pytest.approx(report["global"]["balanced_accuracy"])
    assert headline["personalized.num_sites"] == len(sites) == len(report["sites"])
    assert np.allclose(sites["balanced_accuracy"], [s["balanced_accuracy"] for s in report["sites"]])
    devices: pd.DataFrame = slice_outputs.load("device_metrics")
    assert devices["held_out"].sum() == (1 if report["held_out_device"] else 0)
    assert len(slice_outputs.load("class_metrics")) == 3


def test_summarize_metrics_counts_the_selection_round() -> None:
    report = {
        "global": None, "global_by_device": {}, "held_out_device": None, "site_summary": None,
        "personalized_on_unseen_device_summary": None,
    }  # fmt: skip
    summary = {
        "algorithm": "local_only", "selection": {"global_round": None}, "mb_up_per_client_per_round": 0.0,
        "totals": {"bytes_up_total": 0, "bytes_down_total": 0, "bytes_dense_total": 10, "wall_time_s": 1.0},
    }  # fmt: skip
    flat = nodes.summarize_metrics(report, summary)
    assert flat["global.balanced_accuracy"] is None and flat["selection.global_round"] is None
    assert flat["communication.mb_dense_total"] == pytest.approx(1e-5)


def test_models_of_another_partition_are_refused_with_the_fix(catalog_inputs: dict, slice_outputs: DataCatalog) -> None:
    models = slice_outputs.load("trained_models")
    del models["client_02"]  # as if data/06_models held a run on a partition without this hospital
    with pytest.raises(ConfigurationError, match=r"No trained model for \['client_02'\].*another partition.*kedro run"):
        nodes.evaluate_federation(
            models,
            catalog_inputs["client_partitions"],
            catalog_inputs["global_test_set"],
            catalog_inputs["dataset_info"],
            catalog_inputs["partition_manifest"],
            catalog_inputs["params:evaluation"],
        )
