"""The training switch for extra data: synthetic sets, or as many augmented real samples."""

from __future__ import annotations

import numpy as np
import pytest

from fedmic_pipeline import federation
from fedmic_pipeline.core.augment import augment_like
from fedmic_pipeline.core.protocol import ConfigurationError


def _client(n: int = 40, rgb: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, 12, 12, 3) if rgb else (n, 12, 12)
    labels = np.array([0] * (n - 5) + [1] * 5, dtype=np.int64)
    arrays = {"device": np.array(2)}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.copy()
    return arrays


@pytest.mark.parametrize("rgb", [False, True])
def test_augment_like_matches_counts_classes_and_layout(rgb):
    client = _client(rgb=rgb)
    wanted = np.array([1] * 7 + [2] * 3)  # class 2 is absent at this client
    out = augment_like(client["train_images"], client["train_labels"], wanted, seed=3)
    assert out["images"].shape == (10, *client["train_images"].shape[1:]) and out["images"].dtype == np.uint8
    assert (out["labels"][:7] == 1).all()  # same class where the client has it
    assert set(out["labels"][7:]) <= {0, 1}  # never a class the client never saw
    assert not out["is_synthetic"].any()
    again = augment_like(client["train_images"], client["train_labels"], wanted, seed=3)
    assert np.array_equal(out["images"], again["images"])
    other = augment_like(client["train_images"], client["train_labels"], wanted, seed=4)
    assert not np.array_equal(out["images"], other["images"])


def test_switch_adds_extra_data_to_train_only():
    partitions = {"client_00": _client(), "client_01": _client(seed=1)}
    synthetic = {
        key: {
            "images": np.full((6, 12, 12), 128, dtype=np.uint8),
            "labels": np.array([1, 1, 1, 0, 0, 1]),
            "devices": np.full(6, 2),
            "is_synthetic": np.ones(6, dtype=bool),
        }
        for key in partitions
    }
    assert federation.extra_training_sets("none", partitions, synthetic, seed=0) is None
    for mode in ("synthetic", "augmented"):
        extra = federation.extra_training_sets(mode, partitions, synthetic, seed=0)
        clients = federation.build_clients(partitions, extra)
        for client in clients:
            assert client.num_train == 40 + 6
            assert client.val_y.shape[0] == 40 and client.test_y.shape[0] == 40  # never in val/test
            assert int(client.train_is_synthetic.sum()) == (6 if mode == "synthetic" else 0)
            assert client.device_id == 2


def test_switch_needs_the_synthetic_sets_and_a_known_mode():
    partitions = {"client_00": _client()}
    with pytest.raises(ConfigurationError, match="synthetic_generation"):
        federation.extra_training_sets("synthetic", partitions, None, seed=0)
    with pytest.raises(ConfigurationError, match="none, synthetic, augmented"):
        federation.extra_training_sets("more", partitions, {}, seed=0)
