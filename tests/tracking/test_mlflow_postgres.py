"""Tracking under load on a production database: `mlflow server` on PostgreSQL, several
training runs and promotions at once.

SQLite takes one writer at a time, so the embedded store and the SQLite server of
test_mlflow_server.py never see two writers race. A shared server on PostgreSQL does:
several trainings log metrics, register versions of the same model and move the same
aliases concurrently, over several server worker processes. Here six of them run in
spawned processes against a fresh database on 127.0.0.1:5432, released together twice by
barriers: once to start training (logging and registration overlap) and once to promote
(the registry decisions overlap). Everything is then read back once with a fresh client,
and each test checks one promise on that snapshot: nothing lost, nothing duplicated,
every alias on an eligible version of its own data, and the champions where the
promotion rule (tracking/registry.py) would put them had the decisions come one by one.

Needs a PostgreSQL server on 127.0.0.1:5432 that lets the user `postgres` in without a
password (trust auth) and create databases; without one every test here is skipped and
says so. The database is created for the module and dropped after it, the server stopped.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from fixtures_pipelines import mlflow_server

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SERVER_WORKERS = 2  # more than one server process: concurrent requests also race across processes
ROUNDS = 20
ROUND_METRICS = ("global_val_balanced_accuracy", "global_val_loss", "mean_client_val_accuracy")
MODEL_NAME = "loadtest-fedmic-global"
EXPERIMENT = "fedmic-postgres-load"
DECIDING_METRIC = "final.global.balanced_accuracy"
MAJORITY_BALANCED_ACCURACY = 0.5  # 1 / K for the 2-class tiny model
RULE = {"metric": DECIDING_METRIC, "min_improvement": 0.005, "must_beat_majority": True}
WORKER_TIMEOUT_S = 420


@dataclass(frozen=True)
class PlannedRun:
    """One concurrent 'training run' and the evaluation result it will log."""

    index: int
    data: tuple[str, str]  # (partition manifest sha256, dataset md5): the data version
    final_value: float
    constant_predictor: bool = False

    @property
    def eligible(self) -> bool:
        """Above the promotion floors, whatever the champion's value."""
        return not self.constant_predictor and self.final_value > MAJORITY_BALANCED_ACCURACY


DATA_A = ("a" * 64, "md5-of-raw-file")
DATA_B = ("b" * 64, "md5-of-raw-file")  # same raw file, another partition: another data version
#: Per data version: two comparable candidates (on B a tie, which the first promoted keeps) and
#: one the floors must refuse whatever its number (a constant predictor on A, below the
#: majority-class baseline on B).
PLAN = (
    PlannedRun(0, DATA_A, 0.71),
    PlannedRun(1, DATA_A, 0.78),
    PlannedRun(2, DATA_A, 0.93, constant_predictor=True),
    PlannedRun(3, DATA_B, 0.66),
    PlannedRun(4, DATA_B, 0.66),
    PlannedRun(5, DATA_B, 0.49),
)
DATA_VERSIONS = (DATA_A, DATA_B)


def round_value(run: PlannedRun, metric: str, step: int) -> float:
    """The value run `run` logs for `metric` at round `step`: distinct per run, metric and round,
    so a point written into the wrong run or twice is seen."""
    return round(0.001 * step + 0.0001 * run.index + 0.1 * ROUND_METRICS.index(metric), 6)


# ---------------------------------------------------------------------------------------
# One training run, in its own spawned process
# ---------------------------------------------------------------------------------------


def _tiny_record() -> dict[str, Any]:
    from fedmic_pipeline.core.models import build_model, model_record
    from fedmic_pipeline.core.protocol import DataSpec

    model = build_model("student_cnn", DataSpec(in_channels=1, num_classes=2, image_size=8), seed=0, widths=(4, 4, 4), feature_dim=8)
    return model_record(model)


