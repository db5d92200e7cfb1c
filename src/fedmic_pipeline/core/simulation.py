"""The in-process runner: any ``FederatedAlgorithm`` over a list of ClientData.

The round loop is the engine's (``core/engine.py``); this module supplies the clients as
an in-process ``Transport`` (``InProcessClients``: ``client_update`` called directly on
resident tensors, the hospitals' validation splits scored here), the checks that run
before the first round (``validate_setup``) and the result object.

The runner never sees a test set. Every evaluated round scores the global model and each
hospital's personalized model on the hospitals' *validation* splits, and a
``ValidationSelector`` keeps the best round's weights (``core/selection.py``): the result's
``global_model()`` and ``personalized_model()`` are those selected models, and
``last_global_model()`` / ``last_personalized_model()`` the final round's, reported beside.
The runner measures, never estimates: the bytes down and up of every sampled client are
``payload_nbytes`` of the very dicts passed, beside the dense FedAvg size of the same
shared model (``payload_bytes_dense``).

Determinism (bit-identical metric histories for the same seed on the CPU):
* client sampling: ``numpy.random.default_rng`` seeded from (seed, round, tag), so the
  clients of round t do not depend on how earlier rounds were drawn (resumable);
* local batches: every algorithm draws them from ``round_generator(seed, round, client)``;
* models are initialised from forked, seeded RNGs; nothing reads the global RNG.
On CUDA, cuDNN kernels may be non-deterministic; results then agree only statistically.

Validation happens before the first round (``validate_setup``): bad config values, empty
or too small clients, more clients than samples, shapes or labels that contradict the
DataSpec, duplicate client ids, a progress bar library that is not installed.

The centralized reference (``algorithm.pools_clients``) runs on one pooled "client"
(id -1) made of all clients' data, every round; its personalized model is evaluated on
each hospital's own validation split like every other method's.

Resuming (optional keyword arguments of ``run_simulation``): with ``checkpoint_every`` N
the runner hands a checkpoint dict (``checkpoint.build_checkpoint``, via the
``callbacks.Checkpointer``) to ``on_checkpoint`` after every N-th round (not after the
last: the result itself is then returned), before ``on_round``; ``resume_from`` continues a run from such a dict after checking its
fingerprint. Because every stream is keyed by (seed, round, client), the resumed rounds
are the very rounds the uninterrupted run would have trained: the history and models
end bit-identical on the CPU (timing fields aside).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .callbacks import Checkpointer, OnRound, ProgressBar, RoundLogger, fmt
from .checkpoint import check_checkpoint, restore_rng_state, run_fingerprint
from .data import move_client, pool_clients, resolve_amp, resolve_device
from .engine import (
    TIMING_KEYS,
    Callback,
    ClientUpdate,
    EngineState,
    RoundEngine,
    RoundEvaluation,
    RoundUpdates,
    SimulationConfig,
    history_totals,
    sample_clients,
)
from .evaluation import compute_metrics, predict_proba, summarize_sites
from .protocol import (
    ClientData,
    ClientState,
    ConfigurationError,
    DataSpec,
    FederatedAlgorithm,
    Payload,
    RoundContext,
    ServerState,
)
from .selection import ValidationSelector, balanced_accuracy_from_counts, validation_counts

__all__ = [
    "TIMING_KEYS",
    "CheckpointCallback",
    "InProcessClients",
    "RoundCallback",
    "SimulationConfig",
    "SimulationResult",
    "evaluate_result",
    "run_simulation",
    "sample_clients",
    "validate_setup",
]

logger = logging.getLogger(__name__)

#: on_round(record) is called after every round with that round's history record.
RoundCallback = Callable[[dict[str, Any]], None]
#: on_checkpoint(checkpoint) receives a checkpoint dict that references live models:
#: serialise it before returning (``checkpoint.serialize_checkpoint``).
CheckpointCallback = Callable[[dict[str, Any]], None]
_MB = 1024.0 * 1024.0


@dataclass
class SimulationResult:
    """Everything a run produced, in plain containers (history is a list of dicts)."""

    algorithm: FederatedAlgorithm
    config: SimulationConfig
    history: list[dict[str, Any]]
    server_state: ServerState
    client_states: dict[int, ClientState]
    client_ids: list[int]
    pooled: bool
    wall_time_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    selector: ValidationSelector = field(default_factory=ValidationSelector)

    def last_global_model(self) -> nn.Module | None:
        """The shared model after the last round (None for methods without one)."""
        return self.algorithm.global_model(self.server_state)

    def global_model(self) -> nn.Module | None:
        """The shared model of the round with the best pooled validation score."""
        model = self.last_global_model()
        return None if model is None else ValidationSelector.materialise(model, self.selector.global_best)

    def last_personalized_model(self, client_id: int) -> nn.Module:
        """The model hospital ``client_id`` holds after the last round (pooled for centralized)."""
        state = self.client_states[next(iter(self.client_states))] if self.pooled else self.client_states[client_id]
        return self.algorithm.personalized_model(state, self.server_state)

    def personalized_model(self, client_id: int) -> nn.Module:
        """Hospital ``client_id``'s model of its best round on its own validation split."""
        model = self.last_personalized_model(client_id)
        return ValidationSelector.materialise(model, self.selector.personal_best.get(client_id))

    def series(self, key: str) -> list[Any]:
        """One history column, e.g. ``series('global_val_balanced_accuracy')`` for a curve."""
        return [record.get(key) for record in self.history]

    def totals(self) -> dict[str, Any]:
        """Run-level numbers: bytes in each direction, dense bytes, last and selected scores."""
        state = EngineState(
            server_state=self.server_state, payload={}, history=self.history, selector=self.selector,
            elapsed_s=self.wall_time_s,
        )  # fmt: skip
        return history_totals(self.algorithm.name, state)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


