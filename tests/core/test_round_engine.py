"""The round engine on its own: a hand-written transport, callbacks, the round record.

Prepare / execute / assert without a network (Flower's ``fedavgm_test.py`` style): the
transports below are the smallest that exercise what the engine owns (sampling, context,
aggregation, byte accounting, the evaluation schedule, selection, callbacks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.engine import (
    Callback,
    ClientUpdate,
    RoundEngine,
    RoundEvaluation,
    RoundUpdates,
    SimulationConfig,
    sample_clients,
)
from fedmic_pipeline.core.protocol import ClientData, DataSpec, RoundContext, payload_nbytes
from fedmic_pipeline.core.simulation import run_simulation

from .conftest import TINY_STUDENT

PARAMS = {"model_options": TINY_STUDENT, "local_epochs": 1, "batch_size": 16}


class LocalClients:
    """Calls ``client_update`` in this process; drops ``unreachable`` after they got the payload."""

    def __init__(self, algorithm: Any, clients: list[ClientData], unreachable: frozenset[int] = frozenset()) -> None:
        self.algorithm = algorithm
        self.by_id = {c.client_id: c for c in clients}
        self.states = {c.client_id: algorithm.init_client(c.client_id, c, 0) for c in clients}
        self.unreachable = unreachable
        self.contexts: list[RoundContext] = []
        self.evaluated: list[int] = []

    def train(self, ctx: RoundContext, payloads: dict) -> RoundUpdates:
        self.contexts.append(ctx)
        updates = []
        for cid, payload in payloads.items():
            if cid in self.unreachable:
                continue
            upload, self.states[cid], metrics = self.algorithm.client_update(self.states[cid], self.by_id[cid], payload, ctx)
            updates.append(ClientUpdate(cid, upload, self.by_id[cid].num_train, metrics))
        return RoundUpdates(updates=updates, sent=list(payloads), transport={"dropped": sorted(self.unreachable)})

    def evaluate(self, ctx: RoundContext, server_state: dict, selector: Any) -> RoundEvaluation:
        self.evaluated.append(ctx.round)
        k = 3
        # a planted score: round 1 looks best, so the selector must keep round 1's weights
        counts = np.eye(k, dtype=np.int64) * 10 if ctx.round == 1 else np.full((k, k), 3, dtype=np.int64)
        return RoundEvaluation(global_counts=counts, personalized_accuracy=[0.5, float("nan"), 1.0])


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_train_begin(self, engine, state) -> None:
        self.events.append(("begin", state.rounds_completed))

    def after_round(self, engine, state, record) -> None:
        self.events.append(("round", record["round"]))

    def on_train_end(self, engine, state, status) -> None:
        self.events.append(("end", status))


def _engine(spec: DataSpec, clients: list[ClientData], config: SimulationConfig, **kwargs: Any) -> tuple[RoundEngine, Any, Recorder]:
    algorithm = build_algorithm("fedavg", PARAMS, spec)
    transport = LocalClients(algorithm, clients, **kwargs)
    recorder = Recorder()
    engine = RoundEngine(
        algorithm, config, transport, {c.client_id: c.num_train for c in clients}, device=torch.device("cpu"),
        callbacks=[recorder],
    )  # fmt: skip
    return engine, transport, recorder


def test_the_engine_owns_sampling_context_schedule_and_selection(spec: DataSpec, clients: list[ClientData]) -> None:
    config = SimulationConfig(num_rounds=4, join_ratio=0.67, seed=3, eval_every=2, device="cpu")
    engine, transport, recorder = _engine(spec, clients, config)

    state = engine.run()

    for rnd, ctx in enumerate(transport.contexts):
        assert ctx.sampled == tuple(sample_clients([0, 1, 2], 0.67, 3, rnd))
        assert (ctx.num_clients, ctx.total_train_samples) == (3, sum(c.num_train for c in clients))
        with pytest.raises(dataclasses.FrozenInstanceError):
            ctx.round = 99  # type: ignore[misc]
    assert transport.evaluated == [1, 3]  # every eval_every-th round and the last
    assert [r["global_val_balanced_accuracy"] is not None for r in state.history] == [False, True, False, True]
    assert state.history[1]["global_val_balanced_accuracy"] == pytest.approx(1.0)
    assert state.history[1]["personalized_val_accuracy"] == pytest.approx(0.75)  # NaN hospitals left out
    assert state.selector.summary()["global_round"] == 2  # 1-based: the planted best round
    assert recorder.events == [("begin", 0), ("round", 0), ("round", 1), ("round", 2), ("round", 3), ("end", "completed")]


def test_a_client_that_received_but_did_not_answer_counts_down_not_up(spec: DataSpec, clients: list[ClientData]) -> None:
    config = SimulationConfig(num_rounds=1, device="cpu", evaluate_personalized=False)
    engine, _, _ = _engine(spec, clients, config, unreachable=frozenset({1}))

    record = engine.run().history[0]

    dense = record["bytes_dense_per_client"]
    assert record["sampled"] == [0, 1, 2] and [m["client_id"] for m in record["client_metrics"]] == [0, 2]
    assert len(record["bytes_down"]) == 3 and len(record["bytes_up"]) == 2
    assert record["bytes_dense_total"] == dense * (3 + 2)
    assert record["bytes_up_total"] == sum(record["bytes_up"]) == 2 * dense  # FedAvg uploads the dense state
    assert record["dropped"] == [1]  # the transport's own field sits beside the engine's


def test_callbacks_hear_a_failed_round_and_the_history_keeps_the_rounds_done(spec: DataSpec, clients: list[ClientData]) -> None:
    config = SimulationConfig(num_rounds=3, device="cpu")
    engine, transport, recorder = _engine(spec, clients, config)
    real_train = transport.train

    def failing_train(ctx: RoundContext, payloads: dict) -> RoundUpdates:
        if ctx.round == 1:
            raise RuntimeError("node lost")
        return real_train(ctx, payloads)

    transport.train = failing_train
    state = engine.start()
    with pytest.raises(RuntimeError, match="node lost"):
        engine.run(state)
    assert recorder.events == [("begin", 0), ("round", 0), ("end", "failed")]
    assert state.rounds_completed == 1 and len(state.history) == 1


def test_in_process_runner_is_the_engine_over_local_clients(spec: DataSpec, clients: list[ClientData]) -> None:
    config = SimulationConfig(num_rounds=2, seed=1, device="cpu", evaluate_personalized=False)
    engine, _, _ = _engine(spec, clients, config)
    by_engine = engine.run()
    by_runner = run_simulation(build_algorithm("fedavg", PARAMS, spec), clients, spec, config)

    for ours, theirs in zip(by_engine.history, by_runner.history, strict=True):
        assert ours["train_loss"] == theirs["train_loss"]
        assert ours["bytes_up"] == theirs["bytes_up"] and ours["bytes_down"] == theirs["bytes_down"]
    final = by_runner.last_global_model().state_dict()
    for key, value in by_engine.server_state["model"].state_dict().items():
        assert torch.equal(value, final[key]), key
    assert payload_nbytes(by_engine.payload) == by_runner.history[-1]["bytes_dense_per_client"]