def _train_register_promote(run: PlannedRun, url: str, promote_together: Any) -> dict[str, Any]:
    """What training then evaluation do to the tracking server for one run: lineage tags and
    per-round curves in an open run, the global model registered from inside it, then (run
    finished) the evaluation's `final.*` metrics and, together with the other runs, the
    promotion decision."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from fedmic_pipeline.tracking.mlflow_logging import register_global_model
    from fedmic_pipeline.tracking.registry import CONSTANT_METRIC, MAJORITY_METRIC, promote_from_tracking

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"load-{run.index}") as active:
        mlflow.set_tags({"partition.manifest_sha256": run.data[0], "dataset.md5": run.data[1], "load.index": str(run.index)})
        for step in range(1, ROUNDS + 1):
            mlflow.log_metrics({metric: round_value(run, metric, step) for metric in ROUND_METRICS}, step=step)
        registered = register_global_model(_tiny_record(), MODEL_NAME)
    run_id = active.info.run_id
    now = int(time.time() * 1000)
    evaluation = {
        DECIDING_METRIC: run.final_value,
        MAJORITY_METRIC: MAJORITY_BALANCED_ACCURACY,
        CONSTANT_METRIC: float(run.constant_predictor),
    }
    MlflowClient(url).log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in evaluation.items()])
    promote_together.wait(timeout=WORKER_TIMEOUT_S)
    decision = promote_from_tracking({"mlflow_run_id": run_id, "registered": registered}, {}, RULE, tracking_uri=url)
    return {"run_id": run_id, "version": str(registered["version"]), "decision": decision["decision"]}


def training_process(run: PlannedRun, url: str, start_together: Any, promote_together: Any, results: Any) -> None:
    """Entry point of a spawned process: waits for the others, then reports its outcome or its
    traceback (an exception must reach the test, not die with the process)."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import mlflow  # noqa: F401  (imported before the barrier: the runs start together, not staggered by imports)
        import torch

        torch.set_num_threads(1)
        start_together.wait(timeout=WORKER_TIMEOUT_S)
        started = time.monotonic()
        outcome = _train_register_promote(run, url, promote_together)
        results.put({"index": run.index, "elapsed_s": time.monotonic() - started, **outcome})
    except BaseException:
        for barrier in (start_together, promote_together):
            barrier.abort()  # the others must not wait for a process that never comes
        results.put({"index": run.index, "error": traceback.format_exc()})


def _run_all_at_once(url: str) -> list[dict[str, Any]]:
    """Every PLAN entry in its own spawned process (spawn, not fork: a forked copy of this
    process would share its MLflow and torch state), all released at the same moment."""
    context = multiprocessing.get_context("spawn")
    start_together, promote_together = context.Barrier(len(PLAN)), context.Barrier(len(PLAN))
    results = context.Queue()
    processes = [
        context.Process(target=training_process, args=(run, url, start_together, promote_together, results)) for run in PLAN
    ]
    for process in processes:
        process.start()
    outcomes = []
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while len(outcomes) < len(PLAN):
            try:
                outcomes.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"only {len(outcomes)} of {len(PLAN)} training processes reported within {WORKER_TIMEOUT_S} s")
        for process in processes:
            process.join(timeout=30)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return sorted(outcomes, key=lambda outcome: outcome["index"])


