"""Whether the models on disk are the ones a training run produced, on the current partition.

Evaluation scores whatever sits in data/06_models on whatever sits in data/05_model_input.
Two ways that goes wrong without an error: a model file edited or copied in after training
(the numbers describe a model no run produced), and a re-partition after training (the
models' former training images can then sit in the new local test splits, so the test
scores are inflated). The training summary records the partition manifest's sha256 and a
digest of every model (`run_records.run_summary`); these checks compare them with what is
on disk now, and refuse with the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.run_records import manifest_sha256, model_digest

RETRAIN = "`kedro run --pipelines federated_training,evaluation`"


def check_trained_on_this_partition(training_summary: Mapping[str, Any], partition_manifest: Mapping[str, Any]) -> None:
    """Refuse a training run whose partition manifest is not the current one."""
    recorded = training_summary.get("partition_manifest_sha256")
    if not recorded:
        raise ConfigurationError(
            "training_summary.json records no partition_manifest_sha256, so the models cannot be tied to the "
            "partition they were trained on (they come from an older version of this pipeline, or the summary was "
            f"edited). Retrain on the current partition: {RETRAIN}."
        )
    current = manifest_sha256(partition_manifest)
    if recorded != current:
        raise ConfigurationError(
            f"The models were trained on another partition: training_summary.json records partition manifest "
            f"sha256 {recorded[:12]}..., the current partition_manifest.json hashes to {current[:12]}.... Scoring "
            "them on this partition would inflate the numbers, since a hospital's former training images can sit "
            f"in its new local test split. Retrain on the current partition: {RETRAIN} (or bring back the "
            "partition they were trained on, e.g. with `dvc checkout`)."
        )


def check_models_match_training(models: Mapping[str, Mapping[str, Any]], training_summary: Mapping[str, Any]) -> None:
    """Refuse model files that differ from, or are missing from, what training produced."""
    recorded = training_summary.get("model_sha256")
    if not recorded:
        raise ConfigurationError(
            "training_summary.json records no model_sha256 digests, so the model files in data/06_models cannot be "
            f"checked against the run that wrote them. Retrain to record them: {RETRAIN}."
        )
    changed = sorted(key for key in set(models) & set(recorded) if model_digest(models[key]) != recorded[key])
    extra, missing = sorted(set(models) - set(recorded)), sorted(set(recorded) - set(models))
    problems = [f"{', '.join(changed)} (edited or replaced after training)"] if changed else []
    problems += [f"{', '.join(extra)} (not produced by that run)"] if extra else []
    problems += [f"{', '.join(missing)} (produced by that run, file missing)"] if missing else []
    if problems:
        raise ConfigurationError(
            f"The model files in data/06_models are not the ones the training run in training_summary.json "
            f"produced: {'; '.join(problems)}. Evaluating them would report numbers no recorded run stands behind. "
            f"Retrain to write models and summary together: {RETRAIN}."
        )


def check_metrics_belong_to_run(training_tracking: Mapping[str, Any], evaluation_tracking: Mapping[str, Any]) -> None:
    """Refuse evaluation results logged into another MLflow run than the training run's."""
    trained, evaluated = training_tracking.get("mlflow_run_id"), evaluation_tracking.get("mlflow_run_id")
    if trained and evaluated and trained != evaluated:
        raise ConfigurationError(
            f"mlflow_evaluation.json belongs to MLflow run {evaluated}, mlflow_run.json to the training run {trained}: "
            f"the evaluation results are stale (from before the last training). Evaluate this run first: {RETRAIN}."
        )
