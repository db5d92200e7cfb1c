"""Many clients' models trained as one network: the local update of a round, batched.

Why: the shared StudentCNN is small, so on a CPU (and far more on a GPU) one client's step
is mostly per-operation overhead, not arithmetic. Stacking K clients' models along the
channel axis turns K small convolutions into one grouped convolution (``groups=K``), K
linear layers into one batched matmul, and K optimizer steps into one, so a round costs a
few large operations per step instead of K times as many small ones.

What stays exact (a test compares it with the sequential loop, client by client):

* each client draws the same batches from the same seeded generator as ``train_local``
  (``batch_indices``, trailing batch of one dropped);
* BatchNorm normalises every client's channels over that client's batch only: the stacked
  channels are disjoint per client, so a plain batch norm over (batch, K*C) channels is
  already per client. A client whose batch is shorter this step (a trailing batch) is
  padded and masked: a masked batch norm then takes its statistics over its real samples;
* the loss is the sum over clients of each client's mean cross-entropy (with its own
  logit offset) plus its proximal term, so each client's gradient is its own;
* a client whose batches run out leaves the stack (its slice is written back) and the
  others are restacked, so SGD with momentum and weight decay (PyTorch's update rule)
  steps exactly the clients that had a batch.

Results equal the sequential loop to floating-point tolerance, not bit for bit: a grouped
convolution sums in another order. Where bit-identical results are wanted, the simulation
runs clients one after another (``vectorize_clients: never``). Only the StudentCNN family
(conv, BatchNorm, ReLU, pooling, linear layers) and SGD are supported; ``can_stack`` says
whether a model qualifies, and the caller falls back to the sequential loop otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_indices
from .protocol import ClientData
from .training import TrainStats

__all__ = ["StackedModels", "can_stack", "train_stacked"]

_SHAPE_FREE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The model's layers in forward order, or None when it is not a body/head/classifier
    stack of supported layers (StudentCNN's shape)."""
    parts = [getattr(model, name, None) for name in ("body", "head", "classifier")]
    if not all(isinstance(p, nn.Module) for p in parts):
        return None
    layers: list[nn.Module] = []
    for part in parts:
        layers.extend(part if isinstance(part, nn.Sequential) else [part])
    supported = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, *_SHAPE_FREE)
    if not all(isinstance(layer, supported) for layer in layers):
        return None
    if any(isinstance(layer, nn.Conv2d) and layer.groups != 1 for layer in layers):
        return None
    return layers


def can_stack(model: nn.Module) -> bool:
    """Whether ``train_stacked`` can train copies of ``model`` together."""
    return _layers(model) is not None


