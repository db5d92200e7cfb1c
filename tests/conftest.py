"""Shared test setup: no telemetry, one torch thread, project root as working directory."""

import os
from pathlib import Path

import pytest

from fedmic_pipeline.telemetry import switch_off_telemetry

switch_off_telemetry()
for _name, _value in {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_name, _value)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tests share two cores; one intra-op thread keeps parallel work from thrashing."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


def _end_mlflow_runs() -> None:
    import sys

    if "mlflow" not in sys.modules:
        return
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    hooks = sys.modules.get("kedro_mlflow.framework.hooks.mlflow_hook")
    if hooks is not None:
        # kedro-mlflow's hook is a process-wide singleton that keeps the last run id; a later
        # session whose pipeline has tracking disabled would reopen that run in another store.
        hooks.mlflow_hook.run_id = None


@pytest.fixture(autouse=True)
def _no_mlflow_run_leaks_between_tests():
    """kedro-mlflow can leave its run active (and its run id remembered) after an in-process
    session; a later session in the same worker process would then log into it. Each test
    starts and ends with no active run."""
    _end_mlflow_runs()
    yield
    _end_mlflow_runs()
