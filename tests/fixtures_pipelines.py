"""Synthetic datasets, project parameters, throw-away projects and a real MLflow server
shared by the pipeline tests.

A helper module, not a test module (pytest collects only ``test_*.py``): the pipeline
tests of every stage build their data from the same small, imbalanced, MedMNIST-shaped set
and the shipped parameters, so a change to either shows up everywhere at once; the tracking
tests start `mlflow server` the same way whatever its backend store (SQLite, PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmic_pipeline.datasets.npz_dataset import save_npz_deterministic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 3
MLFLOW_SERVER_START_TIMEOUT_S = 90  # a cold start on a loaded 2-core machine takes 5-20 s

logger = logging.getLogger(__name__)


def synthetic_dataset(n_train: int = 500, n_val: int = 100, n_test: int = 60, size: int = 16, rgb: bool = False, seed: int = 0):
    """A small, imbalanced, MedMNIST-shaped `validated_dataset` and `dataset_info`."""
    rng = np.random.default_rng(seed)
    dataset = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.choice(N_CLASSES, size=n, p=[0.2, 0.3, 0.5]).astype(np.int64)
        shape = (n, size, size, 3) if rgb else (n, size, size)
        base = (40 + 60 * labels).reshape((n,) + (1,) * (len(shape) - 1))
        images = np.clip(base + rng.integers(0, 80, size=shape), 0, 255).astype(np.uint8)
        dataset[f"{split}_images"] = images
        dataset[f"{split}_labels"] = labels
        dataset[f"{split}_source_index"] = np.arange(n, dtype=np.int64)
    info = {
        "flag": "synthetic",
        "n_classes": N_CLASSES,
        "n_channels": 3 if rgb else 1,
        "label_names": {"0": "calm", "1": "mild", "2": "severe"},
    }
    return dataset, info


def project_params(**partition_overrides):
    """The shipped partition and device parameters with `partition` overrides."""
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_data_partition.yml").read_text())
    params["partition"].update(partition_overrides)
    return params


def training_params(**overrides):
    """The shipped training parameters, shrunk for tests: 2 rounds, half the clients, one thread,
    no checkpoints (a node called directly has no `discard_checkpoint` after it, and its
    relative checkpoint_dir would land in the repository's data/)."""
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_federated_training.yml").read_text())
    params["training"].update({"num_rounds": 2, "join_ratio": 0.5, "num_threads": 1, "checkpoint_every": 0, **overrides})
    params["algorithm_params"]["fedmic"].update({"teacher_model": "student_cnn"})
    params["algorithm_params"]["common"].update({"batch_size": 16})
    return params


def small_federation(num_clients: int = 10, **dataset_sizes):
    """An easy 3-class task split over ``num_clients`` hospitals in memory (no files):
    (client arrays, global test set, dataset_info with the 16 px size, partition manifest)."""
    from fedmic_pipeline.partitioning import partition_in_memory

    dataset, info = synthetic_dataset(**dataset_sizes)
    params = project_params(num_clients=num_clients, min_samples_per_client=15)
    clients, global_test, manifest = partition_in_memory(dataset, info, params["partition"], params["devices"])
    return clients, global_test, {**info, "size": 16}, manifest


def copy_project(tmp: Path) -> Path:
    """An empty Kedro project under ``tmp``: the repository's conf/ and pyproject.toml, no data."""
    project = tmp / "project"
    project.mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("credentials*", "local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # Kedro requires the folder; the package itself is the installed one
    return project


def make_project(tmp: Path) -> Path:
    """A throw-away Kedro project under ``tmp`` holding the synthetic dataset as its ingested
    data, ready for ``kedro run --pipelines data_partition``."""
    project = copy_project(tmp)
    params = project_params(min_samples_per_client=15)
    (project / "conf/base/parameters_data_partition.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    dataset, info = synthetic_dataset()
    save_npz_deterministic(project / "data/03_primary/dataset.npz", dataset)
    (project / "data/03_primary/dataset_info.json").write_text(json.dumps(info))
    return project


def write_partition(project: Path, clients: dict, global_test: dict, manifest: dict) -> None:
    """Client files, global test set and manifest where ``data_partition`` writes them."""
    for name, arrays in clients.items():
        save_npz_deterministic(project / f"data/05_model_input/clients/{name}.npz", arrays)
    save_npz_deterministic(project / "data/05_model_input/global_test.npz", global_test)
    (project / "data/05_model_input/partition_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_training_params(project: Path, params: dict) -> None:
    """Write ``params`` as the project's training parameters; record the 16 px image size."""
    (project / "conf/base/parameters_federated_training.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    info_path = project / "data/03_primary/dataset_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "size": 16}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A started `mlflow server` subprocess; `wait_healthy()` blocks until /health answers.

    Returned before the server is up, so a test can prepare its data during the start-up
    (5-20 s on a busy machine) and only then wait."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path, artifacts: Path, started: float) -> None:
        self.process, self.url, self.log, self.artifacts, self.started = process, url, log, artifacts, started
        self.startup_s: float | None = None

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + MLFLOW_SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode} before it was healthy:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - self.started
                        logger.info("mlflow server healthy %.1f s after its start", self.startup_s)
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server not healthy after {MLFLOW_SERVER_START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no server log)"


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(group: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _group_alive(group)


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group, SIGKILL to what lingers. The group, not
    just the `mlflow` process: it forks uvicorn, which forks one process per worker plus a
    resource tracker, and those finish their shutdown after `mlflow` itself has exited."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    if not _wait_group_gone(process.pid, timeout_s=15):
        logger.warning("mlflow server processes still running 15 s after SIGTERM: SIGKILL to group %d", process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        _wait_group_gone(process.pid, timeout_s=10)


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log: Path, workers: int = 1) -> Iterator[MlflowServer]:
    """`mlflow server` on a free loopback port with `backend_store_uri` and proxied artifacts
    in `artifacts`; stopped on exit, also when the test fails, and checked to leave no
    process of its group behind (uvicorn forks one per worker)."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts),
        "--workers", str(workers),
    ]  # fmt: skip
    # No background job runner (huey consumers): nothing here schedules server-side jobs,
    # and it halves the start-up time and the processes to stop.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield MlflowServer(process, f"http://127.0.0.1:{port}", log, artifacts, time.monotonic())
    finally:
        _stop_process_group(process)
    assert process.poll() is not None, "the mlflow server is still running"
    left = subprocess.run(["ps", "-o", "pid=", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"server processes left running: {left}"


def kedro_cli_in_child(project: str, args: list[str], log_path: str) -> None:
    """Target of a child process: ``kedro <args>`` (Kedro's own CLI entry point) in ``project``,
    its output appended to ``log_path``.

    The kill tests start these children from a warm forkserver (``multiprocessing``,
    modules preloaded once), so that each killed run costs its pipeline's work rather than
    the ~8 s of imports of a fresh ``kedro`` process; the run itself is the CLI's.
    """
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(project)
    from kedro.framework.cli import main

    sys.argv = ["kedro", *args]
    main()