class StackedModels:
    """K models of one architecture held as stacked leaf tensors with a client axis first.

    Conv weights are (K*C_out, C_in, kh, kw) (the grouped layout), BatchNorm tensors
    (K*C), linear weights (K, out, in). Activations before the flatten are (B, K*C, H, W);
    after it (K, B, features).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        layer_lists = [_layers(m) for m in models]
        if not models or any(ls is None for ls in layer_lists):
            raise ValueError("StackedModels needs StudentCNN-like models (see can_stack).")
        self.k = len(models)
        self.template: list[nn.Module] = layer_lists[0]  # type: ignore[assignment]
        self.params: list[torch.Tensor] = []
        self.param_sources: list[list[torch.Tensor]] = []
        self.buffers: list[dict[str, torch.Tensor]] = []
        self.buffer_sources: list[dict[str, list[torch.Tensor]]] = []
        self._slots: list[dict[str, int]] = []
        for position, layer in enumerate(self.template):
            group = [ls[position] for ls in layer_lists]  # type: ignore[index]
            slots: dict[str, int] = {}
            for name, _ in layer.named_parameters(recurse=False):
                sources = [getattr(g, name) for g in group]
                combine = torch.stack if isinstance(layer, nn.Linear) else torch.cat
                slots[name] = len(self.params)
                self.params.append(combine([s.detach() for s in sources]).contiguous().requires_grad_(True))
                self.param_sources.append(sources)
            buffers, sources_by_name = {}, {}
            if isinstance(layer, nn.BatchNorm2d) and layer.track_running_stats:
                for name in ("running_mean", "running_var"):
                    sources = [getattr(g, name) for g in group]
                    buffers[name] = torch.cat([s.detach() for s in sources]).clone()
                    sources_by_name[name] = sources
                tracked = [g.num_batches_tracked for g in group]
                buffers["num_batches_tracked"] = torch.stack([t.detach() for t in tracked]).clone()
                sources_by_name["num_batches_tracked"] = tracked
            self.buffers.append(buffers)
            self.buffer_sources.append(sources_by_name)
            self._slots.append(slots)

    def _param(self, position: int, name: str) -> torch.Tensor | None:
        slot = self._slots[position].get(name)
        return None if slot is None else self.params[slot]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (K, B, classes) of x (B, K*C, H, W); ``mask`` (K, B) marks real samples
        (None: every sample of every client is real)."""
        k, h = self.k, x
        flat = False
        for position, layer in enumerate(self.template):
            weight, bias = self._param(position, "weight"), self._param(position, "bias")
            if isinstance(layer, nn.Conv2d):
                h = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, groups=k)
            elif isinstance(layer, nn.BatchNorm2d):
                h = self._batch_norm(position, layer, h, mask)
            elif isinstance(layer, nn.Flatten):
                batch = h.shape[0]
                h = h.reshape(batch, k, -1).transpose(0, 1)
                flat = True
            elif isinstance(layer, nn.Linear):
                if not flat:
                    raise ValueError("a Linear layer before the Flatten cannot be stacked")
                h = h @ weight.transpose(1, 2) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            else:
                h = layer(h)
        return h

    def _batch_norm(self, position: int, layer: nn.BatchNorm2d, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        weight, bias = self._param(position, "weight"), self._param(position, "bias")
        buffers = self.buffers[position]
        momentum = 0.0 if layer.momentum is None else layer.momentum
        if mask is None:
            if buffers:
                buffers["num_batches_tracked"] += 1
            return F.batch_norm(
                h, buffers.get("running_mean"), buffers.get("running_var"), weight, bias, True, momentum, layer.eps
            )
        batch, kc, height, width = h.shape
        k, c = self.k, kc // self.k
        view = h.float().reshape(batch, k, c, height, width)
        weights = mask.t().to(view.dtype).reshape(batch, k, 1, 1, 1)
        n = (mask.sum(dim=1).to(view.dtype) * height * width).unsqueeze(1)  # (K, 1); every client has >= 2 samples
        mean = (view * weights).sum(dim=(0, 3, 4)) / n
        centered = view - mean.reshape(1, k, c, 1, 1)
        var = (centered.square() * weights).sum(dim=(0, 3, 4)) / n
        out = centered * torch.rsqrt(var + layer.eps).reshape(1, k, c, 1, 1)
        if weight is not None:
            out = out * weight.reshape(1, k, c, 1, 1) + bias.reshape(1, k, c, 1, 1)
        if buffers:
            with torch.no_grad():
                buffers["running_mean"].view(k, c).lerp_(mean.to(buffers["running_mean"].dtype), momentum)
                buffers["running_var"].view(k, c).lerp_((var * n / (n - 1)).to(buffers["running_var"].dtype), momentum)
                buffers["num_batches_tracked"] += 1
        return out.reshape(batch, kc, height, width).to(h.dtype)

    def split(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per client, its slice of each of ``tensors`` (laid out like ``params``), as copies."""
        parts = [t.detach().reshape(self.k, -1) for t in tensors]
        return [[part[i].clone() for part in parts] for i in range(self.k)]

    def join(self, per_client: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The inverse of ``split``: stacked tensors shaped like ``params``."""
        return [
            torch.stack([client[i] for client in per_client]).reshape(p.shape)
            for i, p in enumerate(self.params)
        ]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every client's slice back into its own model's tensors."""
        for stacked, sources in zip(self.params, self.param_sources, strict=True):
            for target, part in zip(sources, stacked.detach().reshape(self.k, -1), strict=True):
                target.copy_(part.reshape(target.shape))
        for buffers, sources_by_name in zip(self.buffers, self.buffer_sources, strict=True):
            for name, sources in sources_by_name.items():
                for target, part in zip(sources, buffers[name].view(self.k, -1), strict=True):
                    target.copy_(part.view_as(target))


def _schedule(
    datas: Sequence[ClientData], epochs: int, batch_size: int, generators: Sequence[torch.Generator]
) -> list[list[torch.Tensor]]:
    """Every client's batches for the whole local update, drawn as ``train_local`` draws them."""
    out = []
    for data, generator in zip(datas, generators, strict=True):
        batches: list[torch.Tensor] = []
        for _ in range(epochs):
            epoch = batch_indices(int(data.train_y.shape[0]), batch_size, generator)
            if len(epoch) > 1 and epoch[-1].numel() < 2:
                epoch = epoch[:-1]
            batches.extend(epoch)
        out.append(batches)
    return out


@dataclass
class _ClientRun:
    """One client's share of a stacked local update: its batches and what persists
    between phases (momentum buffers, the proximal anchor) and its running sums."""

    batches: list[torch.Tensor]
    pool_offset: int
    logit_offset: torch.Tensor | None
    momentum: list[torch.Tensor] | None = None
    anchor: list[torch.Tensor] | None = None
    done: int = 0
    seen: int = 0
    ce_sum: float = 0.0
    objective_sum: float = 0.0
    correct: int = 0

    def stats(self) -> TrainStats:
        return TrainStats(
            loss=self.ce_sum / self.seen,
            objective=self.objective_sum / self.seen,
            accuracy=self.correct / self.seen,
            num_samples=self.seen,
            num_steps=len(self.batches),
        )


def train_stacked(
    models: Sequence[nn.Module],
    datas: Sequence[ClientData],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    generators: Sequence[torch.Generator],
    logit_offsets: Sequence[torch.Tensor | None],
    proximal_mu: float = 0.0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> list[TrainStats]:
    """Train each of ``models`` on its client's data, together; the models are updated in
    place and their ``TrainStats`` returned in order (the same fields as ``train_local``).

    The clients run in phases: all of them step together until the one with the fewest
    batches is done, which then leaves the stack (its slice is written back), and the
    others go on restacked, so no step is spent on a client that has finished.
    ``proximal_mu`` adds FedProx's mu/2 ||w - w_start||^2 per client (w_start: the weights
    the models hold on entry, i.e. the payload). ``autocast``: a context manager factory
    for the forward pass (the round's AMP setting), or None.
    """
    pool_x = torch.cat([d.train_x for d in datas])
    pool_y = torch.cat([d.train_y for d in datas])
    starts = torch.cumsum(torch.tensor([0] + [int(d.train_y.shape[0]) for d in datas[:-1]]), 0).tolist()
    runs = [
        _ClientRun(batches, start, offset)
        for batches, start, offset in zip(_schedule(datas, epochs, batch_size, generators), starts, logit_offsets, strict=True)
    ]
    optimizer = _StackedSGD(lr, momentum, weight_decay)
    remaining = list(range(len(models)))
    while remaining:
        group = [runs[i] for i in remaining]
        stacked = StackedModels([models[i] for i in remaining])
        if proximal_mu > 0:
            for run, anchor in zip(group, stacked.split(stacked.params), strict=True):
                run.anchor = run.anchor if run.anchor is not None else [a.clone() for a in anchor]
        anchors = stacked.join([run.anchor for run in group]) if proximal_mu > 0 else None  # type: ignore[misc]
        buffers = stacked.join([run.momentum for run in group]) if group[0].momentum is not None else None
        offsets = _stack_offsets([run.logit_offset for run in group], pool_x.device)
        phase_steps = min(len(run.batches) - run.done for run in group)
        for _ in range(phase_steps):
            buffers = _stacked_step(stacked, group, pool_x, pool_y, offsets, anchors, proximal_mu, optimizer, buffers, autocast)
        stacked.write_back()
        if buffers is not None:
            for run, buffer in zip(group, stacked.split(buffers), strict=True):
                run.momentum = buffer
        remaining = [i for i in remaining if runs[i].done < len(runs[i].batches)]
    return [run.stats() for run in runs]


def _stacked_step(
    stacked: "StackedModels",
    group: list[_ClientRun],
    pool_x: torch.Tensor,
    pool_y: torch.Tensor,
    offsets: torch.Tensor | None,
    anchors: list[torch.Tensor] | None,
    proximal_mu: float,
    optimizer: "_StackedSGD",
    buffers: list[torch.Tensor] | None,
    autocast: Callable[[], AbstractContextManager] | None,
) -> list[torch.Tensor] | None:
    """One optimizer step of every client in ``group`` (each on its next batch)."""
    k, device = len(group), pool_x.device
    batches = [run.batches[run.done] for run in group]
    width = max(int(b.numel()) for b in batches)
    index = torch.zeros(width, k, dtype=torch.long)
    valid = torch.zeros(k, width, dtype=torch.bool)
    for client, (run, idx) in enumerate(zip(group, batches, strict=True)):
        index[:, client] = run.pool_offset
        index[: idx.numel(), client] = idx.cpu() + run.pool_offset
        valid[client, : idx.numel()] = True
    index, valid = index.to(device), valid.to(device)
    full = bool(valid.all())
    xb = pool_x.index_select(0, index.reshape(-1))
    xb = xb.reshape(width, k * pool_x.shape[1], *pool_x.shape[2:])
    yb = pool_y.index_select(0, index.t().reshape(-1)).reshape(k, width)
    with autocast() if autocast is not None else contextlib.nullcontext():
        logits = stacked.forward(xb, None if full else valid)
        adjusted = logits.float() if offsets is None else logits.float() + offsets
        per_sample = F.cross_entropy(adjusted.reshape(k * width, -1), yb.reshape(-1), reduction="none").reshape(k, width)
        if full:
            counts = torch.full((k,), float(width), device=device)
            ce = per_sample.mean(dim=1)
        else:
            weights = valid.to(per_sample.dtype)
            counts = weights.sum(dim=1)
            ce = (per_sample * weights).sum(dim=1) / counts
        objective = ce
        if anchors is not None:
            distance = sum(
                (p - a).square().reshape(k, -1).sum(dim=1) for p, a in zip(stacked.params, anchors, strict=True)
            )
            objective = ce + 0.5 * proximal_mu * distance
    for p in stacked.params:
        p.grad = None
    objective.sum().backward()
    buffers = optimizer.step(stacked.params, buffers, k)
    with torch.no_grad():
        correct = ((logits.detach().argmax(dim=2) == yb) & valid).sum(dim=1).tolist()
        ce_values, objective_values, count_values = ce.tolist(), objective.tolist(), counts.tolist()
    for client, run in enumerate(group):
        n = int(count_values[client])
        run.seen += n
        run.ce_sum += ce_values[client] * n
        run.objective_sum += objective_values[client] * n
        run.correct += int(correct[client])
        run.done += 1
    return buffers


def _stack_offsets(offsets: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """The clients' logit offsets as (K, 1, classes), zeros for a client without one."""
    if all(o is None for o in offsets):
        return None
    template = next(o for o in offsets if o is not None)
    return torch.stack([o if o is not None else torch.zeros_like(template) for o in offsets]).to(device).unsqueeze(1)


class _StackedSGD:
    """PyTorch's SGD update (dampening 0, no Nesterov) on stacked parameters.

    Every client of a phase has a batch at every step of it, so a plain step over the stack
    is each client's own step. On a client's first step its momentum buffer is the
    gradient itself, as in ``torch.optim.SGD``; every client takes its first step in the
    first phase.
    """

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], buffers: list[torch.Tensor] | None, k: int) -> list[torch.Tensor] | None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            if buffers is None:
                buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)
        return buffers if self.momentum else None
