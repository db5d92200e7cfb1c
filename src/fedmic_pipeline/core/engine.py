"""The round engine: the federated round loop, written once.

Every runner trains through ``RoundEngine.run``: the in-process simulation
(``core/simulation.py``), the Flower ServerApp (``flower/server_app.py``) and the throughput
benchmark. What differs between them is *where the clients' work happens*, so that is the
one thing they supply, as a ``Transport``:

* ``train(ctx, payloads)``: run ``client_update`` for the round's sampled clients, each on
  its own payload (in this process, or by sending Flower messages), and return their
  ``ClientUpdate``s;
* ``evaluate(ctx, server_state, selector)``: score the global model on the hospitals'
  validation splits (pooled confusion counts) and each hospital's personalized model on
  its own split.

The engine owns everything else, so it cannot drift between runners: client sampling
(``sample_clients``: seeded by (seed, round), resumable), the frozen ``RoundContext``,
aggregation, the exact byte accounting, the evaluation schedule, validation selection of
the global model, the ``RoundRecord`` of every round and the run totals. Extras (progress
bars, round logs, checkpoints, MLflow, a Flower summary file) are ``Callback``s
(``core/callbacks.py`` and the runners' own), called at the start, after every round and
at the end, in the style of pfl-research's callbacks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .data import CLIENT_SAMPLING, amp_dtype, resolve_device
from .protocol import ClientState, ConfigurationError, FederatedAlgorithm, Payload, RoundContext, ServerState, payload_nbytes
from .selection import ValidationSelector, balanced_accuracy_from_counts

__all__ = [
    "TIMING_KEYS",
    "Callback",
    "ClientUpdate",
    "EngineState",
    "RoundEngine",
    "RoundEvaluation",
    "RoundRecord",
    "RoundUpdates",
    "SimulationConfig",
    "Transport",
    "history_totals",
    "sample_clients",
]

#: History fields measured by the clock: the only ones that differ between identical runs.
TIMING_KEYS: tuple[str, ...] = ("train_time_s", "eval_time_s", "round_time_s", "samples_per_s")
PROGRESS_KINDS = ("none", "tqdm", "rich")
VECTORIZE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class SimulationConfig:
    """How the federation runs (the algorithm's own hyper-parameters live in its config).

    join_ratio: the fraction of clients sampled per round, 0 < r <= 1; a round samples
    max(1, floor(r * K)) clients (McMahan et al.'s C). eval_every: score the global and
    the personalized models on the validation splits every that many rounds (and always
    after the last); only scored rounds can be selected. amp: 'auto' = autocast on CUDA
    only. num_threads: if set, ``torch.set_num_threads`` for the run (a process-wide
    setting, so it is opt-in). min_val_per_class: see ``core/selection.py``.
    vectorize_clients: train a round's in-process clients together (``core/vectorized.py``,
    equal to the sequential loop to floating-point tolerance): 'auto' = on CUDA only (on
    this project's CPUs it measured slower than the sequential loop), 'always', or 'never'
    (one after another, bit for bit the sequential results).
    """

    num_rounds: int = 10
    join_ratio: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 1024
    evaluate_global: bool = True
    evaluate_personalized: bool = True
    progress: str = "none"
    min_train_samples: int = 2
    num_threads: int | None = None
    min_val_per_class: int = 5
    vectorize_clients: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ConfigurationError(f"num_rounds must be an integer >= 1, got {self.num_rounds!r}.")
        if not isinstance(self.join_ratio, (int, float)) or not 0.0 < float(self.join_ratio) <= 1.0:
            raise ConfigurationError(
                f"join_ratio must be in (0, 1] (the fraction of clients sampled per round), got {self.join_ratio!r}."
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigurationError(f"seed must be an integer >= 0, got {self.seed!r}.")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ConfigurationError(f"eval_every must be an integer >= 1, got {self.eval_every!r}.")
        if self.eval_batch_size < 1:
            raise ConfigurationError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        if self.progress not in PROGRESS_KINDS:
            raise ConfigurationError(f"progress must be one of {', '.join(PROGRESS_KINDS)}, got '{self.progress}'.")
        if self.min_train_samples < 1:
            raise ConfigurationError(f"min_train_samples must be >= 1, got {self.min_train_samples}.")
        if not isinstance(self.min_val_per_class, int) or self.min_val_per_class < 1:
            raise ConfigurationError(f"min_val_per_class must be an integer >= 1, got {self.min_val_per_class!r}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigurationError(f"num_threads must be >= 1 or null, got {self.num_threads}.")
        resolve_device(self.device)  # unknown names and missing CUDA fail here, not mid-run
        if self.vectorize_clients not in VECTORIZE_MODES:
            raise ConfigurationError(
                f"vectorize_clients must be one of {', '.join(VECTORIZE_MODES)}, got '{self.vectorize_clients}'."
            )
        if str(self.amp).lower() not in ("auto", "on", "off"):
            raise ConfigurationError(f"amp must be 'auto', 'on' or 'off', got '{self.amp}'.")

    def evaluates(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` (0-based) is scored: every ``eval_every``-th and the last."""
        return (round_idx + 1) % self.eval_every == 0 or round_idx == self.num_rounds - 1


def sample_clients(client_ids: Sequence[int], join_ratio: float, seed: int, round_idx: int) -> list[int]:
    """The sorted ids sampled in ``round_idx``: max(1, floor(join_ratio * K)) without
    replacement from a numpy Generator seeded by (seed, round, tag); all when that is K."""
    ids = list(client_ids)
    m = max(1, math.floor(join_ratio * len(ids) + 1e-9))
    if m >= len(ids):
        return sorted(ids)
    rng = np.random.default_rng([seed, round_idx, CLIENT_SAMPLING])
    return sorted(ids[i] for i in rng.choice(len(ids), size=m, replace=False))


@dataclass(frozen=True)
class ClientUpdate:
    """One client's answer to a round: its upload, the aggregation weight, its metrics."""

    client_id: int
    upload: Payload
    num_train: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class RoundUpdates:
    """What a transport returns for one round's training.

    ``sent``: the clients their payload reached (more than the answering ones when a node
    failed after receiving it: its download still happened). ``transport``: the runner's
    own record fields (Flower's wire sizes and failures), merged into the round record.
    """

    updates: list[ClientUpdate]
    sent: list[int]
    transport: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundEvaluation:
    """Validation scores of one round, as a transport measured them.

    ``global_counts``: the global model's confusion counts on all hospitals' validation
    splits pooled (None when there is no global model or it is not scored); per-hospital
    lists hold NaN where a hospital's personalized model was not scored.
    """

    global_counts: np.ndarray | None = None
    personalized_accuracy: Sequence[float] | None = None
    personalized_balanced_accuracy: Sequence[float] | None = None
    transport: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """One round of the history (``as_dict`` is what histories, checkpoints and tables hold).

    Bytes are ``payload_nbytes`` of the very dicts passed: ``bytes_up`` per answering
    client, ``bytes_down`` per client reached (its own payload: ``payload_for``), ``bytes_dense_per_client`` FedAvg's size of
    the shared model one way and ``bytes_dense_total`` that for every message sent or
    received. Train metrics are sample-weighted over the answering clients; the
    personalized ones are unweighted means over hospitals.
    """

    round: int
    sampled: list[int]
    bytes_up: list[int]
    bytes_down: list[int]
    bytes_dense_per_client: int
    bytes_up_total: int
    bytes_down_total: int
    bytes_dense_total: int
    train_loss: float | None
    train_accuracy: float | None
    client_metrics: list[dict[str, Any]]
    lr: float | None
    global_val_accuracy: float | None = None
    global_val_balanced_accuracy: float | None = None
    personalized_val_accuracy: float | None = None
    personalized_val_balanced_accuracy: float | None = None
    personalized_val_accuracy_per_client: list[float] | None = None
    personalized_val_balanced_accuracy_per_client: list[float] | None = None
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    round_time_s: float = 0.0
    samples_per_s: float | None = None
    transport: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The plain record: the fields above with the transport's own fields beside them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "transport"}
        out.update(self.transport)
        return out


@dataclass
class EngineState:
    """Where a run stands: everything a checkpoint holds and a resumed run continues from.

    ``client_states`` is filled only where the clients live in this process; over Flower
    each node keeps its own.
    """

    server_state: ServerState
    payload: Payload
    client_states: dict[int, ClientState] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    selector: ValidationSelector = field(default_factory=ValidationSelector)
    rounds_completed: int = 0
    elapsed_s: float = 0.0


class Transport(Protocol):
    """Where clients do their work (see the module docstring)."""

    def train(self, ctx: RoundContext, payloads: Mapping[int, Payload]) -> RoundUpdates: ...

    def evaluate(self, ctx: RoundContext, server_state: ServerState, selector: ValidationSelector) -> RoundEvaluation: ...


class Callback:
    """Extras around the loop; override what you need (every hook is a no-op here).

    ``on_train_end`` runs also when a round raised (``status`` 'failed'), so a callback
    can close what it opened; it must not raise itself.
    """

    def on_train_begin(self, engine: RoundEngine, state: EngineState) -> None:
        """Before the first round of this call (after a resume: the next round)."""

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        """After each round, once ``record`` is in ``state.history``."""

    def on_train_end(self, engine: RoundEngine, state: EngineState, status: str) -> None:
        """After the last round ('completed') or when a round raised ('failed')."""


def _weighted_mean(values: Sequence[float | None], weights: Sequence[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def _nan_mean(values: Sequence[float | None]) -> float | None:
    valid = [v for v in values if v is not None and not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


class RoundEngine:
    """Runs ``config.num_rounds`` rounds of ``algorithm`` over ``transport``.

    ``client_sizes``: every client's training-set size by id (the clients that can be
    sampled; for the pooled centralized reference, the one pooled client). ``pooled``:
    sample every client every round, whatever the join ratio.
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        config: SimulationConfig,
        transport: Transport,
        client_sizes: Mapping[int, int],
        *,
        device: torch.device,
        use_amp: bool = False,
        pooled: bool = False,
        num_clients: int | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.algorithm = algorithm
        self.config = config
        self.transport = transport
        self.client_ids = sorted(client_sizes)
        self.total_train_samples = int(sum(client_sizes.values()))
        self.num_clients = len(self.client_ids) if num_clients is None else num_clients
        self.device = device
        self.use_amp = use_amp
        self.pooled = pooled
        self.callbacks = list(callbacks)

    def start(self) -> EngineState:
        """A fresh run: the algorithm's initial server state and first payload."""
        server_state, payload = self.algorithm.init_server(self.config.seed)
        return EngineState(server_state=server_state, payload=payload, selector=ValidationSelector(self.config.min_val_per_class))

    def context(self, round_idx: int) -> RoundContext:
        """The frozen context of round ``round_idx`` (who is sampled is decided here)."""
        c = self.config
        sampled = self.client_ids if self.pooled else sample_clients(self.client_ids, c.join_ratio, c.seed, round_idx)
        return RoundContext(
            round=round_idx,
            num_rounds=c.num_rounds,
            seed=c.seed,
            device=self.device,
            use_amp=self.use_amp,
            amp_dtype=amp_dtype(self.device) if self.use_amp else None,
            sampled=tuple(sampled),
            num_clients=self.num_clients,
            total_train_samples=self.total_train_samples,
        )

    def run(self, state: EngineState | None = None) -> EngineState:
        """Every remaining round (all of them for a fresh ``state``); returns the state."""
        state = self.start() if state is None else state
        started, elapsed_before = time.perf_counter(), state.elapsed_s
        for callback in self.callbacks:
            callback.on_train_begin(self, state)
        status = "failed"
        try:
            for round_idx in range(state.rounds_completed, self.config.num_rounds):
                record = self._round(round_idx, state)
                state.history.append(record.as_dict())
                state.rounds_completed = round_idx + 1
                state.elapsed_s = elapsed_before + time.perf_counter() - started
                for callback in self.callbacks:
                    callback.after_round(self, state, state.history[-1])
            status = "completed"
        finally:
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_train_end(self, state, status)
        return state

    def _round(self, round_idx: int, state: EngineState) -> RoundRecord:
        ctx = self.context(round_idx)
        t0 = time.perf_counter()
        payloads = {cid: self.algorithm.payload_for(cid, state.payload, state.server_state) for cid in ctx.sampled or ()}
        answer = self.transport.train(ctx, payloads)
        updates = answer.updates
        state.payload, state.server_state = self.algorithm.aggregate(
            state.server_state, [(u.upload, u.num_train) for u in updates], ctx
        )
        train_time = time.perf_counter() - t0
        dense = int(self.algorithm.payload_bytes_dense(state.server_state))
        client_metrics = [{"client_id": u.client_id, "num_train": u.num_train, **u.metrics} for u in updates]
        weights = [u.num_train for u in updates]
        seen = int(sum(m.get("num_samples", 0.0) for m in client_metrics))
        bytes_up = [payload_nbytes(u.upload) for u in updates]
        bytes_down = [payload_nbytes(payloads[cid]) for cid in answer.sent]
        record = RoundRecord(
            round=round_idx,
            sampled=list(ctx.sampled or ()),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            bytes_dense_per_client=dense,
            bytes_up_total=sum(bytes_up),
            bytes_down_total=sum(bytes_down),
            bytes_dense_total=dense * (len(answer.sent) + len(updates)),
            train_loss=_weighted_mean([m.get("loss") for m in client_metrics], weights),
            train_accuracy=_weighted_mean([m.get("accuracy") for m in client_metrics], weights),
            client_metrics=client_metrics,
            lr=self.algorithm.round_lr(ctx) if hasattr(self.algorithm, "round_lr") else None,
            train_time_s=train_time,
            samples_per_s=seen / train_time if train_time > 0 and seen else None,
            transport=dict(answer.transport),
        )
        if self.config.evaluates(round_idx):
            t1 = time.perf_counter()
            self._score(record, self.transport.evaluate(ctx, state.server_state, state.selector), state)
            record.eval_time_s = time.perf_counter() - t1
        record.round_time_s = time.perf_counter() - t0
        return record

    def _score(self, record: RoundRecord, evaluation: RoundEvaluation, state: EngineState) -> None:
        """Fill the validation fields and offer the global model to the selector."""
        counts = evaluation.global_counts
        if counts is not None and int(counts.sum()) > 0:
            record.global_val_accuracy = float(np.trace(counts)) / int(counts.sum())
            record.global_val_balanced_accuracy = balanced_accuracy_from_counts(counts)
            model = self.algorithm.global_model(state.server_state)
            if model is not None:
                state.selector.offer_global(record.round, record.global_val_balanced_accuracy, model)
        if evaluation.personalized_accuracy is not None:
            record.personalized_val_accuracy_per_client = list(evaluation.personalized_accuracy)
            record.personalized_val_accuracy = _nan_mean(evaluation.personalized_accuracy)
        if evaluation.personalized_balanced_accuracy is not None:
            record.personalized_val_balanced_accuracy_per_client = list(evaluation.personalized_balanced_accuracy)
            record.personalized_val_balanced_accuracy = _nan_mean(evaluation.personalized_balanced_accuracy)
        record.transport.update(evaluation.transport)


def _last(history: Sequence[Mapping[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(history) if r.get(key) is not None), None)


def history_totals(algorithm_name: str, state: EngineState) -> dict[str, Any]:
    """Run-level numbers: bytes in each direction, dense bytes, last and selected scores."""
    history = state.history
    up = sum(r["bytes_up_total"] for r in history)
    down = sum(r["bytes_down_total"] for r in history)
    selection = state.selector.summary()
    return {
        "algorithm": algorithm_name,
        "rounds": len(history),
        "bytes_up_total": up,
        "bytes_down_total": down,
        "bytes_total": up + down,
        "bytes_dense_total": sum(r["bytes_dense_total"] for r in history),
        "compression_ratio": (sum(r["bytes_dense_total"] for r in history) / (up + down)) if up + down > 0 else None,
        "last_global_val_balanced_accuracy": _last(history, "global_val_balanced_accuracy"),
        "last_personalized_val_balanced_accuracy": _last(history, "personalized_val_balanced_accuracy"),
        "selected_global_round": selection["global_round"],
        "selected_global_val_balanced_accuracy": selection["global_val_balanced_accuracy"],
        "wall_time_s": state.elapsed_s,
    }
