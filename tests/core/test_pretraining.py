"""Server pretraining on the synthetic pool (core/pretraining.py): it changes the model round 1
starts from, deterministically, for every method with a shared model, and is configured by
`training.pretraining` (on with the synthetic sets by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmic_pipeline.configuration import TrainingConfig
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import to_client_data, to_tensors
from fedmic_pipeline.core.engine import Callback, SimulationConfig
from fedmic_pipeline.core.pretraining import PretrainingConfig, ServerPretraining, state_digest
from fedmic_pipeline.core.protocol import ConfigurationError, DataSpec
from fedmic_pipeline.core.simulation import run_simulation

SPEC = DataSpec(in_channels=1, num_classes=2, image_size=12)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class 1 is bright in the left half, class 0 in the right half: learnable in a few steps."""
    images = rng.integers(0, 60, size=(len(labels), 12, 12)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, :, :6] += 150 if label == 1 else 0
        images[i, :, 6:] += 0 if label == 1 else 150
    return images


def _clients(n_clients: int = 3) -> list:
    rng = np.random.default_rng(0)
    clients = []
    for cid in range(n_clients):
        arrays: dict[str, np.ndarray] = {"device": np.array(cid % 2)}
        for split, n in (("train", 24), ("val", 12), ("test", 12)):
            labels = rng.integers(0, 2, size=n).astype(np.int64)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = _images(labels, rng), labels
        clients.append(to_client_data(arrays, cid))
    return clients


def _pool(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 4) + [1] * (n - n // 4), dtype=np.int64)  # imbalanced, as planned pools are
    return to_tensors(_images(labels, rng), labels)


class FirstBroadcast(Callback):
    """Keeps the payload the engine will send in round 1 (after every on_train_begin before it)."""

    def on_train_begin(self, engine, state) -> None:
        self.payload = {k: v.detach().clone() for k, v in state.payload.items()}
        self.models = {k: v for k, v in state.server_state.items() if isinstance(v, torch.nn.Module)}
        self.digests = {k: state_digest(v) for k, v in self.models.items()}
        self.weights = {k: v.state_dict()[k].detach().clone() for v in self.models.values() for k in self.payload if k in v.state_dict()}


def _run(method: str, pretraining: PretrainingConfig | None, params: dict | None = None):
    algorithm = build_algorithm(method, {"batch_size": 8, **(params or {})}, SPEC)
    callbacks = [ServerPretraining(*_pool(), pretraining)] if pretraining else []
    first = FirstBroadcast()
    config = SimulationConfig(num_rounds=1, join_ratio=1.0, seed=3, num_threads=1, device="cpu")
    result = run_simulation(algorithm, _clients(), SPEC, config, callbacks=[*callbacks, first])
    return (callbacks[0] if callbacks else None), first, result


def test_pretraining_changes_the_first_broadcast_deterministically_and_learns_the_pool():
    config = PretrainingConfig(epochs=3, lr=0.05, batch_size=16)
    pretraining, first, _ = _run("fedavg", config)
    _, plain, _ = _run("fedavg", None)
    again, first_again, _ = _run("fedavg", config)

    summary = pretraining.summary
    assert summary["samples"] == 96 and summary["class_counts"] == [24, 72] and summary["epochs"] == 3
    assert summary["initial_digest"] != summary["pretrained_digest"]
    assert summary["loss_by_epoch"][-1] < summary["loss_by_epoch"][0]
    changed = [k for k in plain.payload if not torch.equal(plain.payload[k], first.payload[k])]
    assert changed, "round 1 must start from the pretrained model, not the random initialisation"
    assert summary["initial_digest"] == state_digest(_fresh_fedavg_model())  # pretraining started from the usual init
    assert again.summary["pretrained_digest"] == summary["pretrained_digest"]
    assert all(torch.equal(first.payload[k], first_again.payload[k]) for k in first.payload)

    model = _fresh_fedavg_model()
    model.load_state_dict({k: v for k, v in first.payload.items()})
    x, y = _pool(seed=7)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    recall = [float((predicted[y == c] == c).float().mean()) for c in (0, 1)]
    assert min(recall) > 0.8, f"the pretrained model should tell the two classes apart, per-class recall {recall}"


def _fresh_fedavg_model():
    server_state, _ = build_algorithm("fedavg", {"batch_size": 8}, SPEC).init_server(3)
    return server_state["model"]


def test_fedmic_with_downlink_compression_pretrains_both_server_copies():
    pretraining, first, _ = _run("fedmic", PretrainingConfig(epochs=1), {"teacher_model": "student_cnn", "downlink_compression": True})
    assert first.digests["model"] == first.digests["view_model"] == pretraining.summary["pretrained_digest"]
    assert first.weights and all(torch.equal(first.payload[k], w) for k, w in first.weights.items())


def test_a_method_without_a_shared_model_refuses_pretraining():
    with pytest.raises(ConfigurationError, match="no shared model to pretrain"):
        _run("local_only", PretrainingConfig(epochs=1))


def test_training_pretraining_is_on_with_the_synthetic_sets_and_checked():
    assert TrainingConfig.from_params({"extra_training_data": "synthetic"}).pretraining == PretrainingConfig()
    assert TrainingConfig.from_params({"extra_training_data": "none"}).pretraining is None
    assert TrainingConfig.from_params({"extra_training_data": "synthetic", "pretraining": {"enabled": False}}).pretraining is None
    forced = TrainingConfig.from_params({"pretraining": {"enabled": True, "epochs": 4}}).pretraining
    assert forced == PretrainingConfig(epochs=4)
    with pytest.raises(ConfigurationError, match=r"Unknown key\(s\) \['epoch'\] in training.pretraining"):
        TrainingConfig.from_params({"pretraining": {"enabled": True, "epoch": 4}})
    with pytest.raises(ConfigurationError, match="pretraining.lr must be > 0"):
        TrainingConfig.from_params({"pretraining": {"enabled": True, "lr": 0}})
    with pytest.raises(ConfigurationError, match="enabled must be true, false or auto"):
        TrainingConfig.from_params({"pretraining": {"enabled": "sometimes"}})
