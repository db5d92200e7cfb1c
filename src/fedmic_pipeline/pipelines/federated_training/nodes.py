"""Nodes of `federated_training`: build the federation, run the rounds, record the run.

The training itself is the core's `run_simulation`; these nodes only translate catalog
data into core objects and the result back into tables, model records and MLflow entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedmic_pipeline import experiment
from fedmic_pipeline.core.models import model_record
from fedmic_pipeline.core.simulation import run_simulation
from fedmic_pipeline.tracking import mlflow_logging

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def train_federated(
    client_partitions: Mapping[str, Callable[[], Arrays]],
    global_test_set: Arrays,
    dataset_info: dict[str, Any],
    training: dict[str, Any],
    algorithm_params: dict[str, Any],
    extra_training_sets: Mapping[str, Callable[[], Arrays]] | None = None,
) -> tuple[dict[str, dict[str, Any]], pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run `training.algorithm` over the hospitals; return models, curves, bytes, summary.

    Everything that can be wrong in the configuration is checked while the algorithm and
    runner are built, before the first round.
    """
    spec = experiment.data_spec(dataset_info)
    name = training["algorithm"]
    algorithm = experiment.make_algorithm(name, algorithm_params, spec)
    config = experiment.simulation_config(training)
    clients = experiment.build_clients(client_partitions, extra_training_sets)
    result = run_simulation(algorithm, clients, spec, config, global_test=experiment.global_test_tensors(global_test_set))

    models: dict[str, dict[str, Any]] = {}
    global_model = result.global_model()
    if global_model is not None:
        models["global"] = model_record(global_model)
    for client in clients:
        models[f"client_{client.client_id:02d}"] = model_record(result.personalized_model(client.client_id))

    summary = experiment.run_summary(algorithm, result, clients, use_synthetic=extra_training_sets is not None)
    return models, experiment.history_table(result.history), experiment.communication_table(result.history), summary


def track_training(
    training_history: pd.DataFrame,
    training_summary: dict[str, Any],
    trained_models: Mapping[str, Any],
    dataset_info: dict[str, Any],
    partition_manifest: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Log curves (step = round), totals, lineage tags and the registered global model."""
    models = {key: value() if callable(value) else value for key, value in trained_models.items()}
    return mlflow_logging.log_training_run(
        history=training_history,
        summary=training_summary,
        models=models,
        dataset_info=dataset_info,
        partition_manifest=partition_manifest,
        seed=int(training["seed"]),
    )
