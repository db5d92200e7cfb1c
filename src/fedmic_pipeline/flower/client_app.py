"""The ClientApp: one hospital's side of the core's round protocol, carried by Flower.

Three message types, all answered from the node's OWN partition (node config
``partition-id``, ``data-dir``; see ``task.node_identity``):

* ``query``: the partition id and split sizes, so the server can map partitions to node
  ids, weight by training-set size and sample exactly as the in-process runner does.
* ``train``: content ``config`` (ConfigRecord: algorithm + resolved params as JSON, the
  DataSpec, round, seed, device, the sampled partition ids, ...) and ``payload``
  (ArrayRecord). The node rebuilds the server's algorithm, restores its private state
  from ``context.state`` (or ``init_client`` on its first round), calls the core's
  ``client_update(state, data, payload, ctx)`` with the same ``RoundContext`` as the
  in-process runner -- so the local batches come from ``round_generator(seed, round,
  partition id)`` and the results match it -- stores the new private state back into
  ``context.state`` and replies ``upload`` (ArrayRecord) and ``metrics`` (MetricRecord:
  the core's metrics, ``num-train`` and the core's byte count ``payload-nbytes``).
  Under run config ``secure-aggregation = "secaggplus"`` Flower's ``secaggplus_mod``
  wraps this handler (``secure_aggregation``): the reply is the dense update, masked.
* ``evaluate``: the global model's confusion counts on the node's validation split
  (``global-val-counts``, row-major k x k; the server pools them) and the personalized
  model's accuracy and balanced accuracy there. The core's ``personalized_model(state, server_state)`` may read ``server_state['model']``
  (FedAvg, SCAFFOLD, Ditto before its first round); the server therefore sends its
  global model (``global-model`` ArrayRecord + recipe) and the node passes a server view
  holding just that model. A method that needs more of the server state (FedBN's
  ``shared_keys``) is reported as unavailable instead of failing the run.

Private state: a SuperNode runs every message in a fresh process (a new
``flwr-clientapp``, or a child forked from the warm SuperExec, ``warm_superexec``), so
the state lives in ``context.state`` (see ``records.store_private_state``), never in
module globals, and never leaves the node. What does leave it can be audited: the mod
``outgoing_message_log`` describes every reply (node config ``outgoing-log``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import secure_aggregation, task
from .records import has_private_state, load_private_state, payload_to_record, record_to_payload, store_private_state

__all__ = ["OUTGOING_LOG_KEY", "ServerStateUnavailable", "app", "describe_message", "outgoing_message_log"]

logger = logging.getLogger(__name__)

#: Node-config key naming a JSON-lines file to which the node appends a description of
#: every message it sends (``outgoing_message_log``); absent = nothing is written.
OUTGOING_LOG_KEY = "outgoing-log"


def _describe_value(value: Any) -> dict[str, Any]:
    described: dict[str, Any] = {"type": type(value).__name__}
    if isinstance(value, (list, bytes, str)):
        described["len"] = len(value)
    if isinstance(value, list) and value:
        described["item_type"] = type(value[0]).__name__
    return described


def describe_message(message: Message) -> dict[str, Any]:
    """What a message carries, without its values: each record's kind and, per entry,
    array name/dtype/shape or metric/config key with its type and length."""
    out: dict[str, Any] = {
        "run_id": message.metadata.run_id,
        "message_type": message.metadata.message_type,
        "group_id": message.metadata.group_id,
        "error": message.has_error(),
        "records": {},
    }
    if message.has_error():
        return out
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            out["records"][name] = {
                "kind": "array",
                "entries": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in record.items()},
            }
        else:
            kind = "metric" if isinstance(record, MetricRecord) else "config"
            out["records"][name] = {"kind": kind, "entries": {k: _describe_value(v) for k, v in record.items()}}
    return out


def outgoing_message_log(message: Message, context: Context, call_next: Any) -> Message:
    """Client-side mod: when the node config names ``outgoing-log``, append a description
    of the reply this node is about to send (``describe_message``) to that file -- an
    audit of what leaves the hospital, taken from the message Flower will push, after
    every handler. A node without the key pays nothing."""
    reply = call_next(message, context)
    path = context.node_config.get(OUTGOING_LOG_KEY)
    if path:
        entry = {
            "time": time.time(),
            "node_id": context.node_id,
            "partition_id": context.node_config.get(task.PARTITION_ID_KEY),
            **describe_message(reply),
        }
        with open(str(path), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    return reply


app = ClientApp(mods=[outgoing_message_log])


class ServerStateUnavailable(KeyError):
    """The personalized model needs a part of the server state that no message carries."""


class _ServerView(dict):
    """The part of the server state a node can hold: the broadcast global model."""

    def __missing__(self, key: str) -> Any:
        raise ServerStateUnavailable(key)


def _message_config(message: Message) -> ConfigRecord:
    if task.CONFIG_KEY not in message.content:
        raise task.FlowerConfigError(
            f"The '{message.metadata.message_type}' message has no '{task.CONFIG_KEY}' ConfigRecord; "
            "is the ServerApp from the same fedmic-pipeline version?"
        )
    return message.content[task.CONFIG_KEY]


class _NodeRound:
    """Everything one train/evaluate message needs on this node, built from the message."""

    def __init__(self, message: Message, context: Context, config: ConfigRecord | None = None) -> None:
        import torch

        from ..core.data import amp_dtype, resolve_amp, resolve_device
        from ..core.protocol import RoundContext
        from ..core.simulation import SimulationConfig, validate_setup

        task.configure_logging()
        self.config = cfg = _message_config(message) if config is None else config
        self.node = task.node_identity(context.node_config, context.run_config)
        if self.node.num_threads:
            torch.set_num_threads(self.node.num_threads)
        self.context = context
        self.algorithm_name = str(cfg["algorithm"])
        self.device = resolve_device(str(cfg["device"]))
        use_amp = resolve_amp(str(cfg["amp"]), self.device)
        self.spec = task.spec_from_config(cfg)
        self.algorithm = task.build_algorithm_for(
            self.algorithm_name, json.loads(str(cfg["algorithm-params"])), self.spec, self.device
        )
        self.data = task.load_client_data(self.node.data_dir, self.node.partition_id, self.device)
        sim = SimulationConfig(
            num_rounds=int(cfg["num-rounds"]), seed=int(cfg["seed"]), device=str(cfg["device"]), amp=str(cfg["amp"])
        )
        validate_setup(self.algorithm, [self.data], self.spec, sim)  # shapes/labels vs the server's DataSpec
        sampled = tuple(int(i) for i in cfg["sampled"])
        self.ctx = RoundContext(
            round=int(cfg["round"]),
            num_rounds=int(cfg["num-rounds"]),
            seed=int(cfg["seed"]),
            device=self.device,
            use_amp=use_amp,
            amp_dtype=amp_dtype(self.device) if use_amp else None,
            sampled=sampled or None,
            num_clients=int(cfg["num-clients"]) or None,
            total_train_samples=int(cfg["total-train-samples"]) or None,
        )

    @property
    def partition_id(self) -> int:
        return self.node.partition_id

    def client_state(self) -> dict[str, Any]:
        """The private state kept on this node, or a fresh ``init_client`` on first use."""
        if has_private_state(self.context.state):
            return load_private_state(
                self.context.state,
                run_id=self.context.run_id,
                partition_id=self.partition_id,
                algorithm=self.algorithm_name,
                device=self.device,
            )
        return self.algorithm.init_client(self.partition_id, self.data, self.ctx.seed)

    def save(self, state: dict[str, Any]) -> int:
        return store_private_state(
            self.context.state, state, run_id=self.context.run_id, partition_id=self.partition_id, algorithm=self.algorithm_name
        )


def _timing(message: Message) -> dict[str, float]:
    """Where a message's time goes before the handler runs: ``dispatch-s`` (message
    created by the server -> this ClientApp process started) and ``startup-s`` (process
    start -> handler: interpreter, Flower imports, pulling the message and context).
    Flower 1.41 starts one process per message, so these (and importing torch, counted
    in ``handler-s``) repeat every round."""
    try:
        import psutil

        started = psutil.Process().create_time()
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable: skip
        return {}
    now = time.time()
    return {"dispatch-s": max(0.0, started - message.metadata.created_at), "startup-s": max(0.0, now - started)}


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


@app.query()
def query(message: Message, context: Context) -> Message:
    """Reply this node's partition id and split sizes (no torch import: fast)."""
    task.configure_logging()
    node = task.node_identity(context.node_config, context.run_config)
    sizes = task.partition_sizes(node.data_dir, node.partition_id)
    reply = ConfigRecord(
        {
            "partition-id": node.partition_id,
            "num-partitions": -1 if node.num_partitions is None else node.num_partitions,
            **sizes,
        }
    )
    logger.info("query: partition %d (%s) at %s", node.partition_id, sizes, node.data_dir)
    return Message(RecordDict({task.CONFIG_KEY: reply}), reply_to=message)


