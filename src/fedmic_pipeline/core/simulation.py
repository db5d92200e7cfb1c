"""The in-process round runner: any ``FederatedAlgorithm`` over a list of ClientData.

One round: sample clients -> each sampled client runs ``client_update`` on the current
payload -> the server ``aggregate``s the (upload, n_train) pairs -> optional validation.

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
the runner hands a checkpoint dict (``checkpoint.build_checkpoint``) to ``on_checkpoint``
after every N-th round (not after the last: the result itself is then returned), before
``on_round``; ``resume_from`` continues a run from such a dict after checking its
fingerprint. Because every stream is keyed by (seed, round, client), the resumed rounds
are the very rounds the uninterrupted run would have trained: the history and models
end bit-identical on the CPU (timing fields aside).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import build_checkpoint, check_checkpoint, restore_rng_state, run_fingerprint
from .data import CLIENT_SAMPLING, amp_dtype, move_client, pool_clients, resolve_amp, resolve_device
from .evaluation import compute_metrics, predict_proba, summarize_sites
from .selection import ValidationSelector, balanced_accuracy_from_counts, validation_counts
from .protocol import (
    ClientData,
    ClientState,
    ConfigurationError,
    DataSpec,
    FederatedAlgorithm,
    Payload,
    RoundContext,
    ServerState,
    payload_nbytes,
)

__all__ = [
    "TIMING_KEYS",
    "CheckpointCallback",
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
#: History fields measured by the clock: the only ones that differ between identical runs.
TIMING_KEYS: tuple[str, ...] = ("train_time_s", "eval_time_s", "samples_per_s")
_PROGRESS = ("none", "tqdm", "rich")
_MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class SimulationConfig:
    """How the federation runs (the algorithm's own hyper-parameters live in its config).

    join_ratio: the fraction of clients sampled per round, 0 < r <= 1; a round samples
    max(1, floor(r * K)) clients (McMahan et al.'s C). eval_every: score the global and
    the personalized models on the validation splits every that many rounds (and always
    after the last); only scored rounds can be selected. amp: 'auto' = autocast on CUDA only. num_threads: if set,
    ``torch.set_num_threads`` for the run (a process-wide setting, so it is opt-in).
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
        if self.progress not in _PROGRESS:
            raise ConfigurationError(f"progress must be one of {', '.join(_PROGRESS)}, got '{self.progress}'.")
        if self.min_train_samples < 1:
            raise ConfigurationError(f"min_train_samples must be >= 1, got {self.min_train_samples}.")
        if not isinstance(self.min_val_per_class, int) or self.min_val_per_class < 1:
            raise ConfigurationError(f"min_val_per_class must be an integer >= 1, got {self.min_val_per_class!r}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigurationError(f"num_threads must be >= 1 or null, got {self.num_threads}.")
        resolve_device(self.device)  # unknown names and missing CUDA fail here, not mid-run
        if str(self.amp).lower() not in ("auto", "on", "off"):
            raise ConfigurationError(f"amp must be 'auto', 'on' or 'off', got '{self.amp}'.")


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
        """One history column, e.g. ``series('global_test_accuracy')`` for a curve."""
        return [record.get(key) for record in self.history]

    def totals(self) -> dict[str, Any]:
        """Run-level numbers: bytes in each direction, dense bytes, final accuracies."""
        up = sum(r["bytes_up_total"] for r in self.history)
        down = sum(r["bytes_down_total"] for r in self.history)
        dense = sum(r["bytes_dense_total"] for r in self.history)
        last_global = next(
            (r["global_val_balanced_accuracy"] for r in reversed(self.history) if r["global_val_balanced_accuracy"] is not None),
            None,
        )
        last_pers = next(
            (
                r["personalized_val_balanced_accuracy"]
                for r in reversed(self.history)
                if r["personalized_val_balanced_accuracy"] is not None
            ),
            None,
        )
        selection = self.selector.summary()
        return {
            "algorithm": self.algorithm.name,
            "rounds": len(self.history),
            "bytes_up_total": up,
            "bytes_down_total": down,
            "bytes_total": up + down,
            "bytes_dense_total": dense,
            "compression_ratio": (dense / (up + down)) if up + down > 0 else None,
            "last_global_val_balanced_accuracy": last_global,
            "last_personalized_val_balanced_accuracy": last_pers,
            "selected_global_round": selection["global_round"],
            "selected_global_val_balanced_accuracy": selection["global_val_balanced_accuracy"],
            "wall_time_s": self.wall_time_s,
        }

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


def sample_clients(client_ids: Sequence[int], join_ratio: float, seed: int, round_idx: int) -> list[int]:
    """The sorted ids sampled in ``round_idx``: max(1, floor(join_ratio * K)) without
    replacement from a numpy Generator seeded by (seed, round, tag); all when that is K."""
    ids = list(client_ids)
    m = max(1, math.floor(join_ratio * len(ids) + 1e-9))
    if m >= len(ids):
        return sorted(ids)
    rng = np.random.default_rng([seed, round_idx, CLIENT_SAMPLING])
    return sorted(ids[i] for i in rng.choice(len(ids), size=m, replace=False))


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


class _Progress:
    """A thin switch over no bar, tqdm or rich (imported lazily, only when asked for)."""

    def __init__(self, kind: str, total: int, label: str) -> None:
        self._bar: Any = None
        self._rich: Any = None
        if kind == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit="round")
        elif kind == "rich":
            from rich.progress import Progress

            self._rich = Progress()
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def update(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1, description=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._rich is not None:
            self._rich.stop()


def _weighted_mean(values: list[float | None], weights: list[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


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
) -> SimulationResult:
    """Run ``config.num_rounds`` rounds of ``algorithm``; return the history and states.

    Checkpoints (see the module docstring): ``checkpoint_every`` > 0 calls
    ``on_checkpoint`` with a checkpoint dict every that many rounds; ``resume_from`` (a
    checkpoint dict, e.g. ``checkpoint.deserialize_checkpoint`` of a saved file) continues
    that run after round ``rounds_completed``, raising ``CheckpointMismatchError`` when its
    fingerprint (algorithm parameters, runner settings, data hashes, ``fingerprint_extra``)
    differs from this run's.

    Each history record holds: ``round`` (0-based), ``sampled`` (client ids, [-1] for the
    pooled centralized client), ``bytes_up``/``bytes_down`` (per sampled client, same
    order), ``bytes_dense_per_client`` (FedAvg's size of the shared model, one direction),
    their ``*_total``s (dense total = both directions for every sampled client),
    ``train_loss``/``train_accuracy`` (sample-weighted over the sampled clients),
    ``client_metrics``, ``lr`` (the round's scheduled rate), ``global_val_accuracy`` and
    ``global_val_balanced_accuracy`` (the global model on the pooled validation splits;
    None when not evaluated or no global model), ``personalized_val_accuracy`` and
    ``personalized_val_balanced_accuracy`` (unweighted means over hospitals of their
    personalized model on their own validation split) with ``_per_client`` lists,
    ``train_time_s``, ``eval_time_s`` and ``samples_per_s``.
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
    originals = [move_client(c, device) for c in clients]
    pooled = bool(getattr(algorithm, "pools_clients", False))
    participants = [pool_clients(originals)] if pooled else originals
    by_id = {c.client_id: c for c in participants}
    extras = {
        "num_clients": len(originals),
        "total_train_samples": sum(c.num_train for c in participants),
        "amp_dtype": amp_dtype(device) if use_amp else None,
    }
    algorithm.to(device)
    logger.info(
        "%s: %d rounds, %d clients%s, join ratio %.2f, device %s%s, seed %d",
        algorithm.name, config.num_rounds, len(originals), " (pooled)" if pooled else "",
        config.join_ratio, device, " + AMP" if use_amp else "", config.seed,
    )  # fmt: skip

    start = time.perf_counter()
    first_round, elapsed_before = 0, 0.0
    selector = ValidationSelector(config.min_val_per_class)
    if resume_from is None:
        server_state, payload = algorithm.init_server(config.seed)
        states: dict[int, ClientState] = {c.client_id: algorithm.init_client(c.client_id, c, config.seed) for c in participants}
        history: list[dict[str, Any]] = []
    else:
        check_checkpoint(resume_from, fingerprint or {}, client_ids=list(by_id))
        server_state, payload = resume_from["server_state"], resume_from["payload"]
        states, history = dict(resume_from["client_states"]), list(resume_from["history"])
        first_round, elapsed_before = int(resume_from["rounds_completed"]), float(resume_from.get("elapsed_s", 0.0))
        restore_rng_state(resume_from.get("rng", {}))
        selector.load_state_dict(resume_from.get("selection") or {})
        logger.info("%s: resuming after round %d of %d from a checkpoint", algorithm.name, first_round, config.num_rounds)
    progress = _Progress(config.progress, config.num_rounds - first_round, algorithm.name)
    try:
        for rnd in range(first_round, config.num_rounds):
            ctx = RoundContext(
                round=rnd, num_rounds=config.num_rounds, seed=config.seed, device=device, use_amp=use_amp, extras=dict(extras)
            )
            sampled = sorted(by_id) if pooled else sample_clients(sorted(by_id), config.join_ratio, config.seed, rnd)
            ctx.extras["sampled"] = list(sampled)
            record, payload, server_state = _train_round(algorithm, by_id, sampled, states, payload, server_state, ctx)
            if (rnd + 1) % config.eval_every == 0 or rnd == config.num_rounds - 1:
                pers_state = states[participants[0].client_id] if pooled else None
                record.update(
                    _validate_round(algorithm, server_state, states, originals, spec, config, pers_state, selector, rnd)
                )
            history.append(record)
            _log_round(record, config.num_rounds, algorithm.name)
            progress.update(_short(record))
            if checkpoint_every > 0 and (rnd + 1) % checkpoint_every == 0 and rnd + 1 < config.num_rounds:
                on_checkpoint(  # type: ignore[misc]  # checked above
                    build_checkpoint(
                        fingerprint=fingerprint or {}, rounds_completed=rnd + 1, num_rounds=config.num_rounds,
                        algorithm_name=algorithm.name, payload=payload, server_state=server_state,
                        client_states=states, history=history, elapsed_s=elapsed_before + time.perf_counter() - start,
                        selection=selector.state_dict(),
                    )  # fmt: skip
                )
            if on_round is not None:
                on_round(record)
    finally:
        progress.close()
    wall = elapsed_before + time.perf_counter() - start
    result = SimulationResult(
        algorithm=algorithm,
        config=config,
        history=history,
        server_state=server_state,
        client_states=states,
        client_ids=[c.client_id for c in originals],
        pooled=pooled,
        wall_time_s=wall,
        extras={"resumed_after_round": first_round} if resume_from is not None else {},
        selector=selector,
    )
    totals = result.totals()
    logger.info(
        "%s done in %.1fs: %.2f MB up, %.2f MB down (dense %.2f MB); global model of round %s selected on validation "
        "(balanced accuracy %s, last round %s)",
        algorithm.name, wall, totals["bytes_up_total"] / _MB, totals["bytes_down_total"] / _MB,
        totals["bytes_dense_total"] / _MB, totals["selected_global_round"] or "-",
        _fmt(totals["selected_global_val_balanced_accuracy"]), _fmt(totals["last_global_val_balanced_accuracy"]),
    )  # fmt: skip
    return result


def _train_round(
    algorithm: FederatedAlgorithm,
    by_id: dict[int, ClientData],
    sampled: list[int],
    states: dict[int, ClientState],
    payload: Payload,
    server_state: ServerState,
    ctx: RoundContext,
) -> tuple[dict[str, Any], Payload, ServerState]:
    """One round of client updates and aggregation; ``states`` is updated in place."""
    t0 = time.perf_counter()
    down = payload_nbytes(payload)
    uploads: list[tuple[Payload, int]] = []
    bytes_up: list[int] = []
    client_metrics: list[dict[str, Any]] = []
    for cid in sampled:
        data = by_id[cid]
        upload, states[cid], metrics = algorithm.client_update(states[cid], data, payload, ctx)
        uploads.append((upload, data.num_train))
        bytes_up.append(payload_nbytes(upload))
        client_metrics.append({"client_id": cid, "num_train": data.num_train, **metrics})
    payload, server_state = algorithm.aggregate(server_state, uploads, ctx)
    train_time = time.perf_counter() - t0
    dense = int(algorithm.payload_bytes_dense(server_state))
    weights = [m["num_train"] for m in client_metrics]
    seen = int(sum(m.get("num_samples", 0.0) for m in client_metrics))
    record: dict[str, Any] = {
        "round": ctx.round,
        "sampled": list(sampled),
        "bytes_up": bytes_up,
        "bytes_down": [down] * len(sampled),
        "bytes_dense_per_client": dense,
        "bytes_up_total": sum(bytes_up),
        "bytes_down_total": down * len(sampled),
        "bytes_dense_total": 2 * dense * len(sampled),
        "train_loss": _weighted_mean([m.get("loss") for m in client_metrics], weights),
        "train_accuracy": _weighted_mean([m.get("accuracy") for m in client_metrics], weights),
        "client_metrics": client_metrics,
        "lr": algorithm.round_lr(ctx) if hasattr(algorithm, "round_lr") else None,
        "global_val_accuracy": None,
        "global_val_balanced_accuracy": None,
        "personalized_val_accuracy": None,
        "personalized_val_balanced_accuracy": None,
        "personalized_val_accuracy_per_client": None,
        "personalized_val_balanced_accuracy_per_client": None,
        "train_time_s": train_time,
        "eval_time_s": 0.0,
        "samples_per_s": seen / train_time if train_time > 0 and seen else None,
    }
    return record, payload, server_state


def _validate_round(
    algorithm: FederatedAlgorithm,
    server_state: ServerState,
    states: dict[int, ClientState],
    originals: Sequence[ClientData],
    spec: DataSpec,
    config: SimulationConfig,
    pooled_state: ClientState | None,
    selector: ValidationSelector,
    round_idx: int,
) -> dict[str, Any]:
    """The global model on the pooled validation splits and every hospital's personalized
    model on its own; offers both to the selector (see ``core/selection.py``)."""
    t1 = time.perf_counter()
    out: dict[str, Any] = {}
    k, batch = spec.num_classes, config.eval_batch_size
    model = algorithm.global_model(server_state) if config.evaluate_global else None
    if model is not None:
        pooled = sum(validation_counts(model, c.val_x, c.val_y, k, batch)[0] for c in originals)
        total = int(pooled.sum())
        out["global_val_accuracy"] = float(np.trace(pooled)) / total if total else None
        out["global_val_balanced_accuracy"] = balanced_accuracy_from_counts(pooled) if total else None
        if total:
            selector.offer_global(round_idx, out["global_val_balanced_accuracy"], model)
    if config.evaluate_personalized:
        accuracy, balanced = [], []
        for c in originals:
            state = pooled_state if pooled_state is not None else states[c.client_id]
            pmodel = algorithm.personalized_model(state, server_state)
            counts, nll = validation_counts(pmodel, c.val_x, c.val_y, k, batch)
            n = int(counts.sum())
            accuracy.append(float(np.trace(counts)) / n if n else math.nan)
            balanced.append(balanced_accuracy_from_counts(counts) if n else math.nan)
            selector.offer_personal(c.client_id, round_idx, counts, nll, pmodel)
        out["personalized_val_accuracy_per_client"] = accuracy
        out["personalized_val_balanced_accuracy_per_client"] = balanced
        out["personalized_val_accuracy"] = _nan_mean(accuracy)
        out["personalized_val_balanced_accuracy"] = _nan_mean(balanced)
    out["eval_time_s"] = time.perf_counter() - t1
    return out


def _nan_mean(values: list[float]) -> float | None:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _short(record: dict[str, Any]) -> str:
    loss, acc, val = record["train_loss"], record["train_accuracy"], record["global_val_balanced_accuracy"]
    return f"loss {_fmt(loss, '.4f')} acc {_fmt(acc)} val bal {_fmt(val)}"


def _log_round(record: dict[str, Any], num_rounds: int, name: str) -> None:
    logger.info(
        "%s round %d/%d | clients %s | loss %s acc %s | up %.3f MB down %.3f MB | val balanced acc: global %s, "
        "personalized %s | %.2fs",
        name, record["round"] + 1, num_rounds, record["sampled"], _fmt(record["train_loss"], ".4f"),
        _fmt(record["train_accuracy"]), record["bytes_up_total"] / _MB, record["bytes_down_total"] / _MB,
        _fmt(record["global_val_balanced_accuracy"]), _fmt(record["personalized_val_balanced_accuracy"]),
        record["train_time_s"],
    )  # fmt: skip


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