def _check_tensors(x: torch.Tensor, y: torch.Tensor, spec: DataSpec, what: str) -> None:
    if x.dtype != torch.float32 or y.dtype != torch.int64:
        raise ConfigurationError(
            f"{what}: images must be float32 and labels int64 (use data.to_client_data), got {x.dtype}, {y.dtype}."
        )
    if x.ndim != 4 or x.shape[1] != spec.in_channels or x.shape[2] != spec.image_size or x.shape[3] != spec.image_size:
        raise ConfigurationError(
            f"{what}: images of shape {tuple(x.shape)} do not match the DataSpec "
            f"(N, {spec.in_channels}, {spec.image_size}, {spec.image_size})."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ConfigurationError(f"{what}: {x.shape[0]} images but labels of shape {tuple(y.shape)}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise ConfigurationError(
            f"{what}: labels span [{int(y.min())}, {int(y.max())}] but the DataSpec has {spec.num_classes} classes."
        )


def validate_setup(
    algorithm: FederatedAlgorithm,
    clients: Sequence[ClientData],
    spec: DataSpec,
    config: SimulationConfig,
) -> None:
    """Every check that can fail before training; raises ConfigurationError naming the fix."""
    if not isinstance(algorithm, FederatedAlgorithm):
        raise ConfigurationError(f"algorithm must be a FederatedAlgorithm (see build_algorithm), got {type(algorithm).__name__}.")
    if not isinstance(config, SimulationConfig):
        raise ConfigurationError(f"config must be a SimulationConfig, got {type(config).__name__}.")
    if not clients:
        raise ConfigurationError("No clients: the partition produced an empty client list.")
    ids = [c.client_id for c in clients]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"Duplicate client ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}.")
    total = sum(c.num_train for c in clients)
    if len(clients) > total:
        raise ConfigurationError(
            f"{len(clients)} clients share only {total} training samples: lower the number of clients "
            "(partition.num_clients) or use more data."
        )
    small = [(c.client_id, c.num_train) for c in clients if c.num_train < config.min_train_samples]
    if small:
        raise ConfigurationError(
            f"Clients with fewer than {config.min_train_samples} training samples (id, n): {small}. Raise "
            "partition.min_samples_per_client or lower partition.num_clients."
        )
    for c in clients:
        for split in ("train", "val", "test"):
            _check_tensors(getattr(c, f"{split}_x"), getattr(c, f"{split}_y"), spec, f"client {c.client_id} {split}")
        if c.train_is_synthetic is not None and c.train_is_synthetic.shape[0] != c.num_train:
            raise ConfigurationError(
                f"client {c.client_id}: train_is_synthetic has {c.train_is_synthetic.shape[0]} rows for {c.num_train} samples."
            )
    if config.progress != "none" and importlib.util.find_spec(config.progress) is None:
        raise ConfigurationError(f"progress: '{config.progress}' is not installed; use progress: none.")


