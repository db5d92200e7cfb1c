"""The synthesis plan: which hospital receives how many synthetic images of which (class, device).

What crosses the network: each client reports only its class x device count matrix of its
local TRAIN split (integers, no images). The server sums them into the federation matrix
F[c, d], applies the rule below, samples the trained generator, and ships each client its
own synthetic set. The plan is pure integer arithmetic, so it is deterministic and
identical on any machine.

The rule (every number is a parameter of ``PlanConfig``):

1. Eligible cells. A cell (c, d) may be drawn only if d is not the held-out device (NEVER:
   the unseen-device test must stay unseen, and the generator never saw it) and the
   federation holds at least ``min_cell_support`` real training images of it (the generator
   learnt that cell from enough data; with 0 it would be pure extrapolation).
2. Target per client. Client k's class totals t_k[c] = sum_d n_k[c, d]; its largest class
   M_k = max_c t_k[c]; the target is T_k = ceil(target_fraction * M_k). The deficit of
   class c is e_k[c] = max(0, T_k - t_k[c]). Classes with e_k[c] > 0 are "under-covered"
   at k. (target_fraction = 1 balances every client's classes; 0.5 only lifts classes
   below half of the largest.)
3. Home device. A client's home device is its most frequent device (ties: lowest id); in
   this project every hospital has exactly one. Without ``cross_device`` the whole deficit
   e_k[c] goes to the cell (c, home).
4. ``cross_device: true`` (domain coverage). For an under-covered class, a share
   X = floor(cross_device_share * e_k[c]) of the deficit is spread equally over every
   OTHER eligible device of the federation (the remainder of the equal split goes to the
   lowest device ids), and the home cell gets e_k[c] - X. Why a share of the same deficit
   and not extra samples: the number of synthetic images per client is then the same with
   and without ``cross_device``, so an ablation of the switch measures the effect of
   *device coverage*, not of *more data*. If the home cell is not eligible, its part is
   skipped (and listed in ``skipped``).
5. Cap. When a client's total exceeds ``max_per_client``, every cell is scaled by
   cap / total, floored, and the leftover units go to the largest fractional parts (ties:
   class, then device order). Cells of 0 are dropped.

Synthetic images only ever join a client's TRAIN data (``is_synthetic`` = True); the
plan has no notion of val/test, and the data gate checks that no synthetic image equals
a test image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..data import make_generator
from ..protocol import ConfigurationError, reject_unknown_keys
from .generator import ConditionalSampler, images_to_uint8

__all__ = [
    "SAMPLING_STREAM",
    "PlanCell",
    "PlanConfig",
    "SynthesisPlan",
    "client_count_matrix",
    "compute_plan",
    "pooled_counts",
    "sample_plan",
]

#: Purpose tag of the per-client sampling stream (distinct from training streams).
SAMPLING_STREAM = 21


@dataclass(frozen=True)
class PlanConfig:
    """The configurable rule of the module docstring."""

    target_fraction: float = 1.0
    max_per_client: int = 400
    cross_device: bool = False
    cross_device_share: float = 0.5
    min_cell_support: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.cross_device, bool) is False:
            raise ConfigurationError(f"synthetic.plan.cross_device must be true or false, got {self.cross_device!r}.")
        checks = [
            (0.0 <= float(self.target_fraction) <= 10.0, f"target_fraction must be in [0, 10], got {self.target_fraction!r}."),
            (isinstance(self.max_per_client, int) and self.max_per_client >= 0, f"max_per_client must be an integer >= 0, got {self.max_per_client!r}."),
            (0.0 <= float(self.cross_device_share) <= 1.0, f"cross_device_share must be in [0, 1], got {self.cross_device_share!r}."),
            (isinstance(self.min_cell_support, int) and self.min_cell_support >= 0, f"min_cell_support must be an integer >= 0, got {self.min_cell_support!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"synthetic.plan: {message}")
        object.__setattr__(self, "target_fraction", float(self.target_fraction))
        object.__setattr__(self, "cross_device_share", float(self.cross_device_share))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PlanConfig:
        reject_unknown_keys(params, list(cls.__dataclass_fields__), "synthetic.plan")
        return cls(**dict(params))


@dataclass(frozen=True)
class PlanCell:
    """``n`` synthetic images of class ``class_id`` rendered as device ``device`` for a client."""

    class_id: int
    device: int
    n: int


@dataclass(frozen=True)
class SynthesisPlan:
    """Per client (sorted ids) the cells it receives; JSON round-trips via as_dict/from_dict."""

    cells: Mapping[str, tuple[PlanCell, ...]]
    num_classes: int
    num_devices: int
    held_out_device: int | None
    config: PlanConfig
    federation_counts: tuple[tuple[int, ...], ...]
    client_counts: Mapping[str, tuple[tuple[int, ...], ...]]
    targets: Mapping[str, int]
    skipped: tuple[dict[str, Any], ...] = ()

    @property
    def clients(self) -> list[str]:
        return sorted(self.cells)

    def total(self, client: str | None = None) -> int:
        names = self.clients if client is None else [client]
        return int(sum(cell.n for name in names for cell in self.cells[name]))

    def count_matrix(self, client: str) -> np.ndarray:
        """Planned counts of ``client`` as a (num_classes, num_devices) int64 matrix."""
        out = np.zeros((self.num_classes, self.num_devices), dtype=np.int64)
        for cell in self.cells[client]:
            out[cell.class_id, cell.device] += cell.n
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": "see fedmic_pipeline.core.synthesis.plan (module docstring)",
            "config": asdict(self.config),
            "num_classes": self.num_classes,
            "num_devices": self.num_devices,
            "held_out_device": self.held_out_device,
            "federation_counts": [list(row) for row in self.federation_counts],
            "client_counts": {k: [list(row) for row in v] for k, v in sorted(self.client_counts.items())},
            "targets": dict(sorted(self.targets.items())),
            "cells": {k: [asdict(c) for c in v] for k, v in sorted(self.cells.items())},
            "totals": {k: self.total(k) for k in self.clients},
            "total": self.total(),
            "skipped": [dict(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthesisPlan:
        try:
            return cls(
                cells={k: tuple(PlanCell(int(c["class_id"]), int(c["device"]), int(c["n"])) for c in v) for k, v in data["cells"].items()},
                num_classes=int(data["num_classes"]),
                num_devices=int(data["num_devices"]),
                held_out_device=None if data["held_out_device"] is None else int(data["held_out_device"]),
                config=PlanConfig(**data["config"]),
                federation_counts=tuple(tuple(int(x) for x in row) for row in data["federation_counts"]),
                client_counts={k: tuple(tuple(int(x) for x in row) for row in v) for k, v in data["client_counts"].items()},
                targets={k: int(v) for k, v in data["targets"].items()},
                skipped=tuple(dict(s) for s in data.get("skipped", [])),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigurationError(f"Not a synthesis plan ({exc!r}); re-run the synthetic_generation pipeline.") from None


def client_count_matrix(labels: np.ndarray, devices: np.ndarray | int, num_classes: int, num_devices: int) -> np.ndarray:
    """The (num_classes, num_devices) int64 count matrix a client reports (labels per
    sample; ``devices`` per sample or one int for the whole client)."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if np.ndim(devices) == 0:
        d = np.full(y.shape, int(np.asarray(devices)), dtype=np.int64)
    else:
        d = np.asarray(devices, dtype=np.int64).reshape(-1)
        if d.shape != y.shape:
            raise ConfigurationError(f"A count report needs one device per label: {d.size} devices for {y.size} labels.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigurationError(f"Labels outside [0, {num_classes - 1}] in a client's count report.")
    if y.size and (d.min() < 0 or d.max() >= num_devices):
        raise ConfigurationError(f"Device ids outside [0, {num_devices - 1}] in a client's count report.")
    out = np.zeros((num_classes, num_devices), dtype=np.int64)
    np.add.at(out, (y, d), 1)
    return out


def _equal_split(total: int, parts: int) -> list[int]:
    base, rest = divmod(int(total), parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def _cap(cells: dict[tuple[int, int], int], cap: int) -> dict[tuple[int, int], int]:
    """Scale ``cells`` down to sum ``cap`` by floor + largest remainder (rule 5)."""
    total = sum(cells.values())
    if total <= cap:
        return dict(cells)
    keys = sorted(cells)
    # exact rational arithmetic: n * cap // total and its remainder, no float rounding
    floors = {k: cells[k] * cap // total for k in keys}
    remainders = {k: cells[k] * cap % total for k in keys}
    leftover = cap - sum(floors.values())
    for k in sorted(keys, key=lambda key: (-remainders[key], key))[:leftover]:
        floors[k] += 1
    return floors


def compute_plan(
    client_counts: Mapping[str, np.ndarray],
    config: PlanConfig,
    held_out_device: int | None,
    num_classes: int | None = None,
    num_devices: int | None = None,
) -> SynthesisPlan:
    """Apply the rule of the module docstring to every client's reported count matrix."""
    if not client_counts:
        raise ConfigurationError("compute_plan got no client count reports (the partition has no clients).")
    names = sorted(client_counts)
    mats = {k: np.asarray(client_counts[k], dtype=np.int64) for k in names}
    shapes = {m.shape for m in mats.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ConfigurationError(f"Client count matrices must all be (classes, devices); got shapes {sorted(shapes)}.")
    n_classes, n_devices = next(iter(shapes))
    if (num_classes is not None and num_classes != n_classes) or (num_devices is not None and num_devices != n_devices):
        raise ConfigurationError(
            f"Count matrices are {n_classes}x{n_devices} but the dataset has {num_classes} classes and {num_devices} devices."
        )
    if any((m < 0).any() for m in mats.values()):
        raise ConfigurationError("Client count matrices must be non-negative.")
    if held_out_device is not None and not 0 <= held_out_device < n_devices:
        raise ConfigurationError(f"held_out_device {held_out_device} is not a device id in [0, {n_devices - 1}].")
    federation = sum(mats.values())
    eligible = federation >= max(config.min_cell_support, 1)
    if held_out_device is not None:
        eligible[:, held_out_device] = False

    cells: dict[str, tuple[PlanCell, ...]] = {}
    targets: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    for name in names:
        m = mats[name]
        class_totals = m.sum(axis=1)
        device_totals = m.sum(axis=0)
        planned: dict[tuple[int, int], int] = {}
        if class_totals.sum() == 0:
            targets[name] = 0
            cells[name] = ()
            continue
        home = int(np.argmax(device_totals))  # argmax returns the lowest id among ties
        target = int(math.ceil(config.target_fraction * int(class_totals.max()) - 1e-9))
        targets[name] = target
        for c in range(n_classes):
            deficit = max(0, target - int(class_totals[c]))
            if deficit == 0:
                continue
            home_n = deficit
            if config.cross_device:
                others = [d for d in range(n_devices) if d != home and eligible[c, d]]
                if others:
                    share = int(math.floor(config.cross_device_share * deficit + 1e-9))
                    for d, n in zip(others, _equal_split(share, len(others)), strict=True):
                        if n:
                            planned[(c, d)] = planned.get((c, d), 0) + n
                    home_n = deficit - share
            if home_n:
                if eligible[c, home]:
                    planned[(c, home)] = planned.get((c, home), 0) + home_n
                else:
                    reason = "held-out device" if home == held_out_device else (
                        f"federation support {int(federation[c, home])} < min_cell_support {config.min_cell_support}"
                    )
                    skipped.append({"client": name, "class_id": c, "device": home, "n": home_n, "reason": reason})
        planned = _cap(planned, config.max_per_client)
        cells[name] = tuple(PlanCell(c, d, n) for (c, d), n in sorted(planned.items()) if n > 0)
        if held_out_device is not None:
            assert all(cell.device != held_out_device for cell in cells[name])

    return SynthesisPlan(
        cells=cells,
        num_classes=int(n_classes),
        num_devices=int(n_devices),
        held_out_device=held_out_device,
        config=config,
        federation_counts=tuple(tuple(int(x) for x in row) for row in federation),
        client_counts={k: tuple(tuple(int(x) for x in row) for row in mats[k]) for k in names},
        targets=targets,
        skipped=tuple(skipped),
    )


def sample_plan(
    generator_model: ConditionalSampler,
    plan: SynthesisPlan,
    seed: int,
    layout_ndim: int,
    temperature: float = 1.0,
) -> dict[str, dict[str, np.ndarray]]:
    """Draw every client's planned images: ``{client: {images, labels, devices, is_synthetic}}``.

    ``images`` are uint8 in the partition's layout ((N,H,W) when ``layout_ndim`` is 3,
    (N,H,W,C) when 4), ``labels``/``devices`` int64 (N,), ``is_synthetic`` bool (N,), all
    True. Rows follow the plan's (class, device) order. Client i (in sorted order) draws
    from its own stream seeded by (seed, i, tag), so one client's set does not depend on
    what the others received.
    """
    if plan.held_out_device is not None and any(c.device == plan.held_out_device for v in plan.cells.values() for c in v):
        raise ConfigurationError("The plan contains the held-out device; refusing to sample it.")
    if generator_model.num_classes != plan.num_classes or generator_model.num_devices != plan.num_devices:
        raise ConfigurationError(
            f"The generator was built for {generator_model.num_classes} classes x {generator_model.num_devices} devices, "
            f"the plan for {plan.num_classes} x {plan.num_devices}; re-run the synthetic_generation pipeline."
        )
    out: dict[str, dict[str, np.ndarray]] = {}
    for index, name in enumerate(plan.clients):
        labels = np.asarray([c.class_id for c in plan.cells[name] for _ in range(c.n)], dtype=np.int64)
        devices = np.asarray([c.device for c in plan.cells[name] for _ in range(c.n)], dtype=np.int64)
        images = generator_model.sample(labels, devices, make_generator(seed, index, SAMPLING_STREAM), temperature=temperature)
        out[name] = {
            "images": images_to_uint8(images, layout_ndim),
            "labels": labels,
            "devices": devices,
            "is_synthetic": np.ones(labels.shape[0], dtype=bool),
        }
    return out


def pooled_counts(sets: Mapping[str, Mapping[str, np.ndarray]], num_classes: int, num_devices: int) -> dict[str, np.ndarray]:
    """Per client the (class, device) count matrix of sampled sets (the gate compares it to the plan)."""
    return {k: client_count_matrix(v["labels"], v["devices"], num_classes, num_devices) for k, v in sets.items()}
