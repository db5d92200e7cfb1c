"""The ServerApp: the round engine with Flower carrying the payloads.

One run (``@app.main()``):

1. wait for ``min-nodes`` SuperNodes, send them a ``query`` and map each node's
   ``partition-id`` to its node id and training-set size (``messaging.NodeMessenger``);
2. build the algorithm from the run config (``core.algorithms.build_algorithm``);
3. run the core's ``RoundEngine`` -- the same loop, sampling, aggregation, byte counts,
   evaluation schedule and validation selection as the in-process runner -- over
   ``FlowerClients``, the transport that sends each sampled node a ``train`` message with
   the payload and, at evaluation rounds, every node an ``evaluate`` message with the
   global model: each node answers the global model's confusion counts on its validation
   split (pooled here into ``global_val_balanced_accuracy``, on which the global model is
   selected) and its personalized model's validation scores. The server holds no test set;
   test-set evaluation happens in the Kedro evaluation pipeline;
4. save the selected global model (``global_model.pt``) and the last round's
   (``global_model_last.pt``) with ``core.models.model_record``, and a JSON summary
   (history, totals, selection, wire sizes) to ``output-dir``, rewritten after every round.

History records are ``core.engine.RoundRecord``s (the in-process keys) plus the
transport's own: ``wire_bytes_up`` / ``wire_bytes_down`` (serialized Flower messages,
``records.message_wire_nbytes``), ``wire_payload_bytes_up`` / ``wire_payload_bytes_down``
(the payload ArrayRecord alone), ``arrays_up`` / ``arrays_down``, ``participants``,
``failed``, ``num_failed`` and ``wire_bytes_eval_total``. They go to MLflow under the same
metric names and steps (``tracking.round_metrics``) when a tracking URI is configured.

Secure aggregation: run config ``secure-aggregation = "secaggplus"`` replaces the train
exchange by one Flower SecAgg+ round (``secure_aggregation.SecAggPlusClients``): the
server learns only the sample-weighted mean of the nodes' dense updates. FedAvg family
only; FedMIC and other non-summable uploads are refused before the first round.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import secure_aggregation, task
from .messaging import NodeFailureError, NodeMessenger
from .records import message_wire_nbytes, payload_to_record, record_to_payload, wire_nbytes

__all__ = ["FlowerClients", "FlowerServer", "NodeFailureError", "app", "global_model_record", "message_config"]

logger = logging.getLogger(__name__)

app = ServerApp()

SUMMARY_FILE = "flower_summary.json"
MODEL_FILE = "global_model.pt"
LAST_MODEL_FILE = "global_model_last.pt"
_MB = 1024.0 * 1024.0


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


def message_config(cfg: task.ServerRunConfig, spec: Any, ctx: Any) -> dict[str, Any]:
    """The ``config`` ConfigRecord of a train/evaluate message: everything a node needs to
    rebuild the server's algorithm and the round's ``RoundContext``."""
    return {
        "algorithm": cfg.algorithm,
        "algorithm-params": json.dumps(cfg.algorithm_params, sort_keys=True),
        **task.spec_to_config(spec),
        "round": ctx.round,
        "num-rounds": cfg.num_rounds,
        "seed": cfg.seed,
        "device": cfg.device,
        "amp": cfg.amp,
        "eval-batch-size": cfg.eval_batch_size,
        "evaluate-personalized": cfg.evaluate_personalized,
        "num-clients": int(ctx.num_clients or 0),
        "total-train-samples": int(ctx.total_train_samples or 0),
        "sampled": [int(p) for p in ctx.sampled or ()],
    }


def global_model_record(model: Any) -> tuple[str, ArrayRecord]:
    """The global model for an ``evaluate`` message: its recipe (JSON) and weights."""
    from ..core.models import model_record

    saved = model_record(model)
    recipe = json.dumps({"architecture": saved["architecture"], "kwargs": saved["kwargs"]})
    return recipe, payload_to_record(saved["state_dict"])


class FlowerClients:
    """The hospitals' SuperNodes as the round engine's ``Transport``."""

    def __init__(self, messenger: NodeMessenger, cfg: task.ServerRunConfig, spec: Any, algorithm: Any, device: Any) -> None:
        self.messenger = messenger
        self.cfg = cfg
        self.spec = spec
        self.algorithm = algorithm
        self.device = device

    @property
    def partitions(self) -> Mapping[int, Any]:
        return self.messenger.partitions

    def _message(self, pid: int, content: Mapping[str, Any], kind: str, ctx: Any) -> Message:
        return Message(RecordDict(dict(content)), self.partitions[pid].node_id, kind, group_id=str(ctx.round))

    def live_targets(self, ctx: Any) -> tuple[list[int], dict[int, str]]:
        """The round's sampled partitions whose node is live, and why the others are skipped."""
        online = self.messenger.online()
        skipped: dict[int, str] = {}
        targets: list[int] = []
        for pid in ctx.sampled:
            node = self.partitions[pid]
            if node.failed_in is not None:
                skipped[pid] = f"excluded since it failed in {node.failed_in}"
            elif node.node_id not in online:
                skipped[pid] = "it is no longer connected to the SuperLink"
            else:
                targets.append(pid)
        return targets, skipped

    def train(self, ctx: Any, payloads: Mapping[int, dict[str, Any]]) -> Any:
        """Send each sampled, live node its payload; their uploads as ``ClientUpdate``s."""
        from ..core.engine import ClientUpdate, RoundUpdates
        from ..core.protocol import payload_nbytes

        targets, skipped = self.live_targets(ctx)
        config = ConfigRecord(message_config(self.cfg, self.spec, ctx))
        records: dict[int, ArrayRecord] = {}  # one record per distinct payload: the broadcast is serialized once
        for pid in targets:
            records.setdefault(id(payloads[pid]), payload_to_record(payloads[pid]))
        messages = {
            pid: self._message(pid, {task.CONFIG_KEY: config, task.PAYLOAD_KEY: records[id(payloads[pid])]}, "train", ctx)
            for pid in targets
        }
        exchange = self.messenger.exchange(messages, self.cfg.round_timeout)
        failures = {**skipped, **exchange.failures}
        participants = sorted(exchange.replies)
        self.messenger.handle_failures(f"round {ctx.round + 1} (train)", failures, remaining=len(participants))
        updates, wire_up, wire_payload_up, arrays_up = [], [], [], []
        for pid in participants:
            reply = exchange.replies[pid]
            upload = record_to_payload(reply.content[task.UPLOAD_KEY], self.device)
            metrics = dict(reply.content[task.METRICS_KEY])
            node = self.partitions[pid]
            if int(metrics.get("num-train", node.num_train)) != node.num_train:
                raise NodeFailureError(
                    f"Partition {pid} reported {metrics['num-train']} training samples in round {ctx.round + 1} but "
                    f"{node.num_train} in the query; its data changed during the run."
                )
            nbytes = payload_nbytes(upload)
            if int(metrics.get("payload-nbytes", nbytes)) != nbytes:
                raise NodeFailureError(
                    f"Partition {pid}: the upload has {nbytes} payload bytes on arrival but {metrics['payload-nbytes']} "
                    "when sent; the transport altered it."
                )
            metrics["reply-transit-s"] = max(0.0, time.time() - reply.metadata.created_at)
            updates.append(ClientUpdate(pid, upload, node.num_train, {"node_id": node.node_id, **metrics}))
            wire_up.append(int(message_wire_nbytes(reply)))
            wire_payload_up.append(int(wire_nbytes(reply.content[task.UPLOAD_KEY])))
            arrays_up.append(len(upload))
        wire_down = [exchange.wire_sent[p] for p in targets]
        transport = {
            "participants": participants,
            "failed": [
                {"partition_id": p, "node_id": self.partitions[p].node_id, "reason": r} for p, r in sorted(failures.items())
            ],
            "num_failed": len(failures),
            "wire_bytes_up": wire_up,
            "wire_bytes_down": wire_down,
            "wire_payload_bytes_up": wire_payload_up,
            "wire_payload_bytes_down": [int(wire_nbytes(records[id(payloads[p])])) for p in targets],
            "arrays_up": arrays_up,
            "arrays_down": [len(records[id(payloads[p])]) for p in targets],
            "wire_bytes_up_total": sum(wire_up),
            "wire_bytes_down_total": sum(wire_down),
            "wire_bytes_eval_total": 0,
        }
        return RoundUpdates(updates=updates, sent=targets, transport=transport)

    def evaluate(self, ctx: Any, server_state: Any, selector: Any) -> Any:
        """Every live node scores the global model and its personalized model on its own
        validation split; the global model's counts are pooled here."""
        from ..core.engine import RoundEvaluation

        model = self.algorithm.global_model(server_state)
        if model is None and not self.cfg.evaluate_personalized:
            return RoundEvaluation()
        config = message_config(self.cfg, self.spec, ctx)
        content: dict[str, Any] = {}
        if model is not None:
            recipe, content[task.GLOBAL_MODEL_KEY] = global_model_record(model)
            config["global-model-recipe"] = recipe
        content[task.CONFIG_KEY] = ConfigRecord(config)
        live = self.messenger.live_partitions()
        exchange = self.messenger.exchange({pid: self._message(pid, content, "evaluate", ctx) for pid in live}, self.cfg.round_timeout)
        self.messenger.handle_failures(f"round {ctx.round + 1} (evaluate)", exchange.failures, remaining=len(exchange.replies))
        k = self.spec.num_classes
        counts = np.zeros((k, k), dtype=np.int64) if model is not None else None
        accuracy: list[float] = []
        balanced: list[float] = []
        for pid in sorted(self.partitions):
            reply = exchange.replies.get(pid)
            metrics = dict(reply.content[task.METRICS_KEY]) if reply is not None else {}
            if counts is not None and "global-val-counts" in metrics:
                counts += np.asarray(metrics["global-val-counts"], dtype=np.int64).reshape(k, k)
            accuracy.append(float(metrics.get("personalized_val_accuracy", math.nan)))
            balanced.append(float(metrics.get("personalized_val_balanced_accuracy", math.nan)))
        wire = sum(exchange.wire_sent.values()) + sum(int(message_wire_nbytes(r)) for r in exchange.replies.values())
        personalized = self.cfg.evaluate_personalized
        return RoundEvaluation(
            global_counts=counts,
            personalized_accuracy=accuracy if personalized else None,
            personalized_balanced_accuracy=balanced if personalized else None,
            transport={"wire_bytes_eval_total": wire},
        )


