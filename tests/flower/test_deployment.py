"""The Flower transport against the in-process runner, on a real loopback deployment.

Fast tests (no processes): payload <-> ArrayRecord round trips through Flower's own
object serialization (FedMIC SVD factors with ``::`` keys, empty (m, 0) factors, 0-d
scalars, float16/int64/bool), and the client's private state in ``context.state``.

Slow tests (``-m slow``): one real ``flower-superlink`` and two ``flower-supernode``
processes on 127.0.0.1 serve a tiny two-hospital partition written in the partition file
format, secured as the launcher secures it by default: TLS with a private CA, SuperNode
authentication with registered keys, and each node running only the app its site
approved (``site_supernode``); every run below therefore also proves that set-up works. Two rounds of FedMIC (thin ResNet-18 teacher) and of FedAvg must end with the
same global student as ``core.simulation.run_simulation`` for the same seed (allclose
1e-5; in practice bit-identical), with the same core byte counts, and with serialized
Flower messages within the stated framing bound of them. A SuperNode killed with SIGKILL
mid-run is reported by node and partition while the run continues; one stopped with
SIGTERM under ``on-node-failure = stop`` ends the run with a clear error. Afterwards no
process of the deployment may be left (checked with psutil).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.codec import encode_update
from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import DataSpec, payload_nbytes
from fedmic_pipeline.core.simulation import SimulationConfig, SimulationResult, run_simulation
from fedmic_pipeline.datasets.npz_dataset import save_npz_deterministic
from fedmic_pipeline.flower import task
from fedmic_pipeline.flower.client_app import OUTGOING_LOG_KEY
from fedmic_pipeline.flower.records import (
    PrivateStateMismatch,
    load_private_state,
    payload_to_record,
    record_to_payload,
    store_private_state,
    wire_nbytes,
)

SEED = 7
ROUNDS = 2
TINY_STUDENT = {"model_options": {"widths": [8, 16, 32], "feature_dim": 32}, "batch_size": 8, "lr": 0.05}
FEDMIC_PARAMS = {**TINY_STUDENT, "teacher_model": "resnet18", "teacher_width": 0.125, "error_feedback": True}
FEDAVG_PARAMS = dict(TINY_STUDENT)
#: Flower's per-Array framing: the Array object (JSON dtype/shape + child id), its chunk's
#: .npy header and object header, the ArrayRecord entry (key + 64-hex object id) and the
#: protobuf framing of two object transfers -- measured ~600 B; 700 B leaves margin.
WIRE_PER_ARRAY = 700
#: The ArrayRecord object itself.
WIRE_PER_RECORD = 1024
#: Message metadata, the ConfigRecord (train) or MetricRecord (reply, FedMIC's codec stats).
WIRE_MESSAGE_EXTRA = 8192
ROUND_TIMEOUT_KILL = 20.0


# -- a tiny partition in the partition file format ----------------------------------------
def _easy_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 60, size=(labels.shape[0], 28, 28), dtype=np.int64)
    for i, k in enumerate(labels):
        r, c = divmod(int(k) % 4, 2)
        images[i, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = rng.integers(150, 256, size=(14, 14))
    return images.astype(np.uint8)


def write_tiny_partition(root: Path) -> Path:
    """Two hospitals (24 and 26 train images, 3 classes, label skew), a global test set and
    a manifest, laid out like ``data/05_model_input``."""
    for cid, counts in enumerate([(14, 6, 4), (4, 12, 10)]):
        rng = np.random.default_rng(100 + cid)
        arrays: dict[str, np.ndarray] = {"device": np.array(cid, dtype=np.int64)}
        for split, scale in (("train", 1.0), ("val", 0.34), ("test", 0.34)):
            labels = np.concatenate([np.full(max(1, round(c * scale)), k) for k, c in enumerate(counts)])
            labels = rng.permutation(labels).astype(np.int64)
            arrays[f"{split}_images"] = _easy_images(labels, rng)
            arrays[f"{split}_labels"] = labels
        save_npz_deterministic(root / "clients" / f"client_{cid:02d}.npz", arrays)
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 10).astype(np.int64)
    save_npz_deterministic(root / "global_test.npz", {"images": _easy_images(labels, rng), "labels": labels})
    (root / "partition_manifest.json").write_text(json.dumps({"dataset": {"n_channels": 1, "n_classes": 3}}))
    return root


# -- fast: records ------------------------------------------------------------------------------
def _roundtrip_through_flower(record: Any) -> Any:
    """Deflate every object as Flower would send it and inflate it back."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    content = RecordDict({"payload": record})
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, contents)["payload"]


