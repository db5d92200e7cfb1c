"""The ServerApp: the in-process runner's round loop, with Flower carrying the payloads.

One run (``@app.main()``):

1. wait for ``min-nodes`` SuperNodes, send them a ``query`` and map each node's
   ``partition-id`` to its node id (and learn every partition's training-set size);
2. build the algorithm from the run config (``core.algorithms.build_algorithm``) and call
   the core's ``init_server(seed)``;
3. every round: ``core.simulation.sample_clients(partitions, join_ratio, seed, round)``
   (so the same seed samples the same partitions as the in-process runner), send each
   sampled node a ``train`` message with the payload, collect the uploads, order them by
   partition id and call the core's ``aggregate``; at evaluation rounds compute the
   global model's accuracy on the global test set and (optionally) ask every node for
   its personalized validation accuracy;
4. save the final global model (``core.models.model_record`` + ``torch.save``) and a
   JSON summary (history, totals, wire sizes) to ``output-dir``.

History records have the in-process runner's keys (``bytes_up_total``,
``bytes_down_total``, ``train_loss``, ``global_test_accuracy``, ...; see
``core.simulation.run_simulation``) -- the byte counts are the core's ``payload_nbytes``
of the very dicts that travelled -- plus the transport's own: ``wire_bytes_up`` /
``wire_bytes_down`` (serialized Flower objects per message, ``records.message_wire_nbytes``),
``wire_payload_bytes_up`` / ``wire_payload_bytes_down`` (the payload ArrayRecord alone),
``arrays_up`` / ``arrays_down``, ``participants``, ``failed`` and ``round_time_s``. They go to MLflow under
the same metric names and steps (1-based round) when a tracking URI is configured.

Node failures: a node whose ClientApp raised (a Flower error reply), that did not reply
within ``round-timeout`` seconds, or that left the SuperLink, is a failure.
``on-node-failure = "continue"`` logs a warning naming the node and its partition,
aggregates the remaining replies and excludes that node for the rest of the run;
``"stop"`` ends the run with a ``NodeFailureError`` naming them (the summary is written
with ``status: "stopped"`` first).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import task
from .records import message_wire_nbytes, payload_to_record, record_to_payload, wire_nbytes

__all__ = ["FlowerServer", "NodeFailureError", "app", "global_model_record", "message_config"]

logger = logging.getLogger(__name__)

app = ServerApp()

SUMMARY_FILE = "flower_summary.json"
MODEL_FILE = "global_model.pt"
_POLL_S = 0.25
_MEMBERSHIP_CHECK_S = 1.0
_MB = 1024.0 * 1024.0


class NodeFailureError(RuntimeError):
    """A node failed and ``on-node-failure`` is ``stop`` (or no node is left)."""


@dataclass
class PartitionNode:
    """One hospital as the server knows it: its partition, Flower node id and sizes."""

    partition_id: int
    node_id: int
    num_train: int
    num_val: int
    num_test: int
    failed_in: str | None = None


@dataclass
class Exchange:
    """The outcome of sending one message per key: replies and failures by key."""

    replies: dict[int, Message] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    wire_sent: dict[int, int] = field(default_factory=dict)
    unanswered: list[int] = field(default_factory=list)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(dict(document)), indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def message_config(
    cfg: task.ServerRunConfig, spec: Any, *, rnd: int, sampled: list[int], num_clients: int, total_train_samples: int
) -> dict[str, Any]:
    """The ``config`` ConfigRecord of a train/evaluate message: everything a node needs to
    rebuild the server's algorithm and the in-process runner's ``RoundContext``."""
    return {
        "algorithm": cfg.algorithm,
        "algorithm-params": json.dumps(cfg.algorithm_params, sort_keys=True),
        **task.spec_to_config(spec),
        "round": rnd,
        "num-rounds": cfg.num_rounds,
        "seed": cfg.seed,
        "device": cfg.device,
        "amp": cfg.amp,
        "eval-batch-size": cfg.eval_batch_size,
        "num-clients": num_clients,
        "total-train-samples": total_train_samples,
        "sampled": [int(p) for p in sampled],
    }


def global_model_record(model: Any) -> tuple[str, ArrayRecord]:
    """The global model for an ``evaluate`` message: its recipe (JSON) and weights."""
    from ..core.models import model_record

    saved = model_record(model)
    recipe = json.dumps({"architecture": saved["architecture"], "kwargs": saved["kwargs"]})
    return recipe, payload_to_record(saved["state_dict"])


def _describe_error(reply: Message) -> str:
    """A Flower error reply in words: who failed (the node, its ClientApp) and why."""
    from flwr.common.constant import ErrorCode

    code, reason = reply.error.code, reply.error.reason
    if code == ErrorCode.NODE_UNAVAILABLE:
        return f"the node became unavailable: it left the SuperLink or stopped sending heartbeats (Flower: {reason})"
    if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED, ErrorCode.LOAD_CLIENT_APP_EXCEPTION):
        return f"its ClientApp failed (Flower error {code}): {reason}"
    return f"Flower error {code}: {reason}"


def _weighted_mean(values: list[float | None], weights: list[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


class _MlflowLog:
    """Per-round metrics with the in-process runner's names and steps (``step`` = the
    1-based round, as ``experiment.history_table`` logs them); a no-op without a URI."""

    #: history keys logged every round (None values are skipped)
    ROUND_METRICS = (
        "bytes_up_total", "bytes_down_total", "bytes_dense_total", "bytes_dense_per_client", "train_loss",
        "train_accuracy", "global_test_accuracy", "personalized_val_accuracy", "train_time_s", "eval_time_s",
        "samples_per_s", "wire_bytes_up_total", "wire_bytes_down_total", "wire_bytes_eval_total", "round_time_s",
        "num_failed",
    )  # fmt: skip

    def __init__(self, uri: str | None, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self._mlflow: Any = None
        self.run_id: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        if not self.uri:
            logger.info("MLflow logging is off (mlflow-tracking-uri = none).")
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        logger.info("MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment, self.uri)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Step = the 1-based round, as the Kedro pipeline's history table logs it."""
        if self._mlflow is None:
            return
        metrics = {k: float(record[k]) for k in self.ROUND_METRICS if record.get(k) is not None}
        metrics["num_sampled"] = float(len(record["sampled"]))
        self._mlflow.log_metrics(metrics, step=int(record["round"]) + 1)

    def finish(self, totals: Mapping[str, Any], status: str, artifacts: Iterable[Path] = ()) -> None:
        if self._mlflow is None:
            return
        numeric = {f"total/{k}": float(v) for k, v in totals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._mlflow.log_metrics(numeric)
        for path in artifacts:
            if path.is_file():
                self._mlflow.log_artifact(str(path))
        self._mlflow.end_run(status=status)


class FlowerServer:
    """The round loop of one Flower run over ``grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: task.ServerRunConfig, flower_run_id: int = 0) -> None:
        import torch

        from ..core.data import resolve_amp, resolve_device

        self.grid = grid
        self.cfg = cfg
        self.flower_run_id = flower_run_id
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.use_amp = resolve_amp(cfg.amp, self.device)
        self.spec = task.load_data_spec(cfg.data_dir)
        self.algorithm = task.build_algorithm_for(cfg.algorithm, cfg.algorithm_params, self.spec, self.device)
        self.test = task.load_global_test(cfg.data_dir, self.device)
        self.partitions: dict[int, PartitionNode] = {}
        self.history: list[dict[str, Any]] = []
        self.output_dir = cfg.output_dir
        self.mlflow = _MlflowLog(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
        self.status = "starting"
        self.error: str | None = None
        self.started = time.perf_counter()

    # -- messaging ---------------------------------------------------------------------
    def _exchange(
        self, messages: dict[int, Message], timeout: float, enough: Callable[[dict[int, Message]], bool] | None = None
    ) -> Exchange:
        """Push one message per key, pull replies until all arrived or ``timeout`` (or
        until ``enough(replies)``: the still pending keys then go to ``unanswered``)."""
        out = Exchange()
        if not messages:
            return out
        keys = list(messages)
        for key in keys:
            out.wire_sent[key] = int(message_wire_nbytes(messages[key]))
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        pending: dict[str, int] = {}
        for key, message_id in zip(keys, ids, strict=True):
            if message_id is None:
                out.failures[key] = "the SuperLink did not accept the message"
            else:
                pending[message_id] = key
        deadline = time.monotonic() + timeout
        next_membership_check = time.monotonic() + _MEMBERSHIP_CHECK_S
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    out.failures[key] = _describe_error(reply)
                else:
                    out.replies[key] = reply
            if pending and enough is not None and enough(out.replies):
                out.unanswered.extend(pending.values())
                pending.clear()
                break
            if pending and time.monotonic() >= next_membership_check:
                # A SuperNode that shuts down (SIGTERM, Ctrl-C) deactivates itself at once;
                # one that crashes (SIGKILL, power loss) stays "online" until its heartbeat
                # expires (~60 s in Flower 1.41), so only the timeout catches it.
                online = {int(n) for n in self.grid.get_node_ids()}
                for message_id, key in list(pending.items()):
                    if messages[key].metadata.dst_node_id not in online:
                        del pending[message_id]
                        out.failures[key] = "the node left the SuperLink while its message was pending"
                next_membership_check = time.monotonic() + _MEMBERSHIP_CHECK_S
            if pending:
                time.sleep(_POLL_S)
        for key in pending.values():
            out.failures[key] = f"no reply within {timeout:.0f}s (round-timeout): the node is down, killed or too slow"
        return out

    def _handle_failures(self, stage: str, failures: Mapping[int, str], remaining: int) -> None:
        """Apply ``on-node-failure`` to the failures of one exchange."""
        if not failures:
            return
        lines = []
        for pid, reason in sorted(failures.items()):
            node = self.partitions.get(pid)
            node_txt = f"node {node.node_id}" if node is not None else "node ?"
            lines.append(f"{node_txt} (partition {pid}) failed in {stage}: {reason}")
            if node is not None:
                node.failed_in = stage
        if self.cfg.on_node_failure == "stop":
            raise NodeFailureError("; ".join(lines) + ". Stopping the run (on-node-failure = stop).")
        for line in lines:
            logger.warning("%s. Continuing with the %d remaining node(s) (on-node-failure = continue).", line, remaining)
        if remaining == 0:
            raise NodeFailureError(f"No node replied in {stage}: " + "; ".join(lines))

    def _base_config(self, rnd: int, sampled: list[int]) -> dict[str, Any]:
        return message_config(
            self.cfg,
            self.spec,
            rnd=rnd,
            sampled=sampled,
            num_clients=len(self.partitions),
            total_train_samples=sum(p.num_train for p in self.partitions.values()),
        )

    # -- setup -------------------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_nodes:
                return nodes
            if time.monotonic() >= deadline:
                raise NodeFailureError(
                    f"Only {len(nodes)} of min-nodes={self.cfg.min_nodes} SuperNodes connected within "
                    f"{self.cfg.node_wait_timeout:.0f}s (node-wait-timeout). Start more SuperNodes or lower min-nodes."
                )
            time.sleep(0.5)

    def _query_partitions(self, nodes: list[int]) -> None:
        """Ask every connected node for its partition id and sizes.

        Stops waiting once the declared ``num-partitions`` are all mapped, so a stale node
        (crashed, still listed until its heartbeat expires) costs no time. Nodes that do
        not answer are left out with a warning while ``min-nodes`` remain;
        ``on-node-failure`` governs failures during the rounds.
        """
        messages = {n: Message(RecordDict({task.CONFIG_KEY: ConfigRecord({})}), n, "query") for n in nodes}

        def all_mapped(replies: dict[int, Message]) -> bool:
            infos = [r.content[task.CONFIG_KEY] for r in replies.values()]
            declared = max((int(i["num-partitions"]) for i in infos), default=0)
            return declared > 0 and {int(i["partition-id"]) for i in infos} >= set(range(declared))

        exchange = self._exchange(messages, self.cfg.node_wait_timeout, enough=all_mapped)
        if exchange.unanswered:
            logger.info(
                "Nodes %s had not answered when every partition was mapped; they are left out.", sorted(exchange.unanswered)
            )
        if exchange.failures:
            failures = "; ".join(f"node {n}: {r}" for n, r in sorted(exchange.failures.items()))
            if len(exchange.replies) < self.cfg.min_nodes:
                raise NodeFailureError(
                    f"Only {len(exchange.replies)} nodes answered the partition query (min-nodes={self.cfg.min_nodes}): "
                    f"{failures}."
                )
            logger.warning("Nodes failed the partition query and are left out: %s.", failures)
        declared: set[int] = set()
        for node_id, reply in sorted(exchange.replies.items()):
            info = reply.content[task.CONFIG_KEY]
            pid = int(info["partition-id"])
            if pid in self.partitions:
                raise NodeFailureError(
                    f"Partition {pid} is served by two nodes ({self.partitions[pid].node_id} and {node_id}); "
                    "give every SuperNode its own partition-id."
                )
            self.partitions[pid] = PartitionNode(pid, node_id, int(info["num-train"]), int(info["num-val"]), int(info["num-test"]))
            if int(info["num-partitions"]) > 0:
                declared.add(int(info["num-partitions"]))
        if len(declared) > 1:
            logger.warning("Nodes disagree on num-partitions: %s.", sorted(declared))
        if declared and max(declared) != len(self.partitions):
            logger.warning(
                "%d of %d partitions are connected (%s): sampling draws from these only, so results differ from an "
                "in-process run over all %d.", len(self.partitions), max(declared), sorted(self.partitions), max(declared),
            )  # fmt: skip
        logger.info(
            "Partitions -> nodes: %s",
            ", ".join(f"{p.partition_id}->{p.node_id} ({p.num_train} train)" for p in self.partitions.values()),
        )

    # -- rounds ------------------------------------------------------------------------
    def _train_round(self, rnd: int, payload: dict[str, Any], server_state: Any) -> tuple[dict[str, Any], Any, Any]:
        from ..core.protocol import RoundContext, payload_nbytes
        from ..core.data import amp_dtype
        from ..core.simulation import sample_clients

        t0 = time.perf_counter()
        sampled = sample_clients(sorted(self.partitions), self.cfg.join_ratio, self.cfg.seed, rnd)
        ctx = RoundContext(
            round=rnd,
            num_rounds=self.cfg.num_rounds,
            seed=self.cfg.seed,
            device=self.device,
            use_amp=self.use_amp,
            extras={
                "num_clients": len(self.partitions),
                "total_train_samples": sum(p.num_train for p in self.partitions.values()),
                "amp_dtype": amp_dtype(self.device) if self.use_amp else None,
                "sampled": list(sampled),
            },
        )
        online = {int(n) for n in self.grid.get_node_ids()}
        skipped: dict[int, str] = {}
        targets: list[int] = []
        for pid in sampled:
            node = self.partitions[pid]
            if node.failed_in is not None:
                skipped[pid] = f"excluded since it failed in {node.failed_in}"
            elif node.node_id not in online:
                skipped[pid] = "it is no longer connected to the SuperLink"
            else:
                targets.append(pid)
        down = payload_nbytes(payload)
        payload_record = payload_to_record(payload)
        wire_payload_down = int(wire_nbytes(payload_record))
        config = self._base_config(rnd, sampled)
        messages = {
            pid: Message(
                RecordDict({task.CONFIG_KEY: ConfigRecord(config), task.PAYLOAD_KEY: payload_record}),
                self.partitions[pid].node_id,
                "train",
                group_id=str(rnd),
            )
            for pid in targets
        }
        exchange = self._exchange(messages, self.cfg.round_timeout)
        failures = {**skipped, **exchange.failures}
        participants = sorted(exchange.replies)
        self._handle_failures(f"round {rnd + 1} (train)", failures, remaining=len(participants))

        uploads: list[tuple[dict[str, Any], int]] = []
        bytes_up: list[int] = []
        wire_up: list[int] = []
        wire_payload_up: list[int] = []
        arrays_up: list[int] = []
        client_metrics: list[dict[str, Any]] = []
        for pid in participants:
            reply = exchange.replies[pid]
            upload = record_to_payload(reply.content[task.UPLOAD_KEY], self.device)
            metrics = dict(reply.content[task.METRICS_KEY])
            node = self.partitions[pid]
            if int(metrics.get("num-train", node.num_train)) != node.num_train:
                raise NodeFailureError(
                    f"Partition {pid} reported {metrics['num-train']} training samples in round {rnd + 1} but "
                    f"{node.num_train} in the query; its data changed during the run."
                )
            nbytes = payload_nbytes(upload)
            if int(metrics.get("payload-nbytes", nbytes)) != nbytes:
                raise NodeFailureError(
                    f"Partition {pid}: the upload has {nbytes} payload bytes on arrival but {metrics['payload-nbytes']} "
                    "when sent; the transport altered it."
                )
            uploads.append((upload, node.num_train))
            bytes_up.append(nbytes)
            wire_up.append(int(message_wire_nbytes(reply)))
            wire_payload_up.append(int(wire_nbytes(reply.content[task.UPLOAD_KEY])))
            arrays_up.append(len(upload))
            metrics["reply-transit-s"] = max(0.0, time.time() - reply.metadata.created_at)
            client_metrics.append({"client_id": pid, "node_id": node.node_id, "num_train": node.num_train, **metrics})
        payload, server_state = self.algorithm.aggregate(server_state, uploads, ctx)
        train_time = time.perf_counter() - t0
        dense = int(self.algorithm.payload_bytes_dense(server_state))
        weights = [m["num_train"] for m in client_metrics]
        seen = int(sum(m.get("num_samples", 0.0) for m in client_metrics))
        wire_down = [exchange.wire_sent[p] for p in targets]
        record: dict[str, Any] = {
            "round": rnd,
            "sampled": list(sampled),
            "bytes_up": bytes_up,
            "bytes_down": [down] * len(targets),
            "bytes_dense_per_client": dense,
            "bytes_up_total": sum(bytes_up),
            "bytes_down_total": down * len(targets),
            "bytes_dense_total": dense * (len(targets) + len(participants)),
            "train_loss": _weighted_mean([m.get("loss") for m in client_metrics], weights),
            "train_accuracy": _weighted_mean([m.get("accuracy") for m in client_metrics], weights),
            "client_metrics": client_metrics,
            "global_test_accuracy": None,
            "personalized_val_accuracy": None,
            "personalized_val_accuracy_per_client": None,
            "train_time_s": train_time,
            "eval_time_s": 0.0,
            "samples_per_s": seen / train_time if train_time > 0 and seen else None,
            # the transport's own numbers
            "participants": participants,
            "failed": [
                {"partition_id": p, "node_id": self.partitions[p].node_id, "reason": r} for p, r in sorted(failures.items())
            ],
            "num_failed": len(failures),
            "wire_bytes_up": wire_up,
            "wire_bytes_down": wire_down,
            "wire_payload_bytes_up": wire_payload_up,
            "wire_payload_bytes_down": [wire_payload_down] * len(targets),
            "arrays_up": arrays_up,
            "arrays_down": len(payload_record),
            "wire_bytes_up_total": sum(wire_up),
            "wire_bytes_down_total": sum(wire_down),
            "wire_bytes_eval_total": 0,
        }
        return record, payload, server_state

    def _evaluate(self, rnd: int, server_state: Any) -> dict[str, Any]:
        from ..core.evaluation import accuracy_of

        t1 = time.perf_counter()
        out: dict[str, Any] = {}
        model = self.algorithm.global_model(server_state)
        if self.test is not None and model is not None:
            out["global_test_accuracy"] = accuracy_of(model, self.test[0], self.test[1], self.cfg.eval_batch_size)
        if self.cfg.evaluate_personalized:
            config = self._base_config(rnd, [])
            content: dict[str, Any] = {}
            if model is not None:
                recipe, content[task.GLOBAL_MODEL_KEY] = global_model_record(model)
                config["global-model-recipe"] = recipe
            online = {int(n) for n in self.grid.get_node_ids()}
            live = [p for p, n in sorted(self.partitions.items()) if n.failed_in is None and n.node_id in online]
            messages = {
                pid: Message(
                    RecordDict({task.CONFIG_KEY: ConfigRecord(config), **content}),
                    self.partitions[pid].node_id,
                    "evaluate",
                    group_id=str(rnd),
                )
                for pid in live
            }
            exchange = self._exchange(messages, self.cfg.round_timeout)
            self._handle_failures(f"round {rnd + 1} (evaluate)", exchange.failures, remaining=len(exchange.replies))
            per_client: list[float | None] = []
            for pid in sorted(self.partitions):
                reply = exchange.replies.get(pid)
                metrics = dict(reply.content[task.METRICS_KEY]) if reply is not None else {}
                per_client.append(metrics.get("personalized_val_accuracy"))
            valid = [a for a in per_client if a is not None and not math.isnan(a)]
            out["personalized_val_accuracy_per_client"] = per_client
            out["personalized_val_accuracy"] = sum(valid) / len(valid) if valid else None
            out["wire_bytes_eval_total"] = sum(exchange.wire_sent.values()) + sum(
                int(message_wire_nbytes(r)) for r in exchange.replies.values()
            )
        out["eval_time_s"] = time.perf_counter() - t1
        return out

    # -- the run -----------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        up = sum(r["bytes_up_total"] for r in self.history)
        down = sum(r["bytes_down_total"] for r in self.history)
        wire_up = sum(r["wire_bytes_up_total"] for r in self.history)
        wire_down = sum(r["wire_bytes_down_total"] for r in self.history)
        dense = sum(r["bytes_dense_total"] for r in self.history)
        last_global = next((r["global_test_accuracy"] for r in reversed(self.history) if r["global_test_accuracy"] is not None), None)
        return {
            "algorithm": self.cfg.algorithm,
            "rounds": len(self.history),
            "bytes_up_total": up,
            "bytes_down_total": down,
            "bytes_total": up + down,
            "bytes_dense_total": dense,
            "compression_ratio": dense / (up + down) if up + down > 0 else None,
            "wire_bytes_up_total": wire_up,
            "wire_bytes_down_total": wire_down,
            "wire_overhead_ratio": (wire_up + wire_down) / (up + down) if up + down > 0 else None,
            "final_global_test_accuracy": last_global,
            "mean_round_time_s": (sum(r["round_time_s"] for r in self.history) / len(self.history)) if self.history else None,
            "wall_time_s": time.perf_counter() - self.started,
        }

    def _summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "runner": "flower",
            "flower_run_id": self.flower_run_id,
            "mlflow_run_id": self.mlflow.run_id,
            "algorithm": self.cfg.algorithm,
            "algorithm_params": self.cfg.algorithm_params,
            "config": self.cfg.as_params(),
            "partitions": {
                str(p.partition_id): {"node_id": p.node_id, "num_train": p.num_train, "failed_in": p.failed_in}
                for p in self.partitions.values()
            },
            "totals": self.totals(),
            "history": self.history,
        }

    def run(self) -> dict[str, Any]:
        """Run every round; returns the summary (also written to ``output-dir``)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary_path = self.output_dir / SUMMARY_FILE
        model_path = self.output_dir / MODEL_FILE
        describe = getattr(self.algorithm, "describe", lambda: {"algorithm": self.cfg.algorithm})
        mlflow_status = "FAILED"
        try:
            self.mlflow.start(
                run_name=f"flower-{self.cfg.algorithm}-seed{self.cfg.seed}",
                params={**describe(), **self.cfg.as_params(), "runner": "flower"},
                tags={"runner": "flower", "flower.run_id": str(self.flower_run_id), "algorithm": self.cfg.algorithm},
            )
            self.status = "waiting-for-nodes"
            _write_json(summary_path, self._summary())
            self._query_partitions(self._wait_for_nodes())
            server_state, payload = self.algorithm.init_server(self.cfg.seed)
            self.status = "running"
            _write_json(summary_path, self._summary())
            logger.info(
                "%s over Flower: %d rounds, %d partitions, join ratio %.2f, seed %d, on-node-failure=%s",
                self.cfg.algorithm, self.cfg.num_rounds, len(self.partitions), self.cfg.join_ratio, self.cfg.seed,
                self.cfg.on_node_failure,
            )  # fmt: skip
            for rnd in range(self.cfg.num_rounds):
                t_round = time.perf_counter()
                record, payload, server_state = self._train_round(rnd, payload, server_state)
                if (rnd + 1) % self.cfg.eval_every == 0 or rnd == self.cfg.num_rounds - 1:
                    record.update(self._evaluate(rnd, server_state))
                record["round_time_s"] = time.perf_counter() - t_round
                self.history.append(record)
                self.mlflow.log_round(record)
                _write_json(summary_path, self._summary())
                logger.info(
                    "%s round %d/%d | partitions %s | loss %s | up %d B (wire %d) down %d B (wire %d) | global test %s | %.2fs",
                    self.cfg.algorithm, rnd + 1, self.cfg.num_rounds, record["participants"], _fmt(record["train_loss"]),
                    record["bytes_up_total"], record["wire_bytes_up_total"], record["bytes_down_total"],
                    record["wire_bytes_down_total"], _fmt(record["global_test_accuracy"]), record["round_time_s"],
                )  # fmt: skip
            model = self.algorithm.global_model(server_state)
            if model is not None:
                import torch

                from ..core.models import model_record

                torch.save(model_record(model), model_path)
                logger.info("Final global model saved to %s", model_path)
            self.status = "completed"
            mlflow_status = "FINISHED"
        except Exception as exc:
            self.status = "stopped" if isinstance(exc, NodeFailureError) else "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("Flower run %s: %s", self.status, self.error)
            raise
        finally:
            _write_json(summary_path, self._summary())
            self.mlflow.finish(self.totals(), mlflow_status, artifacts=[summary_path])
        totals = self.totals()
        logger.info(
            "%s done in %.1fs: %.3f MB up, %.3f MB down (core count); wire %.3f MB up, %.3f MB down; summary %s",
            self.cfg.algorithm, totals["wall_time_s"], totals["bytes_up_total"] / _MB, totals["bytes_down_total"] / _MB,
            totals["wire_bytes_up_total"] / _MB, totals["wire_bytes_down_total"] / _MB, summary_path,
        )  # fmt: skip
        return self._summary()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: parse the run config and run every round."""
    task.configure_logging()
    cfg = task.ServerRunConfig.from_run_config(context.run_config)
    FlowerServer(grid, cfg, flower_run_id=context.run_id).run()
