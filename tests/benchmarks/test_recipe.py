"""The training recipe of conf/base learns on a small real partition of PneumoniaMNIST.

Four hospitals cut from the bundled PneumoniaMNIST with the label skew the default
partition produces: one holds both classes, three hold nearly one class. Under the
recipe of `conf/base/parameters_federated_training.yml`, FedAvg's global model and the
personalized models of local-only training and FedMIC at the two-class hospital must
not be constant predictors on real test images. With the first wave's defaults (plain
SGD at a constant rate, plain cross-entropy, FedMIC's distillation weight capped at 100)
every one of them was constant on this partition.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedmic_pipeline import federation
from fedmic_pipeline import model_evaluation
from fedmic_pipeline.core.evaluation import compute_metrics, predict_proba
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation
from fixtures_pipelines import PROJECT_ROOT as ROOT

#: (normal, pneumonia) training images per hospital; val and test are a quarter of that
HOSPITALS = ((60, 60), (90, 4), (4, 140), (3, 100))
TWO_CLASS_HOSPITAL = 0
ROUNDS = 10


def _split(images: np.ndarray, labels: np.ndarray, counts: tuple[int, int], rng: np.random.Generator) -> dict:
    out = {}
    pools = {k: rng.permutation(np.flatnonzero(labels == k)) for k in (0, 1)}
    taken = {0: 0, 1: 0}
    for split, scale in (("train", 1.0), ("val", 0.25), ("test", 0.25)):
        index = []
        for k in (0, 1):
            n = max(1, round(counts[k] * scale))
            index.extend(pools[k][taken[k] : taken[k] + n])
            taken[k] += n
        index = rng.permutation(np.array(index))
        out[f"{split}_images"] = images[index]
        out[f"{split}_labels"] = labels[index][:, None].astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def real_partition():
    raw = np.load(ROOT / "data/01_raw/pneumoniamnist.npz")
    images, labels = raw["train_images"], raw["train_labels"].reshape(-1).astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    images, labels = images[order], labels[order]
    clients, start = {}, 0
    for i, counts in enumerate(HOSPITALS):  # disjoint slices of the shuffled pool
        block = slice(start, start + 900)
        clients[f"client_{i:02d}"] = _split(images[block], labels[block], counts, rng)
        start += 900
    test = model_evaluation.global_test_tensors({"images": raw["test_images"], "labels": raw["test_labels"]})
    info = {"n_channels": 1, "n_classes": 2, "size": 28}
    return federation.build_clients(clients), test, info


def _defaults():
    params = yaml.safe_load((ROOT / "conf/base/parameters_federated_training.yml").read_text())
    return params["algorithm_params"]


def _run(method: str, partition, **fedmic_overrides):
    clients, _, info = partition
    params = _defaults()
    params[method] = {**(params.get(method) or {}), **fedmic_overrides}
    spec = federation.data_spec(info)
    algorithm = federation.make_algorithm(method, params, spec)
    config = SimulationConfig(num_rounds=ROUNDS, join_ratio=1.0, seed=0, device="cpu", num_threads=1)
    return run_simulation(algorithm, clients, spec, config)


def _metrics(model, x, y) -> dict:
    return compute_metrics(y.numpy(), predict_proba(model, x), 2, n_bootstrap=0)


def test_fedavg_global_model_learns_under_the_default_recipe(real_partition) -> None:
    result = _run("fedavg", real_partition)
    _, (test_x, test_y), _ = real_partition
    metrics = _metrics(result.global_model(), test_x, test_y)
    assert not metrics["constant_predictor"], metrics
    assert metrics["balanced_accuracy"] > 0.7 and metrics["macro_auc"] > 0.8, metrics


@pytest.mark.parametrize("method", ["local_only", "fedmic"])
def test_personalized_model_of_the_two_class_hospital_is_not_constant(real_partition, method: str) -> None:
    # a thin teacher keeps the test fast; the recipe under test is everything else
    overrides = {"teacher_width": 0.25, "teacher_model": "student_cnn"} if method == "fedmic" else {}
    result = _run(method, real_partition, **overrides)
    clients, _, _ = real_partition
    hospital = clients[TWO_CLASS_HOSPITAL]
    metrics = _metrics(result.personalized_model(hospital.client_id), hospital.test_x, hospital.test_y)
    assert not metrics["constant_predictor"], metrics
    assert metrics["balanced_accuracy"] > 0.7, metrics
