"""Dual (mutual) knowledge distillation between a local teacher and a shared student.

One step serves both FedMIC (methods.md 1a) and FedKD (Wu et al. 2022). Per batch:

    h_T = f_T(x), z_T = g_T(h_T)          h_S = f_S(x), z_S = g_S(h_S)
    w   = 1 / (CE_T + CE_S)               detached (FedKD's adaptive weight)
    L_T = CE_T + w (alpha_rep L_rep_T + alpha_dec tau^2 KL(p_S.detach() || p_T))
    L_S = CE_S + w (alpha_rep L_rep_S + alpha_dec tau^2 KL(p_T.detach() || p_S))

The representation terms differ between the methods (``ProjectionMode``):

* ``bidirectional`` (FedMIC): two local matrices, A: student -> teacher space and
  B: teacher -> student space; L_rep_T = MSE(h_T, A h_S.detach()) trains teacher and A,
  L_rep_S = MSE(h_S, B h_T.detach()) trains student and B.
* ``shared`` (FedKD: "hidden-state MSE through one learnable matrix"): one matrix W_h,
  student -> teacher space; L_rep = MSE(h_T, W_h h_S) enters both losses. In L_T it trains
  teacher and W_h (h_S detached); in L_S it trains the student only (h_T and W_h detached).

Every term of L_T reaches only teacher (+A / W_h) parameters and every term of L_S only
student (+B) parameters, because the other side is detached inside each term; so one
backward of L_T + L_S gives exactly the gradients of two separate backward passes, and
the two optimizers (teacher+A, student+B) each step their own parameters.

Interpretations recorded here (logged as run params by the callers):

* ``distill.projection``: A, B and W_h are bias-free ``nn.Linear`` maps with PyTorch's
  default initialisation, drawn from the client's seeded generator; they never travel.
* ``distill.mse``: mean squared error averaged over batch and feature dimensions.
* ``distill.kl``: ``tau^2 * KL`` with batch-mean reduction (Hinton et al.'s tau^2 keeps
  gradient scale independent of tau).
* ``distill.max_weight``: w = min(1 / (CE_T + CE_S), max_weight). The papers use no cap;
  the cap (default 100) only engages when both cross-entropies are below 0.01, where an
  uncapped weight lets the feature-MSE term explode on tiny or easy data.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmic_pipeline.core.data import iterate_batches
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, RoundContext
from fedmic_pipeline.core.training import autocast, make_grad_scaler

__all__ = [
    "DistillConfig",
    "ProjectionMode",
    "Projections",
    "distillation_losses",
    "dual_distillation_step",
    "train_dual",
]

ProjectionMode = Literal["bidirectional", "shared"]


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the dual distillation (defaults: methods.md 1a, tau = 1 as FedKD)."""

    tau: float = 1.0
    alpha_rep: float = 1.0
    alpha_dec: float = 1.0
    adaptive_weight: bool = True
    max_weight: float = 100.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigurationError(f"distillation tau must be > 0 (e.g. 1.0), got {self.tau}")
        for name in ("alpha_rep", "alpha_dec"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be >= 0 (0 disables that term), got {value}")
        if not (self.max_weight > 0):
            raise ConfigurationError(f"max_weight must be > 0 (use inf for no cap), got {self.max_weight}")

    def as_params(self, prefix: str = "distill.") -> dict[str, object]:
        return {prefix + k: v for k, v in asdict(self).items()}


class Projections(nn.Module):
    """The local auxiliary matrices: ``to_teacher`` (A or W_h) and, bidirectional, ``to_student`` (B)."""

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        mode: ProjectionMode = "bidirectional",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("bidirectional", "shared"):
            raise ConfigurationError(f"projection mode must be 'bidirectional' or 'shared', got {mode!r}")
        if student_dim < 1 or teacher_dim < 1:
            raise ConfigurationError(f"feature dims must be >= 1, got student={student_dim}, teacher={teacher_dim}")
        self.mode: ProjectionMode = mode
        self.to_teacher = nn.Linear(student_dim, teacher_dim, bias=False)
        self.to_student: nn.Linear | None = (
            nn.Linear(teacher_dim, student_dim, bias=False) if mode == "bidirectional" else None
        )
        if generator is not None:
            # Same bounds as nn.Linear's default kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), ..).
            with torch.no_grad():
                for lin in (self.to_teacher, self.to_student):
                    if lin is None:
                        continue
                    bound = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)

    def teacher_side_parameters(self) -> list[nn.Parameter]:
        """Parameters stepped by the teacher's optimizer (A, or W_h)."""
        return list(self.to_teacher.parameters())

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Parameters stepped by the student's optimizer (B; none in shared mode)."""
        return [] if self.to_student is None else list(self.to_student.parameters())


