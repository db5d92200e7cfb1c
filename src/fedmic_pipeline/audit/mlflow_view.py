"""The audited run as the MLflow tracking store holds it, read within a bounded time.

The store is the authoritative copy of the run's parameters, tags and registered model
version. An audit may run where the server is unreachable, so a read degrades to
`{"available": False, "error": ...}` within seconds instead of raising or retrying.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _bounded_mlflow_requests(timeout_s: float) -> Iterator[None]:
    """No retries and a short timeout, so an unreachable server costs seconds, not minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(timeout_s)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as kedro-mlflow logs them (`a.b.c`, lists kept whole)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty block logs nothing, as in kedro-mlflow
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def read_mlflow(training_tracking: Mapping[str, Any], timeout_s: float = 10) -> dict[str, Any]:
    """The run (params, tags, final metrics) and its registered version, or why they are unavailable."""
    run_id = training_tracking.get("mlflow_run_id")
    if not run_id:
        return {"available": False, "error": "mlflow_run.json holds no run id: the training run was not tracked"}
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = training_tracking.get("tracking_uri") or mlflow.get_tracking_uri()
    try:
        with _bounded_mlflow_requests(timeout_s):
            client = MlflowClient(uri)
            run = client.get_run(run_id)
            experiment = client.get_experiment(run.info.experiment_id)
            out: dict[str, Any] = {
                "available": True,
                "tracking_uri": uri,
                "run": {
                    "run_id": run_id,
                    "run_name": run.info.run_name,
                    "experiment": experiment.name if experiment else run.info.experiment_id,
                    "status": run.info.status,
                    "user": run.info.user_id,
                    "start_time": _ms_to_iso(run.info.start_time),
                    "end_time": _ms_to_iso(run.info.end_time),
                    "artifact_uri": run.info.artifact_uri,
                },
                "params": dict(sorted(run.data.params.items())),
                "tags": dict(sorted(run.data.tags.items())),
                "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("final.", "total."))},
                "registry": None,
            }
            registered = training_tracking.get("registered") or {}
            name, version = registered.get("registered_model"), registered.get("version")
            if name and version not in (None, ""):
                model = client.get_registered_model(name)
                model_version = client.get_model_version(name, str(version))
                out["registry"] = {
                    "name": name,
                    "version": str(model_version.version),
                    "status": model_version.status,
                    "run_id": model_version.run_id,
                    "source": model_version.source,
                    "created": _ms_to_iso(model_version.creation_timestamp),
                    "aliases_of_this_version": sorted(model_version.aliases or []),
                    "aliases_of_model": {str(k): str(v) for k, v in sorted((model.aliases or {}).items())},
                    "version_tags": dict(sorted((model_version.tags or {}).items())),
                }
            return out
    except Exception as error:  # noqa: BLE001 - an unreachable server is a finding, not a crash
        logger.warning("MLflow run %s is unavailable at %s: %s", run_id, uri, error)
        return {"available": False, "tracking_uri": uri, "error": f"{type(error).__name__}: {str(error)[:400]}"}


def _ms_to_iso(ms: int | None) -> str | None:
    return None if not ms else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
