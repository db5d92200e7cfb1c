"""Local training and payload arithmetic shared by every algorithm.

* ``train_local`` runs E epochs of mini-batch training over resident tensors, with hooks
  for the method-specific parts: ``extra_loss`` (FedProx's proximal term, MOON's
  contrastive term, Ditto's regulariser) and ``before_step`` (SCAFFOLD's gradient
  correction). Loss and accuracy are accumulated on the device and read once at the end,
  so a GPU never waits on a per-batch ``.item()``.
* Payload helpers: a payload is a flat ``{state_dict key: tensor}`` dict (see protocol.py).
  ``weighted_average`` weights every upload by its client's number of training samples,
  never uniformly (a known flaw of public code in this family).

How integer buffers are averaged: BatchNorm's ``num_batches_tracked`` (int64) is averaged
with the same sample weights in float64 and rounded to the nearest integer. It only
matters when BN momentum is None (cumulative averaging), which these models do not use;
rounding keeps the dtype, so payload bytes stay exact and identical in every round.
Floating tensors are averaged in float64 and cast back, so the result does not depend on
the order of clients beyond float64 rounding, and one client with weight 1 is returned
bit-exactly (what the FedAvg == local training exactness test relies on).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import amp_dtype, iterate_batches
from .protocol import ClientData, ConfigurationError, Payload, RoundContext

__all__ = [
    "OPTIMIZERS",
    "BeforeStep",
    "ExtraLoss",
    "TrainStats",
    "apply_delta",
    "LR_SCHEDULES",
    "autocast",
    "class_log_prior",
    "round_lr",
    "set_lr",
    "forward_with_features",
    "make_grad_scaler",
    "make_optimizer",
    "model_delta",
    "parameter_keys",
    "recalibrate_batchnorm",
    "payload_to_state",
    "proximal_term",
    "state_to_payload",
    "train_local",
    "weighted_average",
    "weighted_sum",
]

#: extra_loss(model, x, y, features, logits) -> scalar tensor added to the cross-entropy.
#: ``features`` is None when the model has no ``features``/``classifier`` split.
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
#: before_step(model) runs after backward (gradients unscaled) and before optimizer.step.
BeforeStep = Callable[[nn.Module], None]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def round_lr(base_lr: float, schedule: str, round_idx: int, num_rounds: int, final_fraction: float) -> float:
    """The learning rate of round ``round_idx`` (0-based) of ``num_rounds``.

    'cosine' decays from ``base_lr`` in the first round to ``final_fraction * base_lr`` in
    the last, once per round (not per step), so every client of a round uses the same rate
    whatever its size. Why decay at all: with a constant rate the shared model keeps
    jumping between the skewed clients' optima, and the last round's score is luck (the
    learning issue measured a global model that was constant in 17 of 20 rounds).
    """
    if schedule == "constant" or num_rounds <= 1:
        return float(base_lr)
    if schedule != "cosine":
        raise ConfigurationError(f"Unknown lr_schedule '{schedule}'. Valid schedules: {', '.join(LR_SCHEDULES)}.")
    progress = min(max(round_idx / (num_rounds - 1), 0.0), 1.0)
    return float(base_lr) * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (persistent optimizers across rounds)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def class_log_prior(labels: torch.Tensor, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """tau * log of the client's label prior, add-one smoothed: the logit-adjustment offset.

    Training on ``cross_entropy(logits + offset, y)`` and predicting with the raw logits
    (Menon et al. 2021, "Long-tail learning via logit adjustment"; FedLC, Zhang et al. 2022,
    for federated label skew) makes the raw logits estimate the class-balanced posterior:
    a hospital that holds one class no longer pushes the shared model to predict only that
    class. Smoothing keeps an absent class at a finite offset, log(1 / (n + K)).
    """
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).to(torch.float32)
    prior = (counts + 1.0) / (counts.sum() + num_classes)
    return (float(tau) * prior.log()).to(labels.device)


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """'sgd' (with ``momentum``), 'adam' or 'adamw' (``momentum`` is beta1 when > 0).

    ``foreach`` implementations are used: one fused kernel per step over all tensors,
    which matters for small models where Python overhead per parameter dominates.
    """
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    betas = (momentum if momentum > 0 else 0.9, 0.999)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    raise ConfigurationError(f"Unknown optimizer '{name}'. Valid optimizers: {', '.join(OPTIMIZERS)}.")


def autocast(ctx: RoundContext) -> contextlib.AbstractContextManager:
    """Autocast on CUDA when ``ctx.use_amp`` (dtype ``ctx.amp_dtype`` or the
    device default: bf16 where supported, else fp16); a no-op context otherwise."""
    if not ctx.use_amp or ctx.device.type != "cuda":
        return contextlib.nullcontext()
    dtype = ctx.amp_dtype or amp_dtype(ctx.device)
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(ctx: RoundContext) -> torch.amp.GradScaler | None:
    """A GradScaler only for fp16 autocast (bf16 has fp32's range and needs none)."""
    if not ctx.use_amp or ctx.device.type != "cuda":
        return None
    dtype = ctx.amp_dtype or amp_dtype(ctx.device)
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(features, logits) in one pass for models with ``features``+``classifier``, else (None, model(x))."""
    if hasattr(model, "features") and hasattr(model, "classifier"):
        h = model.features(x)
        return h, model.classifier(h)
    return None, model(x)


@dataclass(frozen=True)
class TrainStats:
    """Means over every training sample seen in ``train_local`` (all epochs)."""

    loss: float  # cross-entropy, comparable across methods
    objective: float  # cross-entropy + extra_loss: what was minimised
    accuracy: float
    num_samples: int  # samples seen (epochs x data), the FedAvg weight is the data size
    num_steps: int  # optimizer steps taken (SCAFFOLD's K)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}objective": self.objective,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}num_samples": float(self.num_samples),
            f"{prefix}num_steps": float(self.num_steps),
        }


def train_local(
    model: nn.Module,
    data: ClientData | tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ctx: RoundContext,
    extra_loss: ExtraLoss | None = None,
    before_step: BeforeStep | None = None,
    scaler: torch.amp.GradScaler | None = None,
    logit_offset: torch.Tensor | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``epochs`` passes over the data; return mean loss/acc.

    The optimizer is passed in (see ``make_optimizer``) so a method decides whether its
    state persists across rounds (local-only, centralized) or starts fresh each round
    (FedAvg and its family, as in McMahan et al.). Batches are drawn from ``generator``;
    a trailing batch of one sample is dropped (BatchNorm). Under ``ctx.use_amp`` the
    forward pass runs in autocast and fp16 uses a GradScaler (created if not given).
    ``logit_offset`` (see ``class_log_prior``) is added to the logits of the cross-entropy
    only; the reported accuracy and every extra loss see the raw logits.
    """
    if epochs < 1 or batch_size < 1:
        raise ConfigurationError(f"train_local needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}.")
    x, y = (data.train_x, data.train_y) if isinstance(data, ClientData) else data
    if int(y.shape[0]) == 0:
        raise ConfigurationError("train_local got an empty training set.")
    if scaler is None:
        scaler = make_grad_scaler(ctx)
    model.train()
    ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    obj_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    seen = steps = 0
    for _ in range(epochs):
        for xb, yb in iterate_batches(x, y, batch_size, generator, min_batch=2):
            optimizer.zero_grad(set_to_none=True)
            with autocast(ctx):
                feats, logits = forward_with_features(model, xb)
                ce = F.cross_entropy(logits.float() if logit_offset is None else logits.float() + logit_offset, yb)
                loss = ce if extra_loss is None else ce + extra_loss(model, xb, yb, feats, logits)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if before_step is not None:
                    before_step(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if before_step is not None:
                    before_step(model)
                optimizer.step()
            bs = int(yb.shape[0])
            ce_sum += ce.detach() * bs
            obj_sum += loss.detach().float() * bs
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            seen += bs
            steps += 1
    return TrainStats(
        loss=float(ce_sum) / seen,
        objective=float(obj_sum) / seen,
        accuracy=float(correct) / seen,
        num_samples=seen,
        num_steps=steps,
    )


def proximal_term(model: nn.Module, anchor: Payload, mu: float) -> ExtraLoss | None:
    """``extra_loss`` mu/2 ||w - w_anchor||^2 over ``model``'s trainable parameters; None if mu <= 0.

    FedProx's proximal term and Ditto's regulariser. Only trainable parameters are pulled
    (BatchNorm running statistics are not optimised, so a pull on them means nothing);
    the anchor tensors are ``anchor``'s entries under ``parameter_keys(model)``, detached.
    With mu = 0 no term at all is added, so training is bit for bit the plain one.
    """
    if mu <= 0:
        return None
    anchors = [anchor[k].detach() for k in parameter_keys(model)]

    def proximal(m: nn.Module, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        params = [p for p in m.parameters() if p.requires_grad]  # parameter_keys' order
        return 0.5 * mu * torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)]).sum()

    return proximal


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> bool:
    """Recompute every BatchNorm's running statistics for the current weights on ``x``.

    Why: running statistics are an exponential average over past steps, taken while the
    weights moved. A small site takes a few optimizer steps per round, so its averages
    describe earlier weights and eval mode disagrees with train mode (the learning issue
    measured 0.89 in train mode and 0.5 in eval mode for one hospital). One forward pass
    over the local training images with cumulative averaging (momentum None) makes them
    exact for the weights that are kept; the weights do not change. Returns whether the
    model had any BatchNorm layer.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or x.shape[0] < 2:
        return bool(norms)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i : i + batch_size]
            if chunk.shape[0] >= 2:
                model(chunk)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return True


# ---------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------


def parameter_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of trainable parameters (not BN running statistics)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def state_to_payload(model: nn.Module, keys: Iterable[str] | None = None) -> Payload:
    """Detached copies of the model's state_dict entries (all, or ``keys``).

    Copies, because the model keeps training after its payload is taken and a payload
    must not change under the receiver; always in plain contiguous layout (also for
    channels-last models), so receivers may ``view`` them freely.
    """
    state = model.state_dict()
    names = list(state) if keys is None else list(keys)
    unknown = [k for k in names if k not in state]
    if unknown:
        raise KeyError(f"state_to_payload: the model has no entries {unknown}.")
    return {k: state[k].detach().clone(memory_format=torch.contiguous_format) for k in names}


def payload_to_state(model: nn.Module, payload: Payload, prefix: str = "") -> None:
    """Copy ``payload`` entries (optionally only those starting with ``prefix``, which is
    stripped) into the model's parameters/buffers in place, checking names and shapes."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in payload.items():
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix) :]
            if key not in state:
                raise KeyError(f"payload_to_state: the model has no entry '{key}'.")
            target = state[key]
            if target.shape != value.shape:
                raise ValueError(
                    f"payload_to_state: '{key}' has shape {tuple(value.shape)}, model expects {tuple(target.shape)}."
                )
            target.copy_(value)