@app.train(mods=[secure_aggregation.secaggplus_when_requested])
def train(message: Message, context: Context) -> Message:
    """One ``client_update`` of the core on this node's partition (see module docstring).
    Under SecAgg+ (``secure_aggregation``) the payload arrives as legacy FitIns and the
    reply is the dense update in the FitRes layout, which the mod masks before it leaves."""
    start = time.perf_counter()
    timing = _timing(message)  # before torch is imported: startup-s is Flower's share
    from ..core.protocol import payload_nbytes

    secure = secure_aggregation.is_secure_train(message)
    node_round = _NodeRound(message, context, secure_aggregation.fit_config(message) if secure else None)
    if secure:
        payload = secure_aggregation.fit_payload(message, node_round.device)
    elif task.PAYLOAD_KEY not in message.content:
        raise task.FlowerConfigError(f"The train message has no '{task.PAYLOAD_KEY}' ArrayRecord.")
    else:
        payload = record_to_payload(message.content[task.PAYLOAD_KEY], node_round.device)
    state = node_round.client_state()
    t0 = time.perf_counter()
    upload, state, metrics = node_round.algorithm.client_update(state, node_round.data, payload, node_round.ctx)
    update_s = time.perf_counter() - t0
    state_nbytes = node_round.save(state)
    out = _numeric_metrics(metrics)
    out.update(
        {
            "partition-id": node_round.partition_id,
            "num-train": node_round.data.num_train,
            "payload-nbytes": payload_nbytes(upload),
            "payload-nbytes-received": payload_nbytes(payload),
            "private-state-nbytes": state_nbytes,
            "client-update-s": update_s,
            "handler-s": time.perf_counter() - start,
            **timing,
        }
    )
    logger.info(
        "train: partition %d round %d/%d, %s, loss %.4f, %d B up, %.2fs update",
        node_round.partition_id, node_round.ctx.round + 1, node_round.ctx.num_rounds, node_round.algorithm_name,
        out.get("loss", float("nan")), out["payload-nbytes"], update_s,
    )  # fmt: skip
    if secure:
        content = secure_aggregation.fit_reply(upload, payload, out, node_round.data.num_train, node_round.config)
    else:
        content = RecordDict({task.UPLOAD_KEY: payload_to_record(upload), task.METRICS_KEY: MetricRecord(out)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The global model's confusion counts and the personalized model's scores on this
    node's validation split (the server pools the counts and selects on them)."""
    import numpy as np

    from ..core.models import build_model
    from ..core.selection import balanced_accuracy_from_counts, validation_counts

    node_round = _NodeRound(message, context)
    cfg = node_round.config
    data, k, batch = node_round.data, node_round.spec.num_classes, int(cfg["eval-batch-size"])
    view = _ServerView()
    metrics: dict[str, Any] = {"partition-id": node_round.partition_id, "num-val": int(data.val_y.shape[0])}
    if task.GLOBAL_MODEL_KEY in message.content:
        recipe = json.loads(str(cfg["global-model-recipe"]))
        model = build_model(recipe["architecture"], node_round.spec, seed=0, **recipe["kwargs"])
        model.load_state_dict(record_to_payload(message.content[task.GLOBAL_MODEL_KEY]))
        view["model"] = model.to(node_round.device)
        counts, _ = validation_counts(view["model"], data.val_x, data.val_y, k, batch)
        metrics["global-val-counts"] = [int(v) for v in counts.reshape(-1)]
    if not bool(cfg.get("evaluate-personalized", True)):
        return Message(RecordDict({task.METRICS_KEY: MetricRecord(metrics)}), reply_to=message)
    state = node_round.client_state()
    try:
        personal = node_round.algorithm.personalized_model(state, view)
    except ServerStateUnavailable as exc:
        logger.warning(
            "evaluate: %s's personalized model needs server state %s that the Flower transport does not carry; "
            "its personalized validation scores are not reported.",
            node_round.algorithm_name, exc,
        )  # fmt: skip
        metrics["personalized-unavailable"] = 1
    else:
        counts, _ = validation_counts(personal, data.val_x, data.val_y, k, batch)
        n = int(counts.sum())
        if n:
            metrics["personalized_val_accuracy"] = float(np.trace(counts)) / n
            metrics["personalized_val_balanced_accuracy"] = balanced_accuracy_from_counts(counts)
    return Message(RecordDict({task.METRICS_KEY: MetricRecord(metrics)}), reply_to=message)
