"""MLflow entries of a run: curves with step = round, totals, lineage tags, models.

Kedro-mlflow opens the run around the pipeline and logs the `params:` inputs; this module
adds what a comparison or an audit needs beyond them. With no active run (tracking
disabled for the pipeline) it logs a warning and records nothing, so training never
depends on a tracking server being reachable.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmic_pipeline.tracking.lineage import (
    SYNTHETIC_INPUT,
    TRAINING_INPUTS,
    content_hash,
    dvc_lock_hashes,
    dvc_stage,
    git_state,
    input_hashes,
)

logger = logging.getLogger(__name__)

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(float(value))


def privacy_from_summary(summary: Mapping[str, Any], history: pd.DataFrame | None = None) -> dict[str, Any] | None:
    """The client-level DP budget of a run (``core/privacy.py``), or None when the run had no
    ``dp`` block: recomputed from the summary's resolved ``dp.*`` parameters, the hospitals
    sampled per round (the history's ``num_sampled``, else the engine's rule for the join
    ratio) and the rounds run, i.e. the numbers the run's server state recorded. An audit
    may run long after training, so it recomputes rather than trusting a stored number."""
    config = summary.get("algorithm_config") or {}
    dp_params = {key.removeprefix("dp."): value for key, value in config.items() if key.startswith("dp.")}
    if not dp_params:
        return None
    from fedmic_pipeline.core.engine import sample_clients
    from fedmic_pipeline.core.privacy import privacy_of_run

    simulation = summary.get("simulation") or {}
    num_clients = summary.get("num_clients")
    rounds = int((summary.get("totals") or {}).get("rounds") or (len(history) if history is not None else 0))
    if history is not None and len(history) and "num_sampled" in history:
        per_round = int(history["num_sampled"].iloc[0])
    elif num_clients:
        per_round = len(sample_clients(range(int(num_clients)), float(simulation.get("join_ratio", 1.0)), 0, 0))
    else:
        per_round = None
    spent = privacy_of_run(dp_params, per_round, num_clients, rounds, simulation.get("num_rounds"))
    return spent.as_dict()


def log_privacy(run_id: str, privacy: Mapping[str, Any]) -> None:
    """``dp.epsilon`` per round (step = round, as the other curves), the run's epsilon, delta
    and noise multiplier as ``total.dp.*``, and the placement as a tag. An infinite epsilon
    (no noise) is a tag, MLflow metrics being finite."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    curve = [Metric(key="dp.epsilon", value=float(eps), timestamp=now, step=step)
             for step, eps in enumerate(privacy["epsilon_per_round"], start=1) if _finite(eps)]  # fmt: skip
    if curve:
        MlflowClient().log_batch(run_id, metrics=curve)
    totals = {f"total.dp.{key}": float(privacy[key]) for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "clip_norm")}
    mlflow.log_metrics({key: value for key, value in totals.items() if _finite(value)})
    mlflow.set_tags({"dp.placement": str(privacy["placement"]), "dp.epsilon": str(privacy["epsilon"])})


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        logger.warning("No active MLflow run (tracking disabled for this pipeline?): nothing is logged to MLflow.")
        return None
    return run.info.run_id


def log_metric_history(run_id: str, history: pd.DataFrame, step_column: str = "round") -> int:
    """Every numeric column of `history` as a metric with step = that row's round."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [
        Metric(key=str(column), value=float(row[column]), timestamp=now, step=int(row[step_column]))
        for _, row in history.iterrows()
        for column in history.columns
        if column != step_column and _finite(row[column])
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)  # MLflow splits it into requests of <= 1000
    return len(metrics)


def lineage_tags(
    dataset_info: Mapping[str, Any], partition_manifest: Mapping[str, Any], seed: int, synthetic_used: bool = False
) -> dict[str, str]:
    """The facts that tie a model to its code and data: git, the md5 of every file the run
    read (``data.md5:<path>``), manifests, seed; and, only when `dvc repro` made the run
    (``dvc.stage``), dvc.lock's hashes at that moment (``dvc.<stage>:<path>``)."""
    project_root = Path.cwd()  # kedro runs from the project root
    tags = {key: str(value) for key, value in git_state(project_root).items()}
    inputs = [*TRAINING_INPUTS, *([SYNTHETIC_INPUT] if synthetic_used else [])]
    for path, md5 in input_hashes(project_root, inputs).items():
        tags[f"data.md5:{path}"] = md5
    stage = dvc_stage()
    tags["dvc.stage"] = stage or "none"
    if stage is not None:
        for out, md5 in dvc_lock_hashes(project_root).items():
            tags[f"dvc.{out}"] = md5
    tags.update(
        {
            "dataset.flag": str(dataset_info.get("flag")),
            "dataset.md5": str(dataset_info.get("md5")),
            "partition.manifest_sha256": content_hash(partition_manifest),
            "seed": str(seed),
        }
    )
    return tags


def _flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{key}": str(value)[:5000] for key, value in values.items()}


def registered_model_name(dataset_flag: str, algorithm: str) -> str:
    return f"{dataset_flag}-{algorithm}-global"


def log_model_records(models: Mapping[str, dict[str, Any]], artifact_path: str) -> None:
    """Personalized models as artifacts (recipe + weights, one file per hospital)."""
    import mlflow
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        for key, record in sorted(models.items()):
            torch.save(record, Path(tmp) / f"{key}.pt")
        mlflow.log_artifacts(tmp, artifact_path=artifact_path)


