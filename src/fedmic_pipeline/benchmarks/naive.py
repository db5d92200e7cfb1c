"""The naive reference: the project's FedAvg and FedMIC, with clients that train the way
common FL research code does.

Why subclasses: the naive variant must measure the very algorithm the resident variants
measure. ``NaiveFedAvg`` and ``NaiveFedMIC`` replace only the local-training step
(``BaseAlgorithm.train``, ``FedMIC.local_distillation``); the payload, the upload (delta,
error feedback, codec), the aggregation and the recipe (lr schedule, logit adjustment, BN
recalibration) are inherited, and the engine runs them like any other algorithm, so byte
counts and client sampling are the project's as well.

The naive step: one ``DataLoader`` per client over ``NaiveImageDataset`` (uint8 -> float
per ``__getitem__``), shuffled from a per-client seeded generator, ``num_workers=0``,
default collation, the batch moved to the device per step; plain contiguous models
(``channels_last`` off); torch's default optimizer implementation (no ``foreach``);
``.item()`` of the loss and of the correct count per batch; no autocast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.algorithms.fedavg import FedAvg
from fedmic_pipeline.core.algorithms.fedmic import FedMIC
from fedmic_pipeline.core.data import derive_seed
from fedmic_pipeline.core.distillation import dual_distillation_step
from fedmic_pipeline.core.protocol import ClientData, ClientState, DataSpec, FederatedAlgorithm, Metrics, RoundContext
from fedmic_pipeline.core.training import BeforeStep, ExtraLoss, TrainStats, forward_with_features, set_lr

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "NaiveClients",
    "NaiveFedAvg",
    "NaiveFedMIC",
    "NaiveImageDataset",
    "naive_algorithm",
    "torch_default",
]


class NaiveImageDataset(Dataset):
    """The common research-code dataset: uint8 arrays, one float tensor made per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = np.asarray(images)
        self.labels = np.asarray(labels).reshape(-1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.tensor(self.images[index], dtype=torch.float32) / 255.0
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        return image, int(self.labels[index])


def torch_default(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` switched to torch's default implementation (``foreach=None``: a loop
    over the parameters on the CPU), its hyper-parameters and state unchanged."""
    for group in optimizer.param_groups:
        group["foreach"] = None
    return optimizer


class NaiveClients:
    """What both naive algorithms share: the clients' DataLoaders, contiguous models and
    torch-default optimizers (mixed in before the algorithm class)."""

    channels_last = False

    def __init__(self, config: Any, spec: DataSpec, loaders: Mapping[int, DataLoader]) -> None:
        super().__init__(config, spec)  # type: ignore[call-arg]
        self.loaders = dict(loaders)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch_default(super().make_optimizer(params))  # type: ignore[misc]

    def batches(self, data: ClientData, ctx: RoundContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The client's DataLoader batches of every local epoch, each moved to the device."""
        for _ in range(self.config.local_epochs):  # type: ignore[attr-defined]
            for x, y in self.loaders[data.client_id]:
                yield x.to(ctx.device), y.to(ctx.device)


class NaiveFedAvg(NaiveClients, FedAvg):
    """FedAvg whose ``train`` is the naive loop (the hooks ``extra_loss``/``before_step`` kept)."""

    def train(
        self, model: nn.Module, data: ClientData, ctx: RoundContext, optimizer: torch.optim.Optimizer | None = None,
        extra_loss: ExtraLoss | None = None, before_step: BeforeStep | None = None,
    ) -> TrainStats:  # fmt: skip
        optimizer = optimizer if optimizer is not None else self.make_optimizer(model.parameters())
        set_lr(optimizer, self.round_lr(ctx))
        offset = self.logit_offset(data)
        model.train()
        ce_sum = objective_sum = 0.0
        correct = seen = steps = 0
        for x, y in self.batches(data, ctx):
            optimizer.zero_grad()
            features, logits = forward_with_features(model, x)
            ce = F.cross_entropy(logits if offset is None else logits + offset, y)
            loss = ce if extra_loss is None else ce + extra_loss(model, x, y, features, logits)
            loss.backward()
            if before_step is not None:
                before_step(model)
            optimizer.step()
            n = int(y.shape[0])
            ce_value = ce.item()
            ce_sum += ce_value * n
            objective_sum += (ce_value if extra_loss is None else loss.item()) * n
            correct += int((logits.argmax(dim=1) == y).sum().item())
            seen += n
            steps += 1
        self.recalibrate(model, data)
        return TrainStats(ce_sum / seen, objective_sum / seen, correct / seen, seen, steps)


class NaiveFedMIC(NaiveClients, FedMIC):
    """FedMIC whose local dual-distillation epochs are the naive loop."""

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        state = super().init_client(client_id, data, seed)
        torch_default(state["teacher_optimizer"])
        return state

    def local_distillation(
        self, state: ClientState, student: nn.Module, student_opt: torch.optim.Optimizer, data: ClientData, ctx: RoundContext
    ) -> Metrics:
        teacher, projections = state["teacher"], state["projections"]
        distill, offset = self.cfg.distill_config(), self.logit_offset(data)
        for module in (teacher, student, projections):
            module.train()
        loss_sum = 0.0
        correct = seen = steps = 0
        for x, y in self.batches(data, ctx):
            m = dual_distillation_step(
                teacher, student, projections, x, y, state["teacher_optimizer"], student_opt, distill, logit_offset=offset
            )
            n = int(y.shape[0])
            loss_sum += m["ce_student"].item() * n
            correct += int(m["correct_student"].item())
            seen += n
            steps += 1
        return {"loss": loss_sum / seen, "accuracy": correct / seen, "num_samples": float(seen), "num_steps": float(steps)}


_NAIVE_CLASSES: dict[str, type[NaiveClients]] = {"fedavg": NaiveFedAvg, "fedmic": NaiveFedMIC}
#: The algorithms the benchmark measures: those with a naive reference.
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_NAIVE_CLASSES)


def naive_algorithm(
    name: str,
    params: Mapping[str, Any],
    spec: DataSpec,
    raw: Mapping[int, Mapping[str, np.ndarray]],
    batch_size: int,
    seed: int,
) -> FederatedAlgorithm:
    """``name`` configured by ``params`` (checked as ``build_algorithm`` checks them), its
    clients training from DataLoaders of ``batch_size`` over ``raw``'s train arrays."""
    config = build_algorithm(name, params, spec).config  # type: ignore[attr-defined]
    loaders = {
        cid: DataLoader(
            NaiveImageDataset(arrays["train_images"], arrays["train_labels"]),
            batch_size=batch_size, shuffle=True, num_workers=0,
            generator=torch.Generator().manual_seed(derive_seed(seed, cid)),
        )  # fmt: skip
        for cid, arrays in sorted(raw.items())
    }
    return _NAIVE_CLASSES[name](config, spec, loaders)  # type: ignore[return-value]