def _kl(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(target/tau).detach() || softmax(logits/tau)), batch mean."""
    target = F.softmax(target_logits.detach() / tau, dim=1)
    return F.kl_div(F.log_softmax(logits / tau, dim=1), target, reduction="batchmean") * (tau * tau)


def distillation_losses(
    teacher: nn.Module,
    student: nn.Module,
    projections: Projections,
    x: torch.Tensor,
    y: torch.Tensor,
    config: DistillConfig,
    logit_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both models; return (L_T, L_S, detached 0-d metric tensors); see the module docstring.

    ``logit_offset`` (logit adjustment, ``training.class_log_prior``) is added to the logits
    of both cross-entropy terms only: the distillation terms compare the raw decisions.
    """
    h_t = teacher.features(x)
    z_t = teacher.classifier(h_t)
    h_s = student.features(x)
    z_s = student.classifier(h_s)
    # Under autocast the losses are taken in float32 (MSE/KL of half tensors lose precision).
    h_t, z_t, h_s, z_s = h_t.float(), z_t.float(), h_s.float(), z_s.float()
    ce_t = F.cross_entropy(z_t if logit_offset is None else z_t + logit_offset, y)
    ce_s = F.cross_entropy(z_s if logit_offset is None else z_s + logit_offset, y)
    if config.adaptive_weight:  # a tensor: no host sync per batch on a GPU
        w = (1.0 / (ce_t.detach() + ce_s.detach()).clamp_min(1e-12)).clamp_max(config.max_weight)
    else:
        w = torch.ones((), device=ce_t.device)

    a = projections.to_teacher.weight.float()
    rep_t = F.mse_loss(F.linear(h_s.detach(), a), h_t)
    if projections.to_student is not None:  # bidirectional: B h_T -> h_S
        rep_s = F.mse_loss(F.linear(h_t.detach(), projections.to_student.weight.float()), h_s)
    else:  # shared W_h: only the student moves in its own term
        rep_s = F.mse_loss(F.linear(h_s, a.detach()), h_t.detach())
    dec_t = _kl(z_s, z_t, config.tau)
    dec_s = _kl(z_t, z_s, config.tau)

    loss_t = ce_t + w * (config.alpha_rep * rep_t + config.alpha_dec * dec_t)
    loss_s = ce_s + w * (config.alpha_rep * rep_s + config.alpha_dec * dec_s)
    metrics = {
        "ce_teacher": ce_t.detach(),
        "ce_student": ce_s.detach(),
        "rep_teacher": rep_t.detach(),
        "rep_student": rep_s.detach(),
        "kl_teacher": dec_t.detach(),
        "kl_student": dec_s.detach(),
        "adaptive_weight": w,
        "correct_teacher": (z_t.detach().argmax(1) == y).sum(),
        "correct_student": (z_s.detach().argmax(1) == y).sum(),
    }
    return loss_t, loss_s, metrics


def dual_distillation_step(
    teacher: nn.Module,
    student: nn.Module,
    projections: Projections,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    amp: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    logit_offset: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step of both sides; the caller puts the models in train mode.

    ``teacher_optimizer`` must hold the teacher's parameters plus
    ``projections.teacher_side_parameters()``, ``student_optimizer`` the student's plus
    ``projections.student_side_parameters()``. Returns detached 0-d tensors (read them
    once per epoch, not per batch, so a GPU is never stalled by a host sync).
    """
    teacher_optimizer.zero_grad(set_to_none=True)
    student_optimizer.zero_grad(set_to_none=True)
    with amp if amp is not None else contextlib.nullcontext():
        loss_t, loss_s, metrics = distillation_losses(teacher, student, projections, x, y, config, logit_offset)
    total = loss_t + loss_s
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(teacher_optimizer)
        scaler.step(student_optimizer)
        scaler.update()
    else:
        total.backward()
        teacher_optimizer.step()
        student_optimizer.step()
    metrics["loss_teacher"] = loss_t.detach()
    metrics["loss_student"] = loss_s.detach()
    return metrics


def train_dual(
    teacher: nn.Module,
    student: nn.Module,
    projections: Projections,
    data: ClientData,
    epochs: int,
    batch_size: int,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: DistillConfig,
    ctx: RoundContext,
    logit_offset: torch.Tensor | None = None,
) -> dict[str, float]:
    """``epochs`` passes of :func:`dual_distillation_step` over the client's train split.

    Batches come from ``generator`` via ``data.iterate_batches`` (a trailing batch of one
    sample is dropped for BatchNorm). Returns sample-weighted means: ``loss``/``accuracy``
    (the student's cross-entropy and accuracy, comparable with FedAvg's ``loss``),
    ``teacher_loss``/``teacher_accuracy``, the distillation terms, ``num_samples`` and
    ``num_steps``.
    """
    if epochs < 1 or batch_size < 1:
        raise ConfigurationError(f"train_dual needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    teacher.train()
    student.train()
    projections.train()
    scaler = make_grad_scaler(ctx)
    sums: dict[str, torch.Tensor] = {}
    seen = steps = 0
    for _ in range(epochs):
        for xb, yb in iterate_batches(data.train_x, data.train_y, batch_size, generator, min_batch=2):
            m = dual_distillation_step(
                teacher, student, projections, xb, yb, teacher_optimizer, student_optimizer, config,
                amp=autocast(ctx), scaler=scaler, logit_offset=logit_offset,
            )  # fmt: skip
            bs = int(yb.shape[0])
            for key, value in m.items():
                term = value.float() if key.startswith("correct_") else value.float() * bs
                sums[key] = term if key not in sums else sums[key] + term
            seen += bs
            steps += 1
    if seen == 0:
        raise ConfigurationError(f"client {data.client_id} has no training batch (needs >= 2 training samples)")
    mean = {k: float(v) / seen for k, v in sums.items()}  # one host sync per call
    return {
        "loss": mean["ce_student"],
        "accuracy": mean["correct_student"],
        "teacher_loss": mean["ce_teacher"],
        "teacher_accuracy": mean["correct_teacher"],
        "distill_rep_teacher": mean["rep_teacher"],
        "distill_rep_student": mean["rep_student"],
        "distill_kl_teacher": mean["kl_teacher"],
        "distill_kl_student": mean["kl_student"],
        "distill_weight": mean["adaptive_weight"],
        "objective_teacher": mean["loss_teacher"],
        "objective_student": mean["loss_student"],
        "num_samples": float(seen),
        "num_steps": float(steps),
    }
