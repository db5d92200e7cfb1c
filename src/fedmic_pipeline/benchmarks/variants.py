"""The three variants of the throughput benchmark: what each trains and how it is timed.

Every variant is an algorithm run by ``core.simulation.run_simulation`` (the engine) with
evaluation off; they differ only in the client's local-training data path and batch size
(``naive``: the ``naive.py`` subclasses over DataLoaders; ``resident_bs10`` and
``resident``: the registered algorithm at batch 10 and at its configured batch size, one
client after another; ``vectorized``: the same at its configured batch size with the
round's clients trained together, ``core/vectorized.py``, for the methods that stack). A
round's figures are the engine's own: the samples its clients trained on
(``client_metrics[*].num_samples``) and its ``train_time_s``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import to_client_data
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, FederatedAlgorithm
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation
from fedmic_pipeline.datasets.npz_dataset import load_npz

from .naive import naive_algorithm
from .settings import BenchmarkSettings

__all__ = [
    "DATA_PATHS",
    "NAIVE",
    "NAIVE_BATCH_SIZE",
    "RESIDENT",
    "RESIDENT_BS10",
    "VARIANT_LABELS",
    "VECTORIZED",
    "build_variant",
    "load_partition",
    "round_timings",
    "simulate",
]

NAIVE = "naive"
RESIDENT_BS10 = "resident_bs10"
RESIDENT = "resident"
VECTORIZED = "vectorized"
NAIVE_BATCH_SIZE = 10
DATA_PATHS = {
    NAIVE: "DataLoader(map-style Dataset, uint8->float per __getitem__), num_workers=0",
    RESIDENT_BS10: "resident float32 tensors, seeded index slices (project)",
    RESIDENT: "resident float32 tensors, seeded index slices (project)",
    VECTORIZED: "resident tensors, the round's clients stacked into one grouped network (project)",
}
VARIANT_LABELS = {
    NAIVE: "naive DataLoader",
    RESIDENT_BS10: "resident (project)",
    RESIDENT: "resident (project)",
    VECTORIZED: "clients together (project)",
}


def _client_id(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        raise ConfigurationError(f"{path.name}: client files must be named client_<number>.npz.") from None


def load_partition(
    partition_dir: Path, device: torch.device | str = "cpu"
) -> tuple[list[ClientData], DataSpec, dict[int, dict[str, np.ndarray]]]:
    """The clients of a partition (``<dir>/clients/client_XX.npz`` or ``<dir>/client_XX.npz``).

    Returns the project's resident ClientData, the DataSpec (channels and image size from
    the images; classes from ``partition_manifest.json`` when present, else the largest
    label + 1) and the raw numpy arrays per client id (the naive path reads those).
    """
    root = Path(partition_dir)
    client_dir = root / "clients" if (root / "clients").is_dir() else root
    files = sorted(client_dir.glob("client_*.npz"))
    if not files:
        raise ConfigurationError(
            f"No client_*.npz under {client_dir}; run the partition first (make run) or pass --partition-dir."
        )
    raw = {_client_id(f): load_npz(f) for f in files}
    clients = [to_client_data(arrays, cid, device) for cid, arrays in sorted(raw.items())]
    num_classes = None
    manifest = root / "partition_manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text(encoding="utf-8")).get("dataset", {})
        num_classes = info.get("n_classes")
    if num_classes is None:
        splits = [getattr(c, f"{s}_y") for c in clients for s in ("train", "val", "test")]
        labels = [int(y.max()) for y in splits if y.numel()]
        num_classes = max(2, max(labels) + 1)
    x = clients[0].train_x
    spec = DataSpec(in_channels=int(x.shape[1]), num_classes=int(num_classes), image_size=int(x.shape[2]))
    return clients, spec, raw


def build_variant(
    variant: str,
    name: str,
    params: Mapping[str, Any],
    spec: DataSpec,
    clients: Sequence[ClientData],
    raw: Mapping[int, Mapping[str, np.ndarray]],
    batch_size: int,
    seed: int,
) -> FederatedAlgorithm:
    """The algorithm ``variant`` trains for ``clients``: the naive subclass over DataLoaders
    of ``batch_size``, or the registered algorithm with ``batch_size`` as its own."""
    if variant == NAIVE:
        return naive_algorithm(name, params, spec, {c.client_id: raw[c.client_id] for c in clients}, batch_size, seed)
    return build_algorithm(name, {**params, "batch_size": batch_size}, spec)


def simulate(
    algorithm: FederatedAlgorithm,
    clients: Sequence[ClientData],
    spec: DataSpec,
    settings: BenchmarkSettings,
    device: torch.device,
    rounds: int,
    vectorize_clients: str = "never",
) -> list[dict[str, Any]]:
    """The history of ``rounds`` engine rounds of ``algorithm`` in ``settings``, never evaluated."""
    config = SimulationConfig(
        num_rounds=rounds, join_ratio=settings.join_ratio, seed=settings.seed, device=str(device), amp=settings.amp,
        eval_every=rounds, evaluate_global=False, evaluate_personalized=False, vectorize_clients=vectorize_clients,
    )  # fmt: skip
    return run_simulation(algorithm, clients, spec, config).history


def round_timings(history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """(samples trained, seconds from the first client's update to the aggregated model) per round."""
    return [(int(sum(m["num_samples"] for m in r["client_metrics"])), float(r["train_time_s"])) for r in history]
