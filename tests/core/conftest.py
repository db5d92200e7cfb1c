"""Tiny, easy, synthetic federated data shared by the core tests.

Three hospitals, three classes, 1x28x28 uint8 images in which the class is plainly
visible: class k lights up quadrant k on a dim noisy background. A student CNN learns it
in one or two epochs, so "beats chance after two rounds" is a real, fast check. Label
skew makes the clients non-IID and unequal in size (the FedAvg weights then matter).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.data import to_client_data, to_tensors
from fedmic_pipeline.core.protocol import ClientData, DataSpec

NUM_CLASSES = 3
#: train samples per class for each client (label skew, unequal sizes)
CLIENT_CLASS_COUNTS = ((30, 10, 4), (6, 28, 12), (8, 8, 40))
#: a thin student for speed: 8/16/32 channels, 32 features
TINY_STUDENT = {"widths": (8, 16, 32), "feature_dim": 32}


def easy_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 28, 28): background noise in [0, 60), class k's quadrant in [150, 256)."""
    n = labels.shape[0]
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.int64)
    for i, k in enumerate(labels):
        r, c = divmod(int(k) % 4, 2)
        images[i, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = rng.integers(150, 256, size=(14, 14))
    return images.astype(np.uint8)


def make_client_arrays(counts: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """NpzDataset-style arrays for one client: train as ``counts``, val/test a third of it."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, scale in (("train", 1.0), ("val", 1 / 3), ("test", 1 / 3)):
        labels = np.concatenate([np.full(max(1, round(c * scale)), k) for k, c in enumerate(counts)]).astype(np.int64)
        labels = rng.permutation(labels)
        out[f"{split}_images"] = easy_images(labels, rng)
        out[f"{split}_labels"] = labels[:, None].astype(np.uint8)  # MedMNIST's (N, 1) uint8 labels
    return out


@pytest.fixture(scope="session")
def spec() -> DataSpec:
    return DataSpec(in_channels=1, num_classes=NUM_CLASSES, image_size=28)


@pytest.fixture(scope="session")
def client_arrays() -> list[dict[str, np.ndarray]]:
    return [make_client_arrays(counts, seed=100 + i) for i, counts in enumerate(CLIENT_CLASS_COUNTS)]


@pytest.fixture()
def clients(client_arrays: list[dict[str, np.ndarray]]) -> list[ClientData]:
    """Fresh tensors per test (tests may not share mutable tensors by accident)."""
    return [to_client_data(arrays, client_id=i, device="cpu") for i, arrays in enumerate(client_arrays)]


@pytest.fixture(scope="session")
def global_test() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    return to_tensors(easy_images(labels, rng), labels, "cpu")
