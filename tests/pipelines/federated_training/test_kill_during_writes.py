"""Kill tests: a real `kedro run` SIGKILLed while it writes the client partitions or the models
leaves the previous complete set in place, and a rerun ends with the outputs of an
uninterrupted run; at no observed moment does the destination hold a partial set.

Each run is Kedro's CLI (`kedro run --pipelines ...`) in a child process forked from a warm
forkserver (`fixtures_pipelines.kedro_cli_in_child`): a fresh `kedro` process spends ~8 s
importing, which would leave room for two kills in a minute. Before each kill the folder
holds a different complete set (another partition, other weights), so that a mix of old and
new files could not pass unnoticed. The kill moment is drawn at random within the stage's
write window (measured on the uninterrupted run: from the staging folder's appearance to
its swap), stratified so that the tries spread over the window and a little past it; the
child is stopped (SIGSTOP) to count what it had staged, then SIGKILLed. The staging folders
the kills leave stay until the rerun, which must clear them. Every poll of the destination
reads it through one directory handle, so each snapshot is of one folder.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedmic_pipeline.core.simulation import TIMING_KEYS
from fedmic_pipeline.datasets import AtomicPartitionedDataset
from fedmic_pipeline.datasets.atomic_partitioned_dataset import staging_folders
from fedmic_pipeline.partitioning import partition_in_memory
from fixtures_pipelines import kedro_cli_in_child, make_project, project_params, synthetic_dataset
from fixtures_pipelines import training_params, write_partition, write_training_params

TRIES_PER_STAGE = 3
RUN_TIMEOUT_S = 120
PRELOAD = [
    "fixtures_pipelines", "kedro.framework.cli", "kedro_mlflow.framework.hooks", "mlflow.store.tracking.sqlalchemy_store",
    "torch", "matplotlib.pyplot", "great_expectations", "fedmic_pipeline.pipeline_registry",
    *(f"fedmic_pipeline.pipelines.{name}.pipeline" for name in (
        "data_ingestion", "data_partition", "synthetic_generation", "federated_training", "evaluation", "compare",
        "ablation", "audit")),
]  # fmt: skip

Snapshot = dict[str, str] | None


def _snapshot(folder: Path) -> Snapshot:
    """{file name: sha1} of one folder inode (None when absent), re-read if swapped mid-read."""
    while True:
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        try:
            contents = {}
            for name in sorted(os.listdir(handle)):
                with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=handle)) as file:
                    contents[name] = hashlib.sha1(file.read()).hexdigest()
            return contents
        except FileNotFoundError:  # this inode held the old set, being deleted after the swap
            continue
        finally:
            os.close(handle)


@dataclass
class KillPoint:
    delay_ms: float
    staged_files: int  # partitions in the staging folder when the child was stopped; -1: already swapped
    outcome: str  # what the destination held after the kill


@dataclass
class Stage:
    """A stage under test: its `kedro` arguments, the folder it writes, and the two complete sets."""

    args: list[str]
    folder: Path
    new_set: Snapshot = None
    previous_set: Snapshot = None
    window_s: float = 0.0
    observed: list[Snapshot] = field(default_factory=list)


class Runner:
    """Starts `kedro` runs in children of one warm forkserver, watches and kills them."""

    def __init__(self, project: Path) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.project, self.log = project, project / "kedro_runs.log"

    def _start(self, args: list[str]) -> multiprocessing.Process:
        child = self.context.Process(target=kedro_cli_in_child, args=(str(self.project), args, str(self.log)))
        child.start()
        return child

    def _failed(self, what: str) -> str:
        return f"{what}:\n{self.log.read_text()[-4000:]}"

    def complete(self, args: list[str]) -> None:
        child = self._start(args)
        child.join(RUN_TIMEOUT_S)
        assert child.exitcode == 0, self._failed(f"`kedro {' '.join(args)}` exited with {child.exitcode}")

    def measure(self, stage: Stage) -> None:
        """An uninterrupted run: its output is the new set, its staging lifetime the window."""
        child, staged_at = self._start(stage.args), None
        while child.is_alive():
            staging = staging_folders(stage.folder)
            if staging and staged_at is None:
                staged_at = time.perf_counter()
            elif not staging and staged_at is not None and not stage.window_s:
                stage.window_s = time.perf_counter() - staged_at
            time.sleep(0.0002)
        assert child.exitcode == 0 and stage.window_s > 0, self._failed(f"reference run (window {stage.window_s})")
        stage.new_set = _snapshot(stage.folder)

    def kill_while_writing(self, stage: Stage, delay_s: float) -> KillPoint:
        """A run SIGKILLed `delay_s` after its staging folder appeared; the folder polled throughout.

        Staging folders left by earlier kills are not this run's: only a new one starts the clock.
        """
        left_before = set(staging_folders(stage.folder))

        def own_staging() -> list[Path]:
            return [path for path in staging_folders(stage.folder) if path not in left_before]

        child, started, staged_at = self._start(stage.args), time.perf_counter(), None
        while staged_at is None or time.perf_counter() - staged_at < delay_s:
            stage.observed.append(_snapshot(stage.folder))
            assert child.is_alive(), self._failed("the run ended before the kill")
            if staged_at is None and own_staging():
                staged_at = time.perf_counter()
            assert time.perf_counter() - started < RUN_TIMEOUT_S, f"no staging folder after {RUN_TIMEOUT_S} s"
            time.sleep(0.0002 if staged_at else 0.002)
        os.kill(child.pid, signal.SIGSTOP)  # frozen, to count what it had staged; then the crash itself
        swapped = _snapshot(stage.folder) == stage.new_set
        staged = -1 if swapped else sum(1 for path in own_staging() for file in path.iterdir() if not file.name.startswith("."))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        stage.observed.append(_snapshot(stage.folder))
        return KillPoint(round(delay_s * 1000, 1), staged, "new set" if stage.observed[-1] == stage.new_set else "previous set")


def _kill_then_rerun(runner: Runner, stage: Stage, previous: Path, rerun_args: list[str]) -> list[KillPoint]:
    """TRIES_PER_STAGE kills, each on a destination reset to the `previous` complete set; one rerun."""
    seed = random.SystemRandom().randrange(2**32)
    draw = random.Random(seed)
    stage.previous_set = _snapshot(previous)
    assert stage.previous_set != stage.new_set
    points = []
    for k in range(TRIES_PER_STAGE):  # strata of [0, 1.3 x window]: early, middle, late or just past the swap
        shutil.rmtree(stage.folder)
        shutil.copytree(previous, stage.folder)
        points.append(runner.kill_while_writing(stage, stage.window_s * 1.3 * (k + draw.random()) / TRIES_PER_STAGE))
    partial = [s for s in stage.observed if s not in (stage.previous_set, stage.new_set)]
    report = (
        f"{stage.folder.name}: window {stage.window_s * 1000:.0f} ms, seed {seed}, {len(stage.observed)} observations, "
        f"kills {points}"
    )
    print(report)
    assert not partial, f"{len(partial)} partial observations, e.g. {partial[0]}; {report}"
    runner.complete(rerun_args)
    assert _snapshot(stage.folder) == stage.new_set, report
    assert staging_folders(stage.folder) == [], "the rerun left a staging folder"
    return points


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("kill"))
    write_training_params(project, training_params(algorithm="fedavg", num_rounds=2, checkpoint_every=1))
    mlflow_config = project / "conf/base/mlflow.yml"
    config = yaml.safe_load(mlflow_config.read_text())
    config["server"]["mlflow_tracking_uri"] = f"sqlite:///{project / 'mlflow.db'}"  # this project's store, whatever the shell says
    config["tracking"]["disable_tracking"]["pipelines"].append("federated_training")  # files are the subject here, not MLflow
    mlflow_config.write_text(yaml.safe_dump(config, sort_keys=False))
    return project


@pytest.fixture(scope="module")
def runner(project) -> Runner:
    return Runner(project)


@pytest.mark.slow
def test_kill_while_writing_the_client_partitions(project, runner, tmp_path):
    stage = Stage(["run", "--pipelines", "data_partition"], project / "data/05_model_input/clients")
    runner.measure(stage)
    manifest = (project / "data/05_model_input/partition_manifest.json").read_bytes()
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15, seed=7)
    write_partition(tmp_path, *partition_in_memory(dataset, info, params["partition"], params["devices"]))
    points = _kill_then_rerun(runner, stage, tmp_path / "data/05_model_input/clients", stage.args)
    assert len(points) == TRIES_PER_STAGE and len(stage.new_set) == 10
    assert (project / "data/05_model_input/partition_manifest.json").read_bytes() == manifest


def _history(project: Path) -> pd.DataFrame:
    history = pd.read_csv(project / "data/07_model_output/training_history.csv")
    return history.drop(columns=[c for c in TIMING_KEYS if c in history.columns])


def _other_weights(folder: Path, into: Path) -> None:
    """The same models with every float tensor shifted: a complete set that is not the new one."""
    models = AtomicPartitionedDataset(path=str(folder), dataset="fedmic_pipeline.datasets.TorchModelDataset", filename_suffix=".pt")
    shifted = {}
    for key, load in models.load().items():
        record = load()
        shifted[key] = {**record, "state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in record["state_dict"].items()}}
    AtomicPartitionedDataset(path=str(into), dataset="fedmic_pipeline.datasets.TorchModelDataset", filename_suffix=".pt").save(shifted)


@pytest.mark.slow
def test_kill_while_writing_the_models(project, runner, tmp_path):
    if not (project / "data/05_model_input/partition_manifest.json").exists():
        runner.complete(["run", "--pipelines", "data_partition"])
    stage = Stage(["run", "--pipelines", "federated_training"], project / "data/06_models")
    runner.measure(stage)
    history, summary = _history(project), json.loads((project / "data/07_model_output/training_summary.json").read_text())
    _other_weights(stage.folder, tmp_path / "previous")

    points = _kill_then_rerun(runner, stage, tmp_path / "previous", [*stage.args, "--params", "training.resume=auto"])
    assert len(points) == TRIES_PER_STAGE and len(stage.new_set) == 12
    pd.testing.assert_frame_equal(_history(project), history)  # resumed from the checkpoint a kill left, or retrained
    rerun: dict = json.loads((project / "data/07_model_output/training_summary.json").read_text())
    for binding in ("model_sha256", "partition_manifest_sha256"):
        assert rerun[binding] == summary[binding], binding
    assert not list((project / "data/06_checkpoints").glob("*.pt"))
