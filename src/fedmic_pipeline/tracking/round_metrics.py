"""Per-round MLflow metrics as a round-engine callback (the Flower ServerApp's run log).

The metric names and steps are the in-process pipeline's (``step`` = the 1-based round, as
``run_records.history_table`` logs them), so a Flower run and a Kedro run of the same method
plot on the same axes. Without a tracking URI every method is a no-op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmic_pipeline.core.engine import Callback, EngineState, RoundEngine

__all__ = ["ROUND_METRICS", "MlflowRoundLogger"]

logger = logging.getLogger(__name__)

#: Record keys logged every round (None values are skipped).
ROUND_METRICS = (
    "bytes_up_total", "bytes_down_total", "bytes_dense_total", "bytes_dense_per_client", "train_loss",
    "train_accuracy", "lr", "global_val_accuracy", "global_val_balanced_accuracy", "personalized_val_accuracy",
    "personalized_val_balanced_accuracy", "train_time_s", "eval_time_s", "round_time_s", "samples_per_s",
    "wire_bytes_up_total", "wire_bytes_down_total", "wire_bytes_eval_total", "num_failed",
)  # fmt: skip


class MlflowRoundLogger(Callback):
    """Starts an MLflow run, logs every round's record, ends the run with the totals."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self._mlflow: Any = None
        self.run_id: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        if not self.uri:
            logger.info("MLflow logging is off (mlflow-tracking-uri = none).")
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        logger.info("MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment, self.uri)

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        if self._mlflow is None:
            return
        metrics = {k: float(record[k]) for k in ROUND_METRICS if record.get(k) is not None}
        metrics["num_sampled"] = float(len(record["sampled"]))
        privacy = state.server_state.get("privacy") if isinstance(state.server_state, dict) else None
        if privacy and math.isfinite(privacy["epsilon"]):  # the DP budget spent so far (core/privacy.py)
            metrics["dp.epsilon"] = float(privacy["epsilon"])
        self._mlflow.log_metrics(metrics, step=int(record["round"]) + 1)

    def finish(self, totals: Mapping[str, Any], status: str, artifacts: Iterable[Path] = ()) -> None:
        """Log ``total/<key>`` for every numeric total, the artifacts, and end the run."""
        if self._mlflow is None:
            return
        numeric = {f"total/{k}": float(v) for k, v in totals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._mlflow.log_metrics(numeric)
        for path in artifacts:
            if path.is_file():
                self._mlflow.log_artifact(str(path))
        self._mlflow.end_run(status=status)
