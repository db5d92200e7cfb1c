"""The pipeline against a real MLflow tracking server (a subprocess on a free loopback port).

What differs from the embedded SQLite store: every call goes over HTTP, artifacts (models,
figures) are uploaded through the server's artifact proxy (`--artifacts-destination`), and
the registry aliases are set remotely. The server is always stopped, also when the test fails.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fixtures_pipelines import make_project, small_federation, training_params, write_partition

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 90  # a cold start on a loaded 2-core machine takes 5-20 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode} before it was healthy:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it forks workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


class Server:
    """A started `mlflow server`; `wait_healthy()` blocks until /health answers."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path, artifacts: Path, started: float) -> None:
        self.process, self.url, self.log, self.artifacts, self.started = process, url, log, artifacts, started
        self.startup_s: float | None = None

    def wait_healthy(self) -> None:
        _wait_healthy(self.url, self.process, self.log)
        self.startup_s = time.monotonic() - self.started
        logger.info("mlflow server healthy %.1f s after its start", self.startup_s)


@pytest.fixture
def tracking_server(tmp_path):
    """Starts the server and returns at once (the test prepares its data meanwhile)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-server.log"
    (tmp_path / "server").mkdir()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "server" / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    # No background job runner (huey consumers): nothing here schedules server-side jobs,
    # and it halves the start-up time and the processes to stop.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield Server(process, url, log, tmp_path / "server" / "artifacts", time.monotonic())
    finally:
        _stop(process)
    assert process.poll() is not None, "the mlflow server is still running"
    left = subprocess.run(["ps", "-o", "pid=", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"server processes left running: {left}"


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
