"""A finished run as records: per-round curves, bytes per client, the run summary.

The summary binds the run to its data: the sha256 of the partition manifest it trained on
and a digest of every model it produced, so evaluation and promotion can refuse models
edited since, or trained on another partition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from fedmic_pipeline.core.protocol import ClientData, FederatedAlgorithm
from fedmic_pipeline.core.simulation import SimulationResult
from fedmic_pipeline.core.synthesis.generator import state_sha256
from fedmic_pipeline.tracking.lineage import content_hash


def history_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per round (1-based) with the scalar curves of the run."""
    columns = (
        "train_loss", "train_accuracy", "lr", "global_val_accuracy", "global_val_balanced_accuracy",
        "personalized_val_accuracy", "personalized_val_balanced_accuracy",
        "bytes_up_total", "bytes_down_total", "bytes_dense_total", "train_time_s", "eval_time_s", "samples_per_s",
    )  # fmt: skip
    rows = []
    for record in history:
        row = {"round": record["round"] + 1, "num_sampled": len(record["sampled"])}
        row.update({key: record.get(key) for key in columns})
        row["sampled"] = " ".join(str(c) for c in record["sampled"])
        rows.append(row)
    return pd.DataFrame(rows)


def communication_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """Exact bytes per sampled client per round, beside FedAvg's dense size."""
    rows = [
        {
            "round": record["round"] + 1,
            "client_id": client,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_dense_one_way": record["bytes_dense_per_client"],
        }
        for record in history
        for client, up, down in zip(record["sampled"], record["bytes_up"], record["bytes_down"], strict=True)
    ]
    return pd.DataFrame(rows, columns=["round", "client_id", "bytes_up", "bytes_down", "bytes_dense_one_way"])


def model_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a model record: its recipe (architecture, spec, kwargs) and its weights.

    Computed from the tensors (each key in sorted order with dtype, shape and raw bytes),
    not from the file, so the digest of the models in memory at the end of training equals
    that of the same models loaded back from data/06_models.
    """
    recipe = {key: record.get(key) for key in ("architecture", "spec", "kwargs")}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    digest.update(state_sha256(record["state_dict"]).encode())
    return digest.hexdigest()


def manifest_sha256(partition_manifest: Mapping[str, Any]) -> str:
    """The partition's identity: the same hash as the run's MLflow tag `partition.manifest_sha256`."""
    return content_hash(partition_manifest)


def run_summary(
    algorithm: FederatedAlgorithm,
    result: SimulationResult,
    clients: list[ClientData],
    extra_training_data: str = "none",
    models: Mapping[str, Mapping[str, Any]] | None = None,
    partition_manifest: Mapping[str, Any] | None = None,
    pretraining: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run was (resolved config, runner settings) and what it cost (bytes, time);
    with `models` and `partition_manifest`, what it produced from which partition;
    `pretraining`: what the server's pretraining did before round 1 (None = none)."""
    communication = communication_table(result.history)
    binding: dict[str, Any] = {}
    if partition_manifest is not None:
        binding["partition_manifest_sha256"] = manifest_sha256(partition_manifest)
    if models is not None:
        binding["model_sha256"] = {key: model_digest(record) for key, record in sorted(models.items())}
    return {
        "algorithm": algorithm.name,
        "algorithm_config": algorithm.describe() if hasattr(algorithm, "describe") else {"algorithm": algorithm.name},
        "simulation": result.config_dict(),
        "totals": result.totals(),
        "selection": result.selector.summary(),
        "mb_up_per_client_per_round": float(communication["bytes_up"].mean() / 1e6) if len(communication) else 0.0,
        "mb_down_per_client_per_round": float(communication["bytes_down"].mean() / 1e6) if len(communication) else 0.0,
        "num_clients": len(clients),
        "train_samples": {f"client_{c.client_id:02d}": c.num_train for c in clients},
        "synthetic_train_samples": {
            f"client_{c.client_id:02d}": int(c.train_is_synthetic.sum()) if c.train_is_synthetic is not None else 0
            for c in clients
        },
        "extra_training_data": extra_training_data,
        "pretraining": dict(pretraining) if pretraining is not None else None,
        **binding,
    }