def register_global_model(record: dict[str, Any], name: str) -> dict[str, Any]:
    """Log the global model in MLflow's pytorch flavour with a signature and register it."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from fedmic_pipeline.core.models import model_from_record

    model = model_from_record(record)
    spec = record["spec"]
    example = np.zeros((2, spec["in_channels"], spec["image_size"], spec["image_size"]), dtype=np.float32)
    with torch.no_grad():
        proba = torch.softmax(model(torch.from_numpy(example)), dim=1).numpy()
    with tempfile.TemporaryDirectory() as code:
        info = mlflow.pytorch.log_model(
            model,
            name="global_model",
            signature=infer_signature(example, proba),
            input_example=example,
            registered_model_name=name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            code_paths=[str(_core_package(Path(code)))],
        )
    return {"model_uri": info.model_uri, "registered_model": name, "version": getattr(info, "registered_model_version", None)}


def _core_package(target: Path) -> Path:
    """A copy of ``fedmic_pipeline`` holding only its torch+numpy core: the pickled model's
    classes live in ``fedmic_pipeline.core.models``, so a registered model ships the code it
    needs and loads with torch and numpy alone, outside this project's environment."""
    import shutil

    import fedmic_pipeline

    source = Path(fedmic_pipeline.__file__).parent
    package = target / "fedmic_pipeline"
    package.mkdir(parents=True)
    shutil.copy2(source / "__init__.py", package / "__init__.py")
    shutil.copytree(source / "core", package / "core", ignore=shutil.ignore_patterns("__pycache__"))
    return package


def log_training_run(
    history: pd.DataFrame,
    summary: Mapping[str, Any],
    models: Mapping[str, dict[str, Any]],
    dataset_info: Mapping[str, Any],
    partition_manifest: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Everything a training run contributes to MLflow; returns what was logged where."""
    run_id = _active_run_id()
    if run_id is None:
        return {"mlflow_run_id": None}
    import mlflow

    pretraining = summary.get("pretraining")
    synthetic_used = str(summary.get("extra_training_data", "none")) != "none" or bool(pretraining)
    tags = lineage_tags(dataset_info, partition_manifest, seed, synthetic_used=synthetic_used)
    tags["algorithm"] = str(summary["algorithm"])
    mlflow.set_tags(tags)
    mlflow.log_params(_flat_params("resolved", summary.get("algorithm_config", {})))
    n_metrics = log_metric_history(run_id, history)
    totals = {f"total.{k}": float(v) for k, v in summary["totals"].items() if _finite(v)}
    totals["mb_up_per_client_per_round"] = float(summary["mb_up_per_client_per_round"])
    mlflow.log_metrics(totals)
    privacy = privacy_from_summary(summary, history)
    if privacy is not None:
        log_privacy(run_id, privacy)
    if pretraining:
        log_pretraining(pretraining)

    registered = None
    if "global" in models:
        registered = register_global_model(models["global"], registered_model_name(str(dataset_info["flag"]), str(summary["algorithm"])))
    personalized = {key: record for key, record in models.items() if key.startswith("client_")}
    if personalized:
        log_model_records(personalized, "personalized_models")
    if "global_last" in models:  # the registered model is the round selected on validation; the last one beside it
        log_model_records({"global_last": models["global_last"]}, "last_round_model")
    if summary.get("selection"):
        selection = summary["selection"]
        mlflow.set_tags({"selection.global_round": str(selection.get("global_round")), "selection.rule": SELECTION_RULE})
    logger.info("MLflow run %s: %d metric points, model %s", run_id, n_metrics, registered and registered["registered_model"])
    return {"mlflow_run_id": run_id, "tracking_uri": mlflow.get_tracking_uri(), "registered": registered, "tags": tags}


def log_pretraining(pretraining: Mapping[str, Any]) -> None:
    """The server's pretraining on the synthetic pool: its settings as params, the digests of
    the model before and after as tags (they prove round 1 started from the pretrained model),
    the loss per epoch as a metric curve (step = epoch)."""
    import mlflow

    mlflow.log_params({f"pretraining.{key}": pretraining[key] for key in ("epochs", "lr", "batch_size", "samples", "seed")
                       if pretraining.get(key) is not None})  # fmt: skip
    mlflow.set_tags({f"pretraining.{key}": str(pretraining[key]) for key in ("initial_digest", "pretrained_digest", "note")
                     if pretraining.get(key) is not None})  # fmt: skip
    for epoch, loss in enumerate(pretraining.get("loss_by_epoch") or []):
        mlflow.log_metric("pretraining.loss", float(loss), step=epoch)


SELECTION_RULE = "best pooled validation balanced accuracy (global); own validation split per hospital (personalized)"


def log_evaluation(
    run_id: str | None,
    metrics: Mapping[str, Any],
    report: Mapping[str, Any],
    figures: Mapping[str, Any],
) -> dict[str, Any]:
    """Headline metrics, the JSON report and figures into the run `run_id`."""
    import json

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if not run_id:
        logger.warning("The training run has no MLflow run id: evaluation results are not logged to MLflow.")
        return {"mlflow_run_id": None}
    client = MlflowClient()
    now = int(time.time() * 1000)
    entries = [Metric(key=f"final.{k}", value=float(v), timestamp=now, step=0) for k, v in metrics.items() if _finite(v)]
    client.log_batch(run_id, metrics=entries)
    client.log_dict(run_id, json.loads(json.dumps(report, default=float)), "evaluation/evaluation_report.json")
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"evaluation/{name}", save_kwargs={"dpi": 110, "bbox_inches": "tight"})
    logger.info("Logged %d final metrics and %d figures to MLflow run %s", len(entries), len(figures), run_id)
    return {"mlflow_run_id": run_id, "final_metrics": len(entries)}
