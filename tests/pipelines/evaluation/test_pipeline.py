"""The `evaluation` pipeline in the spaceflights style: a node test, an error test and a slice
of training + evaluation run by Kedro's runner on an in-memory catalog (no KedroSession, no
MLflow): what the models are scored on, that the tables agree with the report, and that
models edited after training or trained on another partition are refused (by evaluation,
and by promotion, which an evaluation error stops)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.datasets import AtomicPartitionedDataset
from fedmic_pipeline.partitioning import partition_in_memory
from fedmic_pipeline.run_records import model_digest
from fedmic_pipeline.pipelines.evaluation import nodes
from fedmic_pipeline.pipelines.evaluation.pipeline import create_pipeline as evaluation_pipeline
from fedmic_pipeline.pipelines.federated_training.pipeline import create_pipeline as training_pipeline

from fixtures_pipelines import project_params, synthetic_dataset, training_params

#: The nodes of the slice: training and the evaluation nodes that need no tracking server.
SLICE = [
    "train_federated", "evaluate_federation", "summarize_metrics", "site_table", "device_table", "class_table",
    "plot_confusion_matrix", "plot_reliability",
]  # fmt: skip


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
    for name in ("trained_models", "training_summary", "evaluation_report", "training_history"):
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


def test_the_confusion_matrix_and_reliability_figures_draw_the_reports_numbers(slice_outputs: DataCatalog) -> None:
    report = slice_outputs.load("evaluation_report")
    confusion = slice_outputs.load("confusion_matrix_plot")
    counts_axes = confusion.axes[0]
    shown = sorted(int(t.get_text()) for t in counts_axes.texts)
    assert shown == sorted(int(v) for row in report["global"]["confusion_matrix"] for v in row)
    reliability = slice_outputs.load("reliability_plot")
    line = next(l for l in reliability.axes[0].get_lines() if l.get_label().startswith("ECE"))
    bins = report["global"]["reliability"]
    assert list(line.get_ydata()) == [a for a, n in zip(bins["accuracy"], bins["count"]) if n]
    assert line.get_label() == f"ECE {report['global']['ece']:.3f}"


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
        _evaluate(models, slice_outputs.load("training_summary"), catalog_inputs)


def _evaluate(models: dict, training_summary: dict, inputs: dict) -> dict:
    return nodes.evaluate_federation(
        models,
        training_summary,
        inputs["client_partitions"],
        inputs["global_test_set"],
        inputs["dataset_info"],
        inputs["partition_manifest"],
        inputs["params:evaluation"],
    )


def _saved(models: dict, folder) -> AtomicPartitionedDataset:
    """The models written as `trained_models` writes them (data/06_models), for loading back."""
    dataset = AtomicPartitionedDataset(path=str(folder), dataset="fedmic_pipeline.datasets.TorchModelDataset", filename_suffix=".pt")
    dataset.save(models)
    return dataset


def test_the_summary_binds_the_run_to_its_partition_and_models(slice_outputs: DataCatalog, tmp_path) -> None:
    summary = slice_outputs.load("training_summary")
    models = slice_outputs.load("trained_models")
    assert set(summary["model_sha256"]) == set(models) and len(summary["partition_manifest_sha256"]) == 64
    loaded = {key: load() for key, load in _saved(models, tmp_path / "06_models").load().items()}
    assert {key: model_digest(record) for key, record in loaded.items()} == summary["model_sha256"]  # files = memory


def test_a_model_file_edited_after_training_is_refused(slice_outputs: DataCatalog, catalog_inputs: dict, tmp_path) -> None:
    dataset = _saved(slice_outputs.load("trained_models"), tmp_path / "06_models")
    path = tmp_path / "06_models" / "client_01.pt"
    record = torch.load(path, weights_only=True)
    key = next(k for k, v in record["state_dict"].items() if v.is_floating_point())
    record["state_dict"][key] = record["state_dict"][key] * 1.01  # a "better" model slipped in by hand
    torch.save(record, path)
    refused = r"client_01 \(edited or replaced after training\).*kedro run --pipelines federated_training,evaluation"
    with pytest.raises(ConfigurationError, match=refused):
        _evaluate(dataset.load(), slice_outputs.load("training_summary"), catalog_inputs)


def test_models_trained_on_another_partition_are_refused(slice_outputs: DataCatalog, catalog_inputs: dict) -> None:
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15, num_clients=4, seed=7)  # the same 4 hospitals, redrawn
    clients, global_test, manifest = partition_in_memory(dataset, info, params["partition"], params["devices"])
    repartitioned = {**catalog_inputs, "client_partitions": clients, "global_test_set": global_test, "partition_manifest": manifest}
    refused = r"trained on another partition.*local test split.*kedro run --pipelines federated_training"
    with pytest.raises(ConfigurationError, match=refused):
        _evaluate(slice_outputs.load("trained_models"), slice_outputs.load("training_summary"), repartitioned)


def test_a_summary_without_its_binding_is_refused(slice_outputs: DataCatalog, catalog_inputs: dict) -> None:
    summary = dict(slice_outputs.load("training_summary"))
    del summary["model_sha256"]
    with pytest.raises(ConfigurationError, match=r"no model_sha256.*kedro run --pipelines federated_training"):
        _evaluate(slice_outputs.load("trained_models"), summary, catalog_inputs)
    del summary["partition_manifest_sha256"]
    with pytest.raises(ConfigurationError, match=r"no partition_manifest_sha256.*kedro run --pipelines federated_training"):
        _evaluate(slice_outputs.load("trained_models"), summary, catalog_inputs)


def test_a_refused_evaluation_stops_the_promotion(slice_outputs: DataCatalog, catalog_inputs: dict) -> None:
    """The whole evaluation pipeline, promotion included, on an edited model: the runner stops
    at `evaluate_federation` and `promote_champion` never runs (no decision, no registry call)."""
    models = dict(slice_outputs.load("trained_models"))
    edited = {key: value.clone() for key, value in models["global"]["state_dict"].items()}
    edited[next(k for k, v in edited.items() if v.is_floating_point())] += 0.5
    models["global"] = {**models["global"], "state_dict": edited}
    inputs = {**catalog_inputs, "trained_models": models, "params:promotion": {"enabled": True}}
    for name in ("training_summary", "training_history"):
        inputs[name] = slice_outputs.load(name)
    inputs["training_tracking"] = {"mlflow_run_id": "never-promoted", "registered": {"registered_model": "m", "version": 1}}
    catalog = DataCatalog({name: MemoryDataset(value) for name, value in inputs.items() if name != "synthetic_client_sets"})
    catalog["promotion_decision"] = KeptDataset()
    with pytest.raises(ConfigurationError, match=r"global \(edited or replaced after training\)"):
        SequentialRunner().run(evaluation_pipeline(), catalog)
    assert not catalog.exists("promotion_decision")


def test_promotion_alone_refuses_another_partition_and_stale_metrics(slice_outputs: DataCatalog, catalog_inputs: dict) -> None:
    """`kedro run --pipelines evaluation --nodes promote_champion` checks the binding itself,
    before it touches the registry (no MLflow store exists here)."""
    summary = slice_outputs.load("training_summary")
    tracking = {"mlflow_run_id": "run-a", "registered": {"registered_model": "m", "version": 1}}
    other_manifest = {**catalog_inputs["partition_manifest"], "attempts_used": -1}
    manifest, promotion = catalog_inputs["partition_manifest"], {"enabled": True}
    with pytest.raises(ConfigurationError, match=r"trained on another partition"):
        nodes.promote_champion({}, tracking, {"mlflow_run_id": "run-a"}, summary, other_manifest, promotion)
    with pytest.raises(ConfigurationError, match=r"mlflow_evaluation.json belongs to MLflow run run-b.*stale"):
        nodes.promote_champion({}, tracking, {"mlflow_run_id": "run-b"}, summary, manifest, promotion)