def test_payload_record_round_trip_is_lossless() -> None:
    spec = DataSpec(in_channels=1, num_classes=3)
    model = build_model("student_cnn", spec, seed=1, **TINY_STUDENT["model_options"])
    delta = {k: 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in model.state_dict().items() if v.is_floating_point()}
    svd, _ = encode_update(delta, energy=0.9)
    svd16, _ = encode_update(delta, energy=0.9, fp16_factors=True)
    payload = {
        **svd,
        **{f"fp16/{k}": v for k, v in svd16.items()},
        "empty::U": torch.zeros(5, 0),
        "empty::V": torch.zeros(7, 0),
        "__meta__::version": torch.tensor(3, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "channels_last": model.state_dict()["body.0.weight"].to(memory_format=torch.channels_last),
    }
    assert any("::" in k for k in svd), "the codec produced no factored entry to test"
    back = record_to_payload(_roundtrip_through_flower(payload_to_record(payload)))
    assert list(back) == list(payload)
    for key, tensor in payload.items():
        assert back[key].dtype == tensor.dtype, key
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    assert payload_nbytes(back) == payload_nbytes(payload)


def test_payload_record_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        payload_to_record({"w": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        payload_to_record({"w": np.zeros(2)})  # type: ignore[dict-item]


def test_wire_size_counts_framing_per_array() -> None:
    from flwr.app import RecordDict

    payload = {f"layer{i}.weight::U": torch.randn(50) for i in range(20)}
    record = payload_to_record(payload)
    overhead = int(wire_nbytes(RecordDict({"p": record}))) - payload_nbytes(payload)
    assert 0 < overhead <= WIRE_PER_ARRAY * len(payload) + WIRE_PER_RECORD + 512


def test_private_state_survives_context_state(tmp_path: Path) -> None:
    from flwr.app import RecordDict

    data_dir = write_tiny_partition(tmp_path)
    spec = task.load_data_spec(data_dir)
    algorithm = build_algorithm("fedmic", FEDMIC_PARAMS, spec)
    data = task.load_client_data(data_dir, 0)
    state = algorithm.init_client(0, data, SEED)
    recorddict = RecordDict()
    store_private_state(recorddict, state, run_id=11, partition_id=0, algorithm="fedmic")
    restored = load_private_state(recorddict, run_id=11, partition_id=0, algorithm="fedmic")
    for (k, a), b in zip(state["teacher"].state_dict().items(), restored["teacher"].state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    teacher_params = {id(p) for p in restored["teacher"].parameters()}
    opt_params = {id(p) for g in restored["teacher_optimizer"].param_groups for p in g["params"]}
    assert teacher_params <= opt_params, "the optimizer must still update the restored teacher"
    with pytest.raises(PrivateStateMismatch, match="partition"):
        load_private_state(recorddict, run_id=11, partition_id=1, algorithm="fedmic")


def _incoming(message_type: str, content: dict[str, Any], run_id: int = 5) -> Any:
    """A message as a SuperNode hands it to the ClientApp (metadata set by the SuperLink)."""
    from flwr.app import Message, Metadata, RecordDict

    metadata = Metadata(
        run_id=run_id, message_id=f"m-{time.monotonic_ns()}", src_node_id=1, dst_node_id=2, reply_to_message_id="",
        group_id="0", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip
    return Message(content=RecordDict(content), metadata=metadata)


@pytest.mark.parametrize("algorithm", ["fedmic", "fedavg"])
def test_client_handlers_run_the_core_and_keep_state_on_the_node(algorithm: str, tmp_path: Path) -> None:
    """The ClientApp's train/evaluate handlers, called as a SuperNode calls them, give the
    core's own results, and the private state survives between messages in context.state."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedmic_pipeline.core.evaluation import accuracy_of
    from fedmic_pipeline.core.protocol import RoundContext
    from fedmic_pipeline.core.selection import balanced_accuracy_from_counts, validation_counts
    from fedmic_pipeline.flower import client_app
    from fedmic_pipeline.flower.server_app import global_model_record, message_config

    data_dir = write_tiny_partition(tmp_path)
    params = FEDMIC_PARAMS if algorithm == "fedmic" else FEDAVG_PARAMS
    cfg = task.ServerRunConfig.from_run_config(
        {"algorithm": algorithm, "algorithm-params": json.dumps(params), "params-file": "", "num-rounds": 2, "seed": SEED,
         "device": "cpu"},
        root=tmp_path,
    )  # fmt: skip
    spec = task.load_data_spec(data_dir)
    server = build_algorithm(algorithm, params, spec)
    server_state, payload = server.init_server(SEED)
    core = build_algorithm(algorithm, params, spec)  # the in-process twin of the node
    data = task.load_client_data(data_dir, 1)
    core_state = core.init_client(1, data, SEED)
    context = Context(
        run_id=5, node_id=2, node_config={"partition-id": 1, "num-partitions": 2, "data-dir": str(data_dir)},
        state=RecordDict(), run_config={},
    )  # fmt: skip
    for rnd in range(2):
        ctx = RoundContext(
            round=rnd, num_rounds=2, seed=SEED, device=torch.device("cpu"), sampled=(0, 1), num_clients=2,
            total_train_samples=50,
        )  # fmt: skip
        config = message_config(cfg, spec, ctx)
        reply = client_app.train(
            _incoming("train", {"config": ConfigRecord(config), "payload": payload_to_record(payload)}), context
        )
        expected, core_state, metrics = core.client_update(core_state, data, payload, ctx)
        upload = record_to_payload(reply.content["upload"])
        assert list(upload) == list(expected)
        for key, value in expected.items():
            assert torch.equal(upload[key], value), (rnd, key)
        assert reply.content["metrics"]["payload-nbytes"] == payload_nbytes(expected)
        assert reply.content["metrics"]["loss"] == pytest.approx(metrics["loss"])
        payload, server_state = server.aggregate(server_state, [(upload, data.num_train)], ctx)

    recipe, weights = global_model_record(server.global_model(server_state))
    eval_ctx = RoundContext(round=1, num_rounds=2, seed=SEED, device=torch.device("cpu"), num_clients=2, total_train_samples=50)
    config = {**message_config(cfg, spec, eval_ctx), "global-model-recipe": recipe}
    reply = client_app.evaluate(_incoming("evaluate", {"config": ConfigRecord(config), "global-model": weights}), context)
    personal = core.personalized_model(core_state, server_state)
    personal_counts, _ = validation_counts(personal, data.val_x, data.val_y, spec.num_classes)
    global_counts, _ = validation_counts(server.global_model(server_state), data.val_x, data.val_y, spec.num_classes)
    metrics = reply.content["metrics"]
    assert metrics["personalized_val_accuracy"] == pytest.approx(accuracy_of(personal, data.val_x, data.val_y))
    assert metrics["personalized_val_balanced_accuracy"] == pytest.approx(balanced_accuracy_from_counts(personal_counts))
    assert metrics["global-val-counts"] == [int(v) for v in global_counts.reshape(-1)]


def test_outgoing_description_names_shapes_not_values() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedmic_pipeline.flower.client_app import describe_message

    reply = _incoming(
        "train",
        {"upload": payload_to_record({"w::U": torch.zeros(4, 2), "b": torch.ones(3, dtype=torch.float16)}),
         "metrics": MetricRecord({"loss": 0.5, "global-val-counts": [1, 2, 3, 4]}),
         "config": ConfigRecord({"blob": b"secret"})},
    )  # fmt: skip
    described = describe_message(reply)
    assert described["message_type"] == "train" and not described["error"]
    assert described["records"]["upload"] == {
        "kind": "array", "entries": {"w::U": {"dtype": "float32", "shape": [4, 2]}, "b": {"dtype": "float16", "shape": [3]}},
    }  # fmt: skip
    assert described["records"]["metrics"]["entries"]["global-val-counts"] == {"type": "list", "len": 4, "item_type": "int"}
    assert described["records"]["config"]["entries"]["blob"] == {"type": "bytes", "len": 6}
    assert "secret" not in json.dumps(described)


def test_preloaded_partition_is_served_until_its_file_changes(tmp_path: Path) -> None:
    data_dir = write_tiny_partition(tmp_path)
    try:
        preloaded = task.preload_client_data(data_dir, 0)
        assert task.load_client_data(data_dir, 0) is preloaded
        assert task.load_client_data(data_dir, 1) is not preloaded
        path = task.client_partition_path(data_dir, 0)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        reloaded = task.load_client_data(data_dir, 0)
        assert reloaded is not preloaded and torch.equal(reloaded.train_x, preloaded.train_x)
    finally:
        task._PRELOADED.clear()


def test_pull_backoff_shortens_flowers_object_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    from fedmic_pipeline.flower.latency import PULL_BACKOFF_ENV, apply_pull_backoff_from_env

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    try:
        monkeypatch.delenv(PULL_BACKOFF_ENV, raising=False)
        assert apply_pull_backoff_from_env() is None
        assert [f.__kwdefaults__["initial_backoff"] for f in functions] == [1, 1]  # Flower's own
        monkeypatch.setenv(PULL_BACKOFF_ENV, "0.05")
        assert apply_pull_backoff_from_env() == 0.05
        for function in functions:
            assert (function.__kwdefaults__["initial_backoff"], function.__kwdefaults__["backoff_cap"]) == (0.05, 1.0)
            assert function.__kwdefaults__["max_tries_per_object"] == 500
        monkeypatch.setenv(PULL_BACKOFF_ENV, "-1")
        with pytest.raises(ValueError, match=PULL_BACKOFF_ENV):
            apply_pull_backoff_from_env()
    finally:
        for function, defaults in zip(functions, saved, strict=True):
            function.__kwdefaults__ = defaults


def test_node_identity_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(task.FlowerConfigError, match="partition-id"):
        task.node_identity({"num-partitions": 2})
    with pytest.raises(task.FlowerConfigError, match="does not exist"):
        task.client_partition_path(tmp_path, 3)
    with pytest.raises(task.FlowerConfigError, match="on-node-failure"):
        task.ServerRunConfig.from_run_config({"on-node-failure": "retry", "params-file": ""}, root=tmp_path)


# -- slow: a real deployment -----------------------------------------------------------------
def _outgoing_log(work_dir: Path, index: int) -> Path:
    """Where SuperNode ``index``'s ClientApp describes every message it sends."""
    return work_dir / f"outgoing-node-{index}.jsonl"


@pytest.fixture(scope="module")
def partition_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_partition(tmp_path_factory.mktemp("flower_partition"))


@pytest.fixture(scope="module")
def federation(partition_dir: Path, tmp_path_factory: pytest.TempPathFactory, project_root: Path):
    from fedmic_pipeline.flower.launch import LoopbackFederation

    work_dir = tmp_path_factory.mktemp("flower_work")
    fed = LoopbackFederation(
        2,
        partition_dir,
        project_dir=project_root,
        work_dir=work_dir,
        env={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""},
        node_configs=[{OUTGOING_LOG_KEY: str(_outgoing_log(work_dir, i))} for i in range(2)],
    )
    with fed:
        yield fed


def _run_config(algorithm: str, params: dict[str, Any], output_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "algorithm-params": json.dumps(params),
        "params-file": "",
        "num-rounds": ROUNDS,
        "seed": SEED,
        "device": "cpu",
        "num-threads": 1,
        "eval-every": ROUNDS,
        "evaluate-personalized": False,
        "mlflow-tracking-uri": "none",
        "round-timeout": 120.0,
        "node-wait-timeout": 60.0,
        "output-dir": str(output_dir),
        **extra,
    }


def _in_process(algorithm: str, params: dict[str, Any], data_dir: Path, personalized: bool) -> SimulationResult:
    spec = task.load_data_spec(data_dir)
    clients = [task.load_client_data(data_dir, i) for i in range(2)]
    config = SimulationConfig(
        num_rounds=ROUNDS, seed=SEED, device="cpu", eval_every=ROUNDS, evaluate_personalized=personalized, num_threads=1
    )
    return run_simulation(build_algorithm(algorithm, params, spec), clients, spec, config)


def _check_against_in_process(result: Any, reference: SimulationResult) -> None:
    assert result.status == "completed", result.output[-4000:]
    summary = result.summary
    # the same rounds selected on the same validation scores, the same weights saved
    assert summary["selection"]["global_round"] == reference.selector.summary()["global_round"]
    for filename, model in (("global_model.pt", reference.global_model()), ("global_model_last.pt", reference.last_global_model())):
        saved = torch.load(result.output_dir / filename, weights_only=False)
        expected = model.state_dict()
        assert list(saved["state_dict"]) == list(expected)
        for key, value in expected.items():
            got = saved["state_dict"][key]
            assert got.dtype == value.dtype, key
            assert torch.allclose(got.double(), value.double().cpu(), atol=1e-5, rtol=0), (filename, key)

    history = summary["history"]
    assert [r["sampled"] for r in history] == [r["sampled"] for r in reference.history]
    for flower, core in zip(history, reference.history, strict=True):
        # the core's byte counts, measured by the server on the dicts that travelled
        assert flower["bytes_up"] == core["bytes_up"]
        assert flower["bytes_down_total"] == core["bytes_down_total"]
        assert flower["bytes_dense_total"] == core["bytes_dense_total"]
        assert flower["train_loss"] == pytest.approx(core["train_loss"], abs=1e-6)
        for key in ("global_val_accuracy", "global_val_balanced_accuracy"):
            assert (flower[key] is None) == (core[key] is None), key
            if core[key] is not None:
                assert flower[key] == pytest.approx(core[key], abs=1e-9), key
        # bytes on the wire: the core's count plus Flower's framing, within the bound
        for wire_payload, wire_total, core_bytes, arrays in zip(
            flower["wire_payload_bytes_up"], flower["wire_bytes_up"], flower["bytes_up"], flower["arrays_up"], strict=True
        ):
            assert 0 < wire_payload - core_bytes <= WIRE_PER_ARRAY * arrays + WIRE_PER_RECORD
            assert 0 < wire_total - wire_payload <= WIRE_MESSAGE_EXTRA
        for wire_payload, wire_total, core_bytes, arrays in zip(
            flower["wire_payload_bytes_down"], flower["wire_bytes_down"], flower["bytes_down"], flower["arrays_down"],
            strict=True,
        ):
            assert 0 < wire_payload - core_bytes <= WIRE_PER_ARRAY * arrays + WIRE_PER_RECORD
            assert 0 < wire_total - wire_payload <= WIRE_MESSAGE_EXTRA
    assert history[-1]["global_val_balanced_accuracy"] is not None


@pytest.fixture(scope="module")
def matching_runs(federation, partition_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """FedMIC (logging to a fresh MLflow database) then FedAvg over Flower -- one after the
    other: on two shared cores running them at once was slower -- while a thread of this
    process computes the in-process references. Returns {name: (result, reference, uri)}."""
    base = tmp_path_factory.mktemp("flower_runs")
    tracking = f"sqlite:///{base / 'mlflow.db'}"
    references: dict[str, SimulationResult] = {}

    def compute_references() -> None:
        references["fedmic"] = _in_process("fedmic", FEDMIC_PARAMS, partition_dir, personalized=False)
        references["fedavg"] = _in_process("fedavg", FEDAVG_PARAMS, partition_dir, personalized=False)

    worker = threading.Thread(target=compute_references)
    worker.start()
    try:
        results = {
            "fedmic": federation.run(
                _run_config("fedmic", FEDMIC_PARAMS, base / "fedmic", **{"mlflow-tracking-uri": tracking}),
                timeout=240,
            ),
            "fedavg": federation.run(_run_config("fedavg", FEDAVG_PARAMS, base / "fedavg"), timeout=240),
        }
    finally:
        worker.join()
    return {name: (results[name], references[name], tracking) for name in results}


@pytest.mark.slow
def test_fedmic_over_flower_matches_in_process(matching_runs: dict[str, Any]) -> None:
    result, reference, tracking = matching_runs["fedmic"]
    _check_against_in_process(result, reference)
    # FedMIC's point: the compressed student update is smaller than the dense broadcast
    assert result.summary["history"][0]["bytes_up_total"] < result.summary["history"][0]["bytes_down_total"]

    # MLflow: the in-process pipeline's metric names, one value per round (step = 1-based round)
    import sqlite3

    run_id = result.summary["mlflow_run_id"]
    with sqlite3.connect(tracking.removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT key, step, value FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
    logged = {(key, step): value for key, step, value in rows}
    for name in ("bytes_up_total", "bytes_down_total", "train_loss", "train_accuracy", "global_val_balanced_accuracy"):
        for record in result.summary["history"]:
            if record[name] is not None:
                assert logged[(name, record["round"] + 1)] == pytest.approx(record[name]), name
    assert params["algorithm"] == "fedmic" and params["runner"] == "flower"


@pytest.mark.slow
def test_fedavg_over_flower_matches_in_process(matching_runs: dict[str, Any], federation) -> None:
    result, reference, _ = matching_runs["fedavg"]
    _check_against_in_process(result, reference)
    # over TLS, with authenticated nodes, each of which checked and approved the app
    assert federation.credentials is not None
    assert {"--enable-supernode-auth", "--ssl-certfile"} <= set(federation.superlink.popen.args)
    approved = {"decision": "approved", "app_sha256": federation.app_sha256}
    assert result.site_decisions == {0: approved, 1: approved}


def _check_only_model_information_leaves(
    entry: dict[str, Any], model_shapes: dict[str, tuple[int, ...]], num_classes: int
) -> None:
    """One outgoing message: model parameters (dense, exact model shape) or their SVD
    factors (U: rows x r, V: cols x r of the parameter), scalar metrics and k x k
    confusion counts. Every array must have a model parameter's (or factor's) shape, which
    is stricter than "no leading dimension equal to a split's size": an image batch
    (N, C, H, W), a label vector (N,) or per-sample logits (N, k) cannot pass, while a
    parameter whose leading dimension happens to equal a sample count still can."""
    where = f"node {entry['partition_id']} {entry['message_type']} (round {entry['group_id']})"
    assert not entry["error"], where
    kinds = {name: record["kind"] for name, record in entry["records"].items()}
    expected = {"query": {"config": "config"}, "train": {"upload": "array", "metrics": "metric"},
                "evaluate": {"metrics": "metric"}}[entry["message_type"]]  # fmt: skip
    assert kinds == expected, where
    for record_name, record in entry["records"].items():
        for key, described in record["entries"].items():
            what = f"{where}: {record_name}[{key!r}]"
            if record["kind"] == "array":
                dtype, shape = described["dtype"], tuple(described["shape"])
                assert dtype in ("float32", "float16", "int64"), f"{what} has dtype {dtype}"
                assert dtype != "int64" or shape == (), f"{what} is an integer vector {shape} (labels?)"
                base, _, factor = key.partition("::")
                if base == "__meta__":
                    assert shape == (), what
                    continue
                assert base in model_shapes, f"{what} is no parameter of the model"
                full = model_shapes[base]
                if not factor:
                    assert shape == full, f"{what} has shape {shape}, the model's is {full}"
                    continue
                rows, cols = full[0], int(np.prod(full[1:]))
                assert factor in ("U", "V") and len(shape) == 2, what
                assert shape[0] == (rows if factor == "U" else cols) and shape[1] <= min(rows, cols), what
            else:
                kind = described["type"]
                assert kind not in ("bytes", "str"), f"{what} is {kind}: private state or free text leaves the node"
                if kind == "list":
                    assert key == "global-val-counts" and described["len"] == num_classes**2, f"{what}: {described}"
                else:
                    assert kind in ("int", "float", "bool"), f"{what} is {kind}"


@pytest.mark.slow
def test_only_model_information_leaves_a_hospital(matching_runs: dict[str, Any], federation, partition_dir: Path) -> None:
    """Every message each SuperNode sent in the FedMIC and FedAvg runs, as the ClientApp's
    outgoing mod saw it on its way out: only model parameters/SVD factors, counts and
    metrics; no image, no label array, no private state."""
    spec = task.load_data_spec(partition_dir)
    for name, params in (("fedmic", FEDMIC_PARAMS), ("fedavg", FEDAVG_PARAMS)):
        result = matching_runs[name][0]
        algorithm = build_algorithm(name, params, spec)
        model = algorithm.global_model(algorithm.init_server(SEED)[0])
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for index in range(2):
            lines = _outgoing_log(federation.work_dir, index).read_text(encoding="utf-8").splitlines()
            sent = [e for e in map(json.loads, lines) if e["run_id"] == result.run_id]
            by_type = {t: [e for e in sent if e["message_type"] == t] for t in ("query", "train", "evaluate")}
            rounds_in = sum(index in r["participants"] for r in result.summary["history"])
            assert (len(by_type["query"]), len(by_type["train"]), len(by_type["evaluate"])) == (1, rounds_in, 1), name
            assert len(sent) == rounds_in + 2, f"{name}: node {index} sent other messages: {sent}"
            for entry in sent:
                _check_only_model_information_leaves(entry, shapes, spec.num_classes)
            factored = [k for e in by_type["train"] for k in e["records"]["upload"]["entries"] if "::" in k]
            assert (name == "fedmic") == any(k.endswith(("::U", "::V")) for k in factored), name


def _run_and_kill(federation: Any, run_config: dict[str, Any], node: int, sig: int, timeout: float) -> Any:
    """Start a run in a thread; once the server has mapped the partitions (summary status
    'running'), kill SuperNode ``node`` with ``sig``; return the run's result."""
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", federation.run(run_config, timeout=timeout)))
    worker.start()
    summary = Path(run_config["output-dir"]) / "flower_summary.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.is_alive():
        try:
            if json.loads(summary.read_text())["status"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    else:
        worker.join()
        pytest.fail(f"the run never reached its rounds: {outcome.get('result')}")
    federation.kill_node(node, sig)
    worker.join()
    return outcome["result"]


@pytest.mark.slow
def test_killed_node_is_reported_and_the_run_continues(federation, tmp_path: Path) -> None:
    config = _run_config(
        "fedavg", FEDAVG_PARAMS, tmp_path / "out", **{"on-node-failure": "continue", "round-timeout": ROUND_TIMEOUT_KILL}
    )
    result = _run_and_kill(federation, config, node=1, sig=signal.SIGKILL, timeout=240)
    assert result.status == "completed", result.output[-4000:]
    first, second = result.summary["history"]
    dead_node = result.summary["partitions"]["1"]["node_id"]
    assert first["participants"] == [0] and second["participants"] == [0]
    assert first["failed"][0]["partition_id"] == 1 and first["failed"][0]["node_id"] == dead_node
    assert "no reply within" in first["failed"][0]["reason"]
    assert "excluded" in second["failed"][0]["reason"]  # not waited for again
    assert second["train_time_s"] < ROUND_TIMEOUT_KILL  # the dead node is not waited for again
    assert f"node {dead_node} (partition 1) failed in round 1 (train)" in result.output
    assert "Continuing with the 1 remaining node(s)" in result.output
    assert (result.output_dir / "global_model.pt").is_file()


@pytest.mark.slow
def test_stopped_node_stops_the_run_when_configured(federation, tmp_path: Path) -> None:
    federation.start_node(1)  # partition 1 again, after the previous test killed it
    config = _run_config("fedavg", FEDAVG_PARAMS, tmp_path / "out", **{"on-node-failure": "stop"})
    started = time.monotonic()
    result = _run_and_kill(federation, config, node=1, sig=signal.SIGTERM, timeout=240)
    assert result.status == "stopped", result.output[-4000:]
    error = result.summary["error"]
    assert "NodeFailureError" in error and "(partition 1)" in error and "on-node-failure = stop" in error
    # a node that shuts down deactivates itself: noticed at once, not after round-timeout
    assert "left the SuperLink" in error
    assert result.summary["history"] == []
    assert time.monotonic() - started < 90
    assert not (result.output_dir / "global_model.pt").exists()


def _leftovers(pids: set[int], flwr_home: Path, port: int) -> list[tuple[int, str]]:
    """Running (non-zombie) processes of a deployment: the pids it started or saw, and any
    process carrying its private FLWR_HOME (every Flower process it spawned inherits it)
    or naming its SuperLink port."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            try:
                env_home = proc.environ().get("FLWR_HOME")
            except psutil.AccessDenied:  # another user's process
                env_home = None
        except psutil.Error:
            continue
        if proc.pid in pids or env_home == str(flwr_home) or f"127.0.0.1:{port}" in cmdline:
            found.append((proc.pid, cmdline))
    return found


@pytest.mark.slow
def test_no_process_is_left_after_teardown(federation) -> None:
    pids = federation.pids()
    assert pids, "the federation started no process?"
    federation.stop()
    leftovers = _leftovers(pids, federation.flwr_home, federation.port)
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FEDMIC_FLOWER_RAY") != "1",
    reason="opt-in (~55 s more on two cores): set FEDMIC_FLOWER_RAY=1 to test the Ray simulation runtime",
)
def test_ray_simulation_matches_in_process(partition_dir: Path, tmp_path: Path, project_root: Path) -> None:
    """The same ServerApp/ClientApp under ``flower-superlink --simulation`` (Ray backend,
    two virtual SuperNodes in long-lived actors) give the in-process result too."""
    from fedmic_pipeline.flower.launch import LoopbackFederation

    with LoopbackFederation(
        2, partition_dir, project_dir=project_root, work_dir=tmp_path / "work", simulation=True, env={"OMP_NUM_THREADS": "1"}
    ) as fed:
        result = fed.run(_run_config("fedmic", FEDMIC_PARAMS, tmp_path / "out"), timeout=240)
        pids = fed.pids()
    _check_against_in_process(result, _in_process("fedmic", FEDMIC_PARAMS, partition_dir, personalized=False))
    assert "RayBackend" in result.output
    leftovers = _leftovers(pids, fed.flwr_home, fed.port)  # Ray's raylet/GCS/workers included
    assert not leftovers, f"processes left running: {leftovers}"