# ---------------------------------------------------------------------------------------
# Fixtures: a throw-away database, a server on it, the load and its read-back
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_database():
    """A fresh database `fedmic_test_<random>` on 127.0.0.1:5432, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (requirements.lock) is not installed")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **POSTGRES)
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL reachable as user postgres on {POSTGRES['host']}:{POSTGRES['port']} (trust auth): {error}".strip())
    admin.autocommit = True
    name = f"fedmic_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def postgres_tracking_server(postgres_database, tmp_path_factory):
    # `postgresql://` alone means psycopg 3 to SQLAlchemy 2.1; the locked driver is psycopg2.
    uri = f"postgresql+psycopg2://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{postgres_database}"
    folder = tmp_path_factory.mktemp("mlflow-postgres")
    with mlflow_server(uri, folder / "artifacts", folder / "mlflow-server.log", workers=SERVER_WORKERS) as server:
        yield server


@dataclass
class ReadBack:
    """What a fresh client finds on the server after the load, beside what the processes said."""

    outcomes: dict[int, dict[str, Any]]
    server_log: str
    run_indices_by_experiment: dict[str, list[str]]
    runs: dict[int, Any]  # load.index -> Run, in the load experiment
    histories: dict[tuple[int, str], list[Any]]
    versions: list[Any]
    version_tags: dict[str, dict[str, str]]
    aliases: dict[str, str]
    figures: dict[str, Any] = field(default_factory=dict)

    def version_of(self, index: int) -> str:
        return self.outcomes[index]["version"]

    def decision_of(self, index: int) -> str:
        return self.version_tags[self.version_of(index)].get("promotion.decision", "missing")


@pytest.fixture(scope="module")
def load(postgres_tracking_server) -> ReadBack:
    """Runs the six concurrent trainings once for the module and reads the server back."""
    from mlflow.tracking import MlflowClient

    server = postgres_tracking_server
    started = time.monotonic()
    server.wait_healthy()
    # Created before the runs, as it is after the first training on a server. Left to the
    # concurrent `mlflow.set_experiment` calls, MLflow 3.17.2 loses the creation race
    # silently: the losers' runs land in the Default experiment (fluent.set_experiment
    # returns on RESOURCE_ALREADY_EXISTS without making the experiment active).
    MlflowClient(server.url).create_experiment(EXPERIMENT)
    load_started = time.monotonic()
    outcomes = {o["index"]: o for o in _run_all_at_once(server.url)}
    load_s = time.monotonic() - load_started

    client = MlflowClient(server.url)  # fresh: nothing cached from the writers
    experiments = client.search_experiments()
    runs_by_experiment = {e.name: client.search_runs([e.experiment_id], max_results=1000) for e in experiments}
    load_runs = runs_by_experiment.get(EXPERIMENT, [])
    runs = {int(r.data.tags["load.index"]): r for r in load_runs if "load.index" in r.data.tags}
    histories = {
        (index, metric): client.get_metric_history(run.info.run_id, metric)
        for index, run in runs.items()
        for metric in (*ROUND_METRICS, DECIDING_METRIC)
    }
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'", max_results=1000)
    read = ReadBack(
        outcomes=outcomes,
        server_log=server.log_tail(),
        run_indices_by_experiment={name: sorted(r.data.tags.get("load.index", "?") for r in rs) for name, rs in runs_by_experiment.items()},
        runs=runs,
        histories=histories,
        versions=versions,
        version_tags={str(v.version): client.get_model_version(MODEL_NAME, str(v.version)).tags for v in versions},
        aliases={str(a): str(v) for a, v in (client.get_registered_model(MODEL_NAME).aliases.items() if versions else {})},
    )
    elapsed = [o["elapsed_s"] for o in outcomes.values() if "elapsed_s" in o]
    read.figures = {
        "runs": len(load_runs),
        "metric_points": sum(len(points) for points in histories.values()),
        "registered_versions": len(versions),
        "aliases": read.aliases,
        "decisions": {i: o.get("decision", "error") for i, o in outcomes.items()},
        "errors": sum("error" in o for o in outcomes.values()),
        "server_workers": SERVER_WORKERS,
        "server_start_s": round(server.startup_s or 0.0, 1),
        "load_s": round(load_s, 1),
        "per_run_s": (round(min(elapsed), 1), round(max(elapsed), 1)) if elapsed else None,
        "total_s": round(time.monotonic() - started, 1),
    }
    logger.info("PostgreSQL load test: %s", read.figures)
    print(f"\nPostgreSQL load test: {read.figures}")
    return read


# ---------------------------------------------------------------------------------------
# The promises, each checked on the same snapshot
# ---------------------------------------------------------------------------------------


def test_every_training_process_finishes_without_error(load):
    errors = {i: o["error"] for i, o in load.outcomes.items() if "error" in o}
    assert sorted(load.outcomes) == [run.index for run in PLAN]
    assert not errors, "\n".join(f"--- run {i}\n{e}" for i, e in errors.items()) + f"\n--- server log\n{load.server_log}"


def test_every_run_and_metric_point_arrives_exactly_once(load):
    assert load.run_indices_by_experiment.get(EXPERIMENT) == [str(run.index) for run in PLAN], (
        f"a run is missing, doubled or in another experiment: {load.run_indices_by_experiment}"
    )
    for planned in PLAN:
        run = load.runs[planned.index]
        assert run.info.run_id == load.outcomes[planned.index]["run_id"]
        assert run.info.status == "FINISHED", (planned.index, run.info.status)
        assert (run.data.tags["partition.manifest_sha256"], run.data.tags["dataset.md5"]) == planned.data
        for metric in ROUND_METRICS:
            history = load.histories[planned.index, metric]
            steps = sorted(point.step for point in history)
            assert steps == list(range(1, ROUNDS + 1)), f"run {planned.index} {metric}: steps {steps} (lost or duplicated points)"
            foreign = [(p.step, p.value) for p in history if p.value != round_value(planned, metric, p.step)]
            assert not foreign, f"run {planned.index} {metric}: values of another run or round {foreign}"
        assert [p.value for p in load.histories[planned.index, DECIDING_METRIC]] == [planned.final_value]
    assert load.figures["metric_points"] == len(PLAN) * (len(ROUND_METRICS) * ROUNDS + 1)


def test_every_model_version_and_promotion_decision_arrives_exactly_once(load):
    assert sorted(int(v.version) for v in load.versions) == list(range(1, len(PLAN) + 1)), "a version is missing or doubled"
    run_of_version = {str(v.version): v.run_id for v in load.versions}
    assert sorted(load.version_of(run.index) for run in PLAN) == sorted(run_of_version), "two runs got the same version"
    for planned in PLAN:
        assert run_of_version[load.version_of(planned.index)] == load.outcomes[planned.index]["run_id"], f"run {planned.index}"
        assert load.decision_of(planned.index) == load.outcomes[planned.index]["decision"], f"run {planned.index}: decision lost"
    refused = {run.index: load.decision_of(run.index) for run in PLAN if not run.eligible}
    assert set(refused.values()) == {"not_promoted"}, f"a run below the floors was promoted: {refused}"


def test_aliases_point_only_at_promoted_eligible_versions_of_their_own_data(load):
    """What holds however the concurrent decisions interleave: no alias is lost, and none
    names a refused version or one of another data version."""
    from fedmic_pipeline.tracking.registry import DataVersion, PromotionRule

    rule = PromotionRule.from_params(RULE)
    data_aliases = {rule.data_alias(DataVersion(*data).key): data for data in DATA_VERSIONS}
    assert set(load.aliases) == {rule.alias, *data_aliases}, f"aliases {load.aliases}"
    planned_of_version = {load.version_of(run.index): run for run in PLAN}
    for alias, data in data_aliases.items():
        holder = planned_of_version[load.aliases[alias]]
        assert holder.data == data and holder.eligible, f"{alias} -> run {holder}"
        assert load.decision_of(holder.index) == "promoted", f"{alias} -> a version whose own decision is not 'promoted'"
    champion = planned_of_version[load.aliases[rule.alias]]
    assert champion.eligible and load.decision_of(champion.index) == "promoted", f"'{rule.alias}' -> run {champion}"


def _assert_one_by_one_outcome(load: ReadBack) -> None:
    from fedmic_pipeline.tracking.registry import DataVersion, PromotionRule

    rule = PromotionRule.from_params(RULE)
    data_champions = {}
    for data in DATA_VERSIONS:
        candidates = {run.index: run for run in PLAN if run.data == data}
        decisions = {
            i: {k: load.version_tags[load.version_of(i)].get(f"promotion.{k}") for k in ("decision", "compared", "reason")}
            for i in candidates
        }
        promoted = [i for i, d in decisions.items() if d["decision"] == "promoted"]
        first_champions = Counter(decisions[i]["compared"] for i in promoted)["False"]
        assert first_champions == 1, f"{first_champions} versions each became the first champion of one data version: {decisions}"
        best = max(run.final_value for run in candidates.values() if run.eligible)
        expected = {load.version_of(i) for i in promoted if math.isclose(candidates[i].final_value, best)}
        alias = rule.data_alias(DataVersion(*data).key)
        assert load.aliases.get(alias) in expected, f"{alias} -> {load.aliases.get(alias)}, expected one of {sorted(expected)}: {decisions}"
        data_champions[alias] = load.aliases[alias]
    champion = load.aliases.get(rule.alias)
    assert champion in data_champions.values(), f"'{rule.alias}' -> {champion}, not a data version's champion {data_champions}"


def test_champions_are_where_one_by_one_decisions_would_put_them(load):
    """The rule's outcome had the decisions come one after another: per data version exactly
    one 'first champion' decision, every later promotion compared with an earlier champion,
    the alias on the best eligible value (on a tie the first promoted keeps it, a tie being no
    improvement), and `champion` on one of the data versions' champions.

    Promotions of one registered model run under the registry's promotion lock, so this
    holds even though the six promoters start together on a two-worker server."""
    _assert_one_by_one_outcome(load)
