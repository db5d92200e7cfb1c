"""What one audit reads, named once: the evidence the Kedro node loads, and what is resolved from it.

`AuditInputs` holds the catalog's view of a finished run (the records that must exist and
the evidence that may be absent, as None); the node builds it, so the report builder and
the node do not each repeat the list. `AuditContext` is what `build_report` resolves from
those inputs once and every part of the report shares: where the project is, the run as
MLflow holds it, the run's tags and dvc.lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class AuditInputs:
    """The run's records (mlflow_run.json, training and evaluation outputs), each stage's
    evidence (None where absent: the report says so), the current `parameters` (for drift)
    and the `audit` parameters."""

    training_tracking: Mapping[str, Any]
    training_summary: Mapping[str, Any]
    training_history: pd.DataFrame | None
    evaluation_report: Mapping[str, Any]
    evaluation_metrics: Mapping[str, Any]
    dataset_info: Mapping[str, Any]
    partition_manifest: Mapping[str, Any]
    raw_validation_report: Mapping[str, Any] | None
    duplicate_report: Mapping[str, Any] | None
    partition_validation_report: Mapping[str, Any] | None
    synthetic_manifest: Mapping[str, Any] | None
    synthetic_validation_report: Mapping[str, Any] | None
    synthetic_quality: Mapping[str, Any] | None
    promotion_decision: Mapping[str, Any] | None
    parameters: Mapping[str, Any] | None
    audit: Mapping[str, Any]


@dataclass(frozen=True)
class AuditContext:
    """`run_tags` are MLflow's copy over the local `mlflow_run.json` tags when the tracking
    store is reachable, the local ones alone otherwise."""

    project_root: Path
    paths: Mapping[str, str]
    mlflow_view: Mapping[str, Any]
    local_tags: Mapping[str, str]
    run_tags: Mapping[str, str]
    synthetic_used: bool
    lock: Mapping[str, Any] | None

    @property
    def run_tags_source(self) -> str:
        return "mlflow" if self.mlflow_view.get("available") else "mlflow_run.json"