class InProcessClients:
    """The clients of this process as the engine's ``Transport``.

    ``train`` calls each sampled client's ``client_update`` on its resident tensors (or the
    algorithm's ``client_updates`` for all of them at once, under ``vectorize_clients``);
    ``evaluate`` scores the global model on every hospital's validation split (pooled
    confusion counts) and each hospital's personalized model on its own, offering the
    personalized models to the selector (the engine offers the global one).
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        participants: Sequence[ClientData],
        hospitals: Sequence[ClientData],
        states: dict[int, ClientState],
        spec: DataSpec,
        config: SimulationConfig,
        pooled: bool,
    ) -> None:
        self.algorithm = algorithm
        self.by_id = {c.client_id: c for c in participants}
        self.hospitals = list(hospitals)
        self.states = states
        self.spec = spec
        self.config = config
        self.pooled_id = participants[0].client_id if pooled else None

    def train(self, ctx: RoundContext, payloads: Mapping[int, Payload]) -> RoundUpdates:
        mode = self.config.vectorize_clients
        together = mode == "always" or (mode == "auto" and ctx.device.type == "cuda")
        jobs = [(self.states[cid], self.by_id[cid], payload) for cid, payload in payloads.items()]
        if together:
            results = self.algorithm.client_updates(jobs, ctx)
        else:
            results = [self.algorithm.client_update(state, data, payload, ctx) for state, data, payload in jobs]
        updates = []
        for cid, (upload, state, metrics) in zip(payloads, results, strict=True):
            self.states[cid] = state
            updates.append(ClientUpdate(cid, upload, self.by_id[cid].num_train, metrics))
        return RoundUpdates(updates=updates, sent=list(payloads))

    def evaluate(self, ctx: RoundContext, server_state: ServerState, selector: ValidationSelector) -> RoundEvaluation:
        k, batch = self.spec.num_classes, self.config.eval_batch_size
        global_counts = None
        model = self.algorithm.global_model(server_state) if self.config.evaluate_global else None
        if model is not None:
            global_counts = sum(validation_counts(model, c.val_x, c.val_y, k, batch)[0] for c in self.hospitals)
        if not self.config.evaluate_personalized:
            return RoundEvaluation(global_counts=global_counts)
        accuracy, balanced = [], []
        for c in self.hospitals:
            state = self.states[self.pooled_id if self.pooled_id is not None else c.client_id]
            pmodel = self.algorithm.personalized_model(state, server_state)
            counts, nll = validation_counts(pmodel, c.val_x, c.val_y, k, batch)
            n = int(counts.sum())
            accuracy.append(float(np.trace(counts)) / n if n else math.nan)
            balanced.append(balanced_accuracy_from_counts(counts) if n else math.nan)
            selector.offer_personal(c.client_id, ctx.round, counts, nll, pmodel)
        return RoundEvaluation(global_counts, accuracy, balanced)


def run_simulation(
    algorithm: FederatedAlgorithm,
    clients: Sequence[ClientData],
    spec: DataSpec,
    config: SimulationConfig,
    on_round: RoundCallback | None = None,
    *,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
    resume_from: Mapping[str, Any] | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> SimulationResult:
    """Run ``config.num_rounds`` rounds of ``algorithm``; return the history and states.

    Checkpoints (see the module docstring): ``checkpoint_every`` > 0 calls
    ``on_checkpoint`` with a checkpoint dict every that many rounds; ``resume_from`` (a
    checkpoint dict, e.g. ``checkpoint.deserialize_checkpoint`` of a saved file) continues
    that run after round ``rounds_completed``, raising ``CheckpointMismatchError`` when its
    fingerprint (algorithm parameters, runner settings, data hashes, ``fingerprint_extra``)
    differs from this run's. ``callbacks`` run after the standard ones (round log,
    progress bar, checkpoints) and before ``on_round``.

    Each history record is an ``engine.RoundRecord`` as a dict: ``round`` (0-based),
    ``sampled`` (client ids, [-1] for the pooled centralized client), the exact bytes,
    the sample-weighted train loss/accuracy, ``lr``, the validation scores of the global
    and personalized models (None on rounds not scored) and the timings.
    """
    validate_setup(algorithm, clients, spec, config)
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ConfigurationError(f"checkpoint_every must be an integer >= 0 (0 = never), got {checkpoint_every!r}.")
    if checkpoint_every > 0 and on_checkpoint is None:
        raise ConfigurationError("checkpoint_every > 0 needs an on_checkpoint callback that stores the checkpoints.")
    fingerprint = None
    if checkpoint_every > 0 or resume_from is not None:  # hashing the data: ~0.02 s per 10k 28x28 images
        fingerprint = run_fingerprint(algorithm, config, spec, clients, None, fingerprint_extra)
    device = resolve_device(config.device)
    use_amp = resolve_amp(config.amp, device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    hospitals = [move_client(c, device) for c in clients]
    pooled = bool(getattr(algorithm, "pools_clients", False))
    participants = [pool_clients(hospitals)] if pooled else hospitals
    algorithm.to(device)
    logger.info(
        "%s: %d rounds, %d clients%s, join ratio %.2f, device %s%s, seed %d",
        algorithm.name, config.num_rounds, len(hospitals), " (pooled)" if pooled else "",
        config.join_ratio, device, " + AMP" if use_amp else "", config.seed,
    )  # fmt: skip
    standard: list[Callback] = [RoundLogger(), ProgressBar(config.progress)]
    if checkpoint_every > 0:
        standard.append(Checkpointer(checkpoint_every, on_checkpoint, fingerprint or {}))  # type: ignore[arg-type]
    extra = [*callbacks, *([OnRound(on_round)] if on_round is not None else [])]
    state = _initial_state(algorithm, participants, config, resume_from, fingerprint)
    transport = InProcessClients(algorithm, participants, hospitals, state.client_states, spec, config, pooled)
    engine = RoundEngine(
        algorithm, config, transport, {c.client_id: c.num_train for c in participants},
        device=device, use_amp=use_amp, pooled=pooled, num_clients=len(hospitals), callbacks=[*standard, *extra],
    )  # fmt: skip
    resumed_after = state.rounds_completed if resume_from is not None else None
    state = engine.run(state)
    result = SimulationResult(
        algorithm=algorithm,
        config=config,
        history=state.history,
        server_state=state.server_state,
        client_states=state.client_states,
        client_ids=[c.client_id for c in hospitals],
        pooled=pooled,
        wall_time_s=state.elapsed_s,
        extras={"resumed_after_round": resumed_after} if resumed_after is not None else {},
        selector=state.selector,
    )
    totals = result.totals()
    logger.info(
        "%s done in %.1fs: %.2f MB up, %.2f MB down (dense %.2f MB); global model of round %s selected on validation "
        "(balanced accuracy %s, last round %s)",
        algorithm.name, state.elapsed_s, totals["bytes_up_total"] / _MB, totals["bytes_down_total"] / _MB,
        totals["bytes_dense_total"] / _MB, totals["selected_global_round"] or "-",
        fmt(totals["selected_global_val_balanced_accuracy"]), fmt(totals["last_global_val_balanced_accuracy"]),
    )  # fmt: skip
    return result


def _initial_state(
    algorithm: FederatedAlgorithm,
    participants: Sequence[ClientData],
    config: SimulationConfig,
    resume_from: Mapping[str, Any] | None,
    fingerprint: Mapping[str, Any] | None,
) -> EngineState:
    """A fresh run's state, or the checkpoint's after checking it belongs to this run."""
    selector = ValidationSelector(config.min_val_per_class)
    if resume_from is None:
        server_state, payload = algorithm.init_server(config.seed)
        states = {c.client_id: algorithm.init_client(c.client_id, c, config.seed) for c in participants}
        return EngineState(server_state=server_state, payload=payload, client_states=states, selector=selector)
    check_checkpoint(resume_from, fingerprint or {}, client_ids=[c.client_id for c in participants])
    restore_rng_state(resume_from.get("rng", {}))
    selector.load_state_dict(resume_from.get("selection") or {})
    rounds_completed = int(resume_from["rounds_completed"])
    logger.info("%s: resuming after round %d of %d from a checkpoint", algorithm.name, rounds_completed, config.num_rounds)
    return EngineState(
        server_state=resume_from["server_state"],
        payload=resume_from["payload"],
        client_states=dict(resume_from["client_states"]),
        history=list(resume_from["history"]),
        selector=selector,
        rounds_completed=rounds_completed,
        elapsed_s=float(resume_from.get("elapsed_s", 0.0)),
    )


def evaluate_result(
    result: SimulationResult,
    clients: Sequence[ClientData],
    num_classes: int,
    global_test: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Final metrics of a run with bootstrap intervals.

    ``global``: the global model on the global test set (None for local-only or without a
    test set). ``sites``: each hospital's personalized model on its own local test split
    (with ``client_id`` and ``n``). ``site_summary``: ``summarize_sites`` of those.
    """
    out: dict[str, Any] = {"algorithm": result.algorithm.name, "global": None}
    model = result.global_model()
    if model is not None and global_test is not None:
        x, y = global_test
        proba = predict_proba(model, x, batch_size=batch_size)
        out["global"] = compute_metrics(y.cpu().numpy(), proba, num_classes, n_bootstrap=n_bootstrap, seed=seed)
    sites = []
    for c in clients:
        if c.test_y.shape[0] == 0:
            continue
        pmodel = result.personalized_model(c.client_id)
        proba = predict_proba(pmodel, c.test_x, batch_size=batch_size)
        metrics = compute_metrics(c.test_y.cpu().numpy(), proba, num_classes, n_bootstrap=n_bootstrap, seed=seed)
        sites.append({"client_id": c.client_id, **metrics})
    out["sites"] = sites
    out["site_summary"] = summarize_sites(sites) if sites else None
    return out