def _check_uploads(uploads: Sequence[tuple[Payload, int]]) -> None:
    if not uploads:
        raise ValueError("Cannot aggregate zero uploads.")
    for _, n in uploads:
        if n < 0:
            raise ValueError(f"Sample counts must be >= 0, got {n}.")


def weighted_sum(payloads: Sequence[Payload], weights: Sequence[float], keys: Iterable[str] | None = None) -> Payload:
    """sum_i weights[i] * payloads[i][k] for each key, accumulated in float64, cast back.

    Integer tensors are rounded to the nearest integer after the sum.
    """
    if len(payloads) != len(weights) or not payloads:
        raise ValueError("weighted_sum needs as many weights as payloads (at least one).")
    names = list(payloads[0]) if keys is None else list(keys)
    out: Payload = {}
    for key in names:
        ref = payloads[0][key]
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for payload, w in zip(payloads, weights, strict=True):
            if key not in payload:
                raise KeyError(f"An upload lacks '{key}'.")
            t = payload[key]
            if t.shape != ref.shape:
                raise ValueError(f"Uploads disagree on the shape of '{key}': {tuple(t.shape)} vs {tuple(ref.shape)}.")
            acc.add_(t.to(device=ref.device, dtype=torch.float64), alpha=float(w))
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


def weighted_average(uploads: Sequence[tuple[Payload, int]], keys: Iterable[str] | None = None) -> Payload:
    """The sample-weighted mean sum_k n_k / n * upload_k over (upload, n_k) pairs.

    When every count is zero, falls back to the uniform mean (and only then).
    """
    _check_uploads(uploads)
    total = float(sum(n for _, n in uploads))
    weights = [n / total for _, n in uploads] if total > 0 else [1.0 / len(uploads)] * len(uploads)
    if len(uploads) == 1:
        # Exactly the client's tensors: x * 1.0 is exact, but skip the float64 round trip.
        names = list(uploads[0][0]) if keys is None else list(keys)
        return {k: uploads[0][0][k].detach().clone() for k in names}
    return weighted_sum([p for p, _ in uploads], weights, keys)


def model_delta(local: Payload, reference: Payload, keys: Iterable[str] | None = None) -> Payload:
    """local - reference per key (floating keys only by default: deltas of counters are
    meaningless), e.g. the update D = W_local - W_global that FedKD/FedMIC decompose."""
    names = [k for k in local if local[k].is_floating_point()] if keys is None else list(keys)
    return {k: local[k] - reference[k].to(local[k].device) for k in names}


def apply_delta(reference: Payload, delta: Payload, scale: float = 1.0) -> Payload:
    """reference + scale * delta for the keys in ``delta``; other keys copied unchanged."""
    out = {k: v.clone() for k, v in reference.items()}
    for k, d in delta.items():
        out[k] = (reference[k] + scale * d.to(reference[k].device)).to(reference[k].dtype)
    return out
