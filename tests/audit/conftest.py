"""The finished tiny run the audit tests read: one real Kedro project in a temp folder runs
ingestion (a fake MedMNIST release, md5 registered in medmnist.INFO), partition, training,
evaluation (with champion promotion) against a temp SQLite MLflow store, then `audit`.

Module-scoped: each test module that asks for `finished_run` gets its own project, so a test
that edits files of the run (then restores them) cannot disturb another module's tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures_medmnist import fake_arrays, make_project_copy, register_release, write_release

FLAG = "pneumoniamnist"


def _kedro(project: Path, pipelines: list[str]) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    try:
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=pipelines)
    finally:
        _end_active_runs()


def _end_active_runs() -> None:
    """kedro-mlflow's hook is a process-wide singleton that can leave a run active between
    sessions of one process (a CLI `kedro run` is one process per run); end it so the next
    session starts clean."""
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def _edit_params(project: Path, filename: str, edit) -> None:
    path = project / "conf/base" / filename
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _small_config(project: Path) -> None:
    """4 hospitals, 2 FedAvg rounds, 50 bootstrap resamples: seconds, not minutes."""

    def partition(p):
        p["partition"].update({"num_clients": 4, "min_samples_per_client": 20})

    def training(p):
        p["training"].update({"algorithm": "fedavg", "num_rounds": 2, "join_ratio": 0.5, "num_threads": 1,
                              "checkpoint_every": 0})  # fmt: skip
        p["algorithm_params"]["common"].update({"batch_size": 32})
        p["evaluation"]["n_bootstrap"] = 50

    def ingestion(p):
        p["dataset"].update({"name": FLAG, "download": False})

    _edit_params(project, "parameters_data_partition.yml", partition)
    _edit_params(project, "parameters_federated_training.yml", training)
    _edit_params(project, "parameters_data_ingestion.yml", ingestion)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A project after ingestion -> partition -> training -> evaluation -> audit, all real."""
    import mlflow

    tmp = tmp_path_factory.mktemp("audit")
    project = make_project_copy(tmp / "project")
    _small_config(project)
    arrays = fake_arrays(FLAG, split_sizes={"train": 320, "val": 80, "test": 60})
    release = write_release(project / "data/01_raw", FLAG, arrays)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        register_release(mp, FLAG, release, arrays)
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.chdir(project)
        _kedro(project, ["data_ingestion", "data_partition", "federated_training", "evaluation"])
        _kedro(project, ["audit"])
    mlflow.set_tracking_uri(previous_uri)
    yield {"project": project, "tracking_uri": tracking_uri}