def _submitted_app_sha256(grid: Any) -> str | None:
    """The FAB hash of this run as the SuperLink recorded it (what every site had to
    approve); None where the grid has no run (e.g. a test double)."""
    try:
        return str(grid.run.fab_hash) or None
    except Exception:  # noqa: BLE001 - informative only: never fail a run over it
        return None


class FlowerServer:
    """One Flower run over ``grid``: connect the nodes, run the engine, save the results."""

    def __init__(self, grid: Grid, cfg: task.ServerRunConfig, flower_run_id: int = 0) -> None:
        import torch

        from ..core.data import resolve_amp, resolve_device
        from ..tracking.round_metrics import MlflowRoundLogger

        self.cfg = cfg
        self.flower_run_id = flower_run_id
        self.app_sha256 = _submitted_app_sha256(grid)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.use_amp = resolve_amp(cfg.amp, self.device)
        self.spec = task.load_data_spec(cfg.data_dir)
        self.algorithm = task.build_algorithm_for(cfg.algorithm, cfg.algorithm_params, self.spec, self.device)
        self.messenger = NodeMessenger(
            grid, min_nodes=cfg.min_nodes, node_wait_timeout=cfg.node_wait_timeout, on_node_failure=cfg.on_node_failure
        )
        self.state: Any = None
        self.output_dir = cfg.output_dir
        self.mlflow = MlflowRoundLogger(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
        self.status = "starting"
        self.error: str | None = None
        self.started = time.perf_counter()

    @property
    def partitions(self) -> Mapping[int, Any]:
        return self.messenger.partitions

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history if self.state is not None else []

    def totals(self) -> dict[str, Any]:
        """The engine's run totals plus the wire's (bytes as serialized, overhead, round time)."""
        from ..core.engine import EngineState, history_totals

        state = self.state or EngineState(server_state={}, payload={})
        out = history_totals(self.cfg.algorithm, state)
        up, down = out["bytes_up_total"], out["bytes_down_total"]
        wire_up = sum(r["wire_bytes_up_total"] for r in self.history)
        wire_down = sum(r["wire_bytes_down_total"] for r in self.history)
        out.update(
            wire_bytes_up_total=wire_up,
            wire_bytes_down_total=wire_down,
            wire_overhead_ratio=(wire_up + wire_down) / (up + down) if up + down > 0 else None,
            mean_round_time_s=(sum(r["round_time_s"] for r in self.history) / len(self.history)) if self.history else None,
            wall_time_s=time.perf_counter() - self.started,
        )
        return out

    def _summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "runner": "flower",
            "flower_run_id": self.flower_run_id,
            "app_sha256": self.app_sha256,
            "mlflow_run_id": self.mlflow.run_id,
            "algorithm": self.cfg.algorithm,
            "algorithm_params": self.cfg.algorithm_params,
            "config": self.cfg.as_params(),
            "partitions": {
                str(p.partition_id): {"node_id": p.node_id, "num_train": p.num_train, "failed_in": p.failed_in}
                for p in self.partitions.values()
            },
            "selection": self.state.selector.summary() if self.state is not None else None,
            "totals": self.totals(),
            "history": self.history,
        }

    def _write_summary(self) -> None:
        _write_json(self.output_dir / SUMMARY_FILE, self._summary())

    def _save_models(self) -> None:
        """Both models, each written atomically: a server killed mid-save leaves the previous
        file or none, never a truncated one that `torch.load` half-reads or refuses."""
        import io

        import torch

        from ..core.models import model_record
        from ..core.selection import ValidationSelector
        from ..datasets.atomic import write_bytes_atomically

        def save(record: dict[str, Any], filename: str) -> None:
            buffer = io.BytesIO()
            torch.save(record, buffer)
            write_bytes_atomically(self.output_dir / filename, buffer.getvalue())

        last = self.algorithm.global_model(self.state.server_state)
        if last is None:
            return
        save(model_record(last), LAST_MODEL_FILE)
        selected = ValidationSelector.materialise(last, self.state.selector.global_best)
        save(model_record(selected), MODEL_FILE)
        logger.info(
            "Global model of round %s (selected on validation) saved to %s, the last round's to %s",
            self.state.selector.summary()["global_round"] or "-", self.output_dir / MODEL_FILE,
            self.output_dir / LAST_MODEL_FILE,
        )  # fmt: skip

    def run(self) -> dict[str, Any]:
        """Run every round; returns the summary (also written to ``output-dir``)."""
        from ..core.callbacks import OnRound, RoundLogger
        from ..core.engine import RoundEngine

        self.output_dir.mkdir(parents=True, exist_ok=True)
        describe = getattr(self.algorithm, "describe", lambda: {"algorithm": self.cfg.algorithm})
        mlflow_status = "FAILED"
        try:
            self.mlflow.start(
                run_name=f"flower-{self.cfg.algorithm}-seed{self.cfg.seed}",
                params={**describe(), **self.cfg.as_params(), "runner": "flower"},
                tags={"runner": "flower", "flower.run_id": str(self.flower_run_id), "algorithm": self.cfg.algorithm},
            )
            secure_aggregation.check_supported(self.cfg.secure_aggregation, self.cfg.algorithm, self.algorithm)
            self.status = "waiting-for-nodes"
            self._write_summary()
            partitions = self.messenger.connect()
            transport: Any = FlowerClients(self.messenger, self.cfg, self.spec, self.algorithm, self.device)
            if self.cfg.secure_aggregation == "secaggplus":
                transport = secure_aggregation.SecAggPlusClients(transport)
            engine = RoundEngine(
                self.algorithm, self.cfg.simulation_config(), transport,
                {pid: node.num_train for pid, node in partitions.items()},
                device=self.device, use_amp=self.use_amp,
                callbacks=[RoundLogger(), self.mlflow, OnRound(lambda record: self._write_summary())],
            )  # fmt: skip
            self.state = engine.start()
            self.status = "running"
            self._write_summary()
            logger.info(
                "%s over Flower: %d rounds, %d partitions, join ratio %.2f, seed %d, on-node-failure=%s",
                self.cfg.algorithm, self.cfg.num_rounds, len(partitions), self.cfg.join_ratio, self.cfg.seed,
                self.cfg.on_node_failure,
            )  # fmt: skip
            engine.run(self.state)
            self._save_models()
            self.status = "completed"
            mlflow_status = "FINISHED"
        except Exception as exc:
            self.status = "stopped" if isinstance(exc, NodeFailureError) else "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("Flower run %s: %s", self.status, self.error)
            raise
        finally:
            self._write_summary()
            self.mlflow.finish(self.totals(), mlflow_status, artifacts=[self.output_dir / SUMMARY_FILE])
        totals = self.totals()
        logger.info(
            "%s done in %.1fs: %.3f MB up, %.3f MB down (core count); wire %.3f MB up, %.3f MB down; summary %s",
            self.cfg.algorithm, totals["wall_time_s"], totals["bytes_up_total"] / _MB, totals["bytes_down_total"] / _MB,
            totals["wire_bytes_up_total"] / _MB, totals["wire_bytes_down_total"] / _MB, self.output_dir / SUMMARY_FILE,
        )  # fmt: skip
        return self._summary()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: parse the run config and run every round."""
    from .latency import apply_pull_backoff_from_env

    task.configure_logging()
    apply_pull_backoff_from_env()
    cfg = task.ServerRunConfig.from_run_config(context.run_config)
    FlowerServer(grid, cfg, flower_run_id=context.run_id).run()
