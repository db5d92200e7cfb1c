"""Nodes of `federated_training`: build the federation, run the rounds, record the run.

The training itself is the core's `run_simulation`; these nodes only translate catalog
data into core objects and the result back into tables, model records and MLflow entries.

Checkpoints (`training.checkpoint_dir`, `checkpoint_every`, `resume`): the core builds
checkpoint dicts, this layer owns the file `<checkpoint_dir>/<algorithm>-seed<seed>.pt`. It
is written atomically (a temp file in the same folder, then `os.replace`), so a run killed
mid-write leaves the previous checkpoint intact. It is deleted by `discard_checkpoint`, a
node downstream of the saved models and summary: a run that fails while Kedro saves its
outputs can still be resumed. It lives outside `data/06_models` on purpose: `dvc repro`
deletes a stage's outputs before running it, and the models' dataset would replace it.

The summary records the sha256 of the partition manifest and a digest of every model
(`run_records.run_summary`), which evaluation and promotion check before trusting them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmic_pipeline import federation
from fedmic_pipeline import run_records
from fedmic_pipeline.configuration import TrainingConfig
from fedmic_pipeline.core.checkpoint import deserialize_checkpoint, serialize_checkpoint
from fedmic_pipeline.core.models import model_record
from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.core.simulation import run_simulation
from fedmic_pipeline.datasets.atomic import write_bytes_atomically
from fedmic_pipeline.tracking import mlflow_logging

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def train_federated(
    client_partitions: Mapping[str, Callable[[], Arrays]],
    partition_manifest: dict[str, Any] | None,
    dataset_info: dict[str, Any],
    training: dict[str, Any],
    algorithm_params: dict[str, Any],
    synthetic_client_sets: Mapping[str, Callable[[], Arrays]] | None = None,
) -> tuple[dict[str, dict[str, Any]], pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run `training.algorithm` over the hospitals; return models, curves, bytes, summary.

    Training never reads a test set: rounds are scored on the hospitals' validation splits
    and `trained_models["global"]` is the round selected there (`global_last` beside it).
    Everything that can be wrong in the configuration is checked while the algorithm and
    runner are built, before the first round. `training.extra_training_data` adds each
    hospital's synthetic set (or as many augmented real samples) to its training split;
    `training.pretraining` (on with the synthetic sets by default) has the server train the
    shared model on their union before round 1.
    With `training.resume` the run continues from its checkpoint (see the module docstring).
    The client files must be the hospitals `partition_manifest` lists (`build_clients`);
    without a manifest (in-memory partitions) the summary is bound to none, and evaluation
    will refuse its models.
    """
    spec = federation.data_spec(dataset_info)
    config = TrainingConfig.from_params(training)
    algorithm = federation.make_algorithm(config.algorithm, algorithm_params, spec)
    path = config.checkpoint_path
    resume_from = _load_checkpoint(path, config.resume)
    mode = config.extra_training_data
    extra = federation.extra_training_sets(mode, client_partitions, synthetic_client_sets, config.seed)
    clients = federation.build_clients(client_partitions, extra, partition_manifest)
    pretraining = federation.server_pretraining(config.pretraining, synthetic_client_sets)
    result = run_simulation(
        algorithm, clients, spec, config.simulation,
        checkpoint_every=config.checkpoint_every if path is not None else 0,
        on_checkpoint=(lambda checkpoint: write_bytes_atomically(path, serialize_checkpoint(checkpoint))) if path else None,
        resume_from=resume_from,
        fingerprint_extra={"dataset": dataset_info.get("flag"), "dataset_md5": dataset_info.get("md5"),
                           "extra_training_data": mode, "pretraining": dataclasses.asdict(config.pretraining)
                           if config.pretraining else None},
        callbacks=[pretraining] if pretraining else [],
    )  # fmt: skip

    models: dict[str, dict[str, Any]] = {}
    global_model = result.global_model()
    if global_model is not None:
        models["global"] = model_record(global_model)  # the round selected on validation
        models["global_last"] = model_record(result.last_global_model())
    for client in clients:
        models[f"client_{client.client_id:02d}"] = model_record(result.personalized_model(client.client_id))

    summary = run_records.run_summary(
        algorithm, result, clients, extra_training_data=mode, models=models, partition_manifest=partition_manifest,
        pretraining=_pretraining_record(pretraining, resume_from),
    )
    return models, run_records.history_table(result.history), run_records.communication_table(result.history), summary


def _pretraining_record(pretraining: Any, resume_from: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the server's pretraining did; a resumed run pretrained before its checkpoint."""
    if pretraining is None:
        return None
    if pretraining.summary is None and resume_from is not None:
        return {**dataclasses.asdict(pretraining.config), "samples": int(len(pretraining.labels)), "seed": None,
                "initial_digest": None, "pretrained_digest": None,
                "note": "pretrained by the interrupted run this one resumed (same pool and settings: the fingerprint matched)"}  # fmt: skip
    return pretraining.summary


def discard_checkpoint(trained_models: Mapping[str, Any], training_summary: dict[str, Any], training: dict[str, Any]) -> None:
    """Delete the run's checkpoint once its models and summary are saved: nothing left to resume.

    A node of its own, downstream of both outputs, because Kedro saves a node's outputs
    after the node returns: deleting it inside `train_federated` lost the whole run when
    a save failed (disk full, a killed process).
    """
    del trained_models, training_summary  # ordering dependencies only
    path = TrainingConfig.from_params(training).checkpoint_path
    if path is not None and path.exists():
        path.unlink(missing_ok=True)
        logger.info("Run complete: removed its checkpoint %s", path)


def _load_checkpoint(path: Path | None, resume: str) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None to start afresh (it is then overwritten)."""
    if path is None or resume == "false":
        if path is not None and path.exists():
            logger.warning(
                "A checkpoint of an interrupted run exists at %s; this run starts afresh and overwrites it. To continue "
                "it instead: kedro run --params training.resume=true", path,
            )  # fmt: skip
        return None
    if not path.exists():
        if resume == "true":
            raise ConfigurationError(
                f"training.resume is true but there is no checkpoint at {path} (none was written, or the run "
                "completed and removed it). Run without training.resume, or with training.resume=auto."
            )
        logger.info("training.resume=auto: no checkpoint at %s, starting afresh", path)
        return None
    import torch

    checkpoint = deserialize_checkpoint(path.read_bytes(), map_location=None if torch.cuda.is_available() else "cpu")
    logger.info("Resuming from %s (%d of %d rounds done)", path, checkpoint["rounds_completed"], checkpoint["num_rounds"])
    return checkpoint


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
