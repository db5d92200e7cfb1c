"""Global pretraining: the server trains the shared model on the synthetic pool before round 1.

FedSSG's "global pretraining initialization": the server owns the federated generator,
so it can train the shared model on synthetic samples before any hospital trains, and
round 1 then starts from a model that has already seen every (class, device) cell the
pool covers instead of from random weights. No real image is involved.

It is a ``Callback`` of the round engine (``on_train_begin`` of a fresh run), so it
composes with every method that has a shared model: the method is asked for its shared
model (``global_model``), the model is trained in place, and the method rebuilds its first
broadcast from it (``FederatedAlgorithm.after_server_pretraining``). A resumed run has
already left round 0 behind and is not pretrained again (the checkpoint holds the result).

The loss is class-balanced cross-entropy (weights inversely proportional to the pool's
class counts): the pool is planned for the hospitals' under-covered cells, so its class
mix is not the population's, and an unweighted loss would hand round 1 a model biased
toward whichever class the plan needed most.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import make_generator
from .engine import Callback, EngineState, RoundEngine
from .protocol import ConfigurationError
from .training import make_optimizer

__all__ = ["PretrainingConfig", "ServerPretraining", "pretrain_model", "state_digest"]

logger = logging.getLogger(__name__)

_PRETRAINING_TAG = 71


@dataclass(frozen=True)
class PretrainingConfig:
    """Epochs over the pool, SGD with momentum, mini-batches of ``batch_size``."""

    epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"pretraining.{name} must be an integer >= 1, got {value!r}.")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"pretraining.{name} must be a finite number >= 0, got {value!r}.")
        if self.lr <= 0:
            raise ConfigurationError(f"pretraining.lr must be > 0, got {self.lr!r}.")
        if self.momentum >= 1:
            raise ConfigurationError(f"pretraining.momentum must be below 1, got {self.momentum!r}.")


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state (names, shapes, bytes), to show what pretraining changed."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def pretrain_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: PretrainingConfig,
    seed: int,
) -> dict[str, Any]:
    """Train ``model`` in place on (images, labels); return what was done, for the records.

    Batches are drawn from a generator seeded by ``seed`` only, so the same pool and seed
    give the same pretrained weights on the CPU.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigurationError(
            f"Pretraining needs a non-empty pool with one label per image, got {images.shape[0]} images and "
            f"{labels.shape[0]} labels: generate the synthetic sets first (`kedro run --pipelines synthetic_generation`)."
        )
    device = next(model.parameters()).device
    x, y = images.to(device), labels.to(device)
    counts = torch.bincount(y.cpu(), minlength=num_classes).to(torch.float32)
    weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * int((counts > 0).sum())), torch.zeros_like(counts))
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    optimizer = make_optimizer(model.parameters(), "sgd", config.lr, config.momentum, config.weight_decay)
    generator = make_generator(seed, _PRETRAINING_TAG)
    before = state_digest(model)
    started = time.perf_counter()
    model.train()
    losses = []
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, x.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        losses.append(total / seen)
    model.eval()
    return {
        "samples": int(x.shape[0]),
        "class_counts": [int(c) for c in counts.tolist()],
        "epochs": config.epochs,
        "lr": float(config.lr),
        "batch_size": config.batch_size,
        "seed": int(seed),
        "loss_by_epoch": [round(v, 6) for v in losses],
        "initial_digest": before,
        "pretrained_digest": state_digest(model),
        "seconds": round(time.perf_counter() - started, 3),
    }


class ServerPretraining(Callback):
    """Pretrains the method's shared model on a pool before round 1 of a fresh run.

    ``summary`` holds ``pretrain_model``'s record once it ran (None before, and for a
    resumed run, which starts past round 0).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, config: PretrainingConfig) -> None:
        """``images``: float32 (N, C, H, W) as the clients hold them (``data.to_tensors``)."""
        self.images = images
        self.labels = labels.reshape(-1)
        self.config = config
        self.summary: dict[str, Any] | None = None

    def on_train_begin(self, engine: RoundEngine, state: EngineState) -> None:
        if state.rounds_completed > 0:
            return
        model = engine.algorithm.global_model(state.server_state)
        if model is None:
            raise ConfigurationError(
                f"{engine.algorithm.name} has no shared model to pretrain: turn training.pretraining off for it."
            )
        spec = getattr(engine.algorithm, "spec", None)
        num_classes = spec.num_classes if spec is not None else (int(self.labels.max()) + 1 if self.labels.numel() else 1)
        self.summary = pretrain_model(model, self.images, self.labels, num_classes, self.config, engine.config.seed)
        state.payload = engine.algorithm.after_server_pretraining(state.server_state, state.payload)
        logger.info(
            "%s: pretrained the shared model on %d synthetic samples for %d epoch(s) in %.1fs (loss %s)",
            engine.algorithm.name, self.summary["samples"], self.config.epochs, self.summary["seconds"],
            " -> ".join(f"{v:.3f}" for v in self.summary["loss_by_epoch"]),
        )  # fmt: skip
