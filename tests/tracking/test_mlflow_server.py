"""The pipeline against a real MLflow tracking server (a subprocess on a free loopback port).

What differs from the embedded SQLite store: every call goes over HTTP, artifacts (models,
figures) are uploaded through the server's artifact proxy (`--artifacts-destination`), and
the registry aliases are set remotely. The server is always stopped, also when the test fails.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from fixtures_pipelines import make_project, mlflow_server, small_federation, training_params, write_partition

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)


@pytest.fixture
def tracking_server(tmp_path):
    """Starts the server on SQLite and returns at once (the test prepares its data meanwhile)."""
    server = tmp_path / "server"
    server.mkdir()
    with mlflow_server(f"sqlite:///{server / 'mlflow.db'}", server / "artifacts", tmp_path / "mlflow-server.log") as started:
        yield started


def _write_partition(project: Path) -> None:
    """The tiny partition as data_partition writes it (same nodes, same dataset classes),
    without the pipeline's Great Expectations gate: that is tested elsewhere, and here the
    seconds go to the tracking server."""
    clients, global_test, info, manifest = small_federation(num_clients=4)  # 4 personalized models to upload
    write_partition(project, clients, global_test, manifest)
    (project / "data/03_primary/dataset_info.json").write_text(json.dumps(info))


def test_training_and_evaluation_log_run_model_and_champion_over_http(project_root, tmp_path, monkeypatch, tracking_server):
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    url = tracking_server.url
    project = make_project(tmp_path)
    _write_partition(project)
    params = training_params(algorithm="fedavg", checkpoint_every=0)
    params["evaluation"]["n_bootstrap"] = 20
    (project / "conf/base/parameters_federated_training.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    previous_uri = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(project)
    bootstrap_project(project)
    tracking_server.wait_healthy()

    pipeline_started = time.monotonic()
    try:
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=["federated_training", "evaluation"])
    finally:
        while mlflow.active_run():  # kedro-mlflow's hook is a process-wide singleton
            mlflow.end_run()
        mlflow.set_tracking_uri(previous_uri)
    pipeline_s = time.monotonic() - pipeline_started
    logger.info(
        "server start %.1f s (overlapping the data preparation); training + evaluation against it %.1f s; total %.1f s",
        tracking_server.startup_s, pipeline_s, time.monotonic() - started,
    )  # fmt: skip

    tracking = json.loads((project / "data/07_model_output/mlflow_run.json").read_text())
    assert tracking["tracking_uri"] == url
    client = MlflowClient(url)  # everything below is read back over HTTP
    run = client.get_run(tracking["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.algorithm"] == "fedavg"
    assert "partition.manifest_sha256" in run.data.tags and "git_commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global_val_balanced_accuracy")] == [1, 2]
    assert "final.global.balanced_accuracy" in run.data.metrics
    # artifacts went through the server's proxy into --artifacts-destination
    assert len(client.list_artifacts(run.info.run_id, "personalized_models")) == 4
    assert {"training_curves.png", "site_and_device_accuracy.png"} <= {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")
    }
    assert any(tracking_server.artifacts.rglob("*.pt"))
    # the registered global model and the champion alias set by promote_champion
    name, version = tracking["registered"]["registered_model"], str(tracking["registered"]["version"])
    model_version = client.get_model_version(name, version)
    assert model_version.run_id == run.info.run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    assert model_version.tags["promotion.decision"] == "promoted"
    decision = json.loads((project / "data/08_reporting/evaluation/promotion_decision.json").read_text())
    assert decision["decision"] == "promoted" and decision["champion_version"] == version
