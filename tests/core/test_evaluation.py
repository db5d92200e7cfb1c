"""Metrics against scikit-learn (tests only: the core itself uses numpy), CIs, calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from fedmic_pipeline.core import evaluation as ev
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import ClientData, DataSpec
from fedmic_pipeline.core.simulation import SimulationConfig, evaluate_result, run_simulation

from .conftest import TINY_STUDENT


def _predictions(k: int, n: int, seed: int, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities; ``coarse`` rounds logits so scores tie often."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    if coarse:
        logits = np.round(logits)
    proba = np.exp(logits)
    return y, proba / proba.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("coarse", [False, True])
def test_metrics_match_sklearn(k: int, coarse: bool) -> None:
    y, proba = _predictions(k, 400, seed=k, coarse=coarse)
    pred = proba.argmax(axis=1)
    assert ev.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert ev.balanced_accuracy(y, pred, k) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert ev.macro_f1(y, pred, k) == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    np.testing.assert_allclose(ev.per_class_recall(y, pred, k), skm.recall_score(y, pred, average=None), atol=1e-12)
    np.testing.assert_array_equal(ev.confusion_matrix(y, pred, k), skm.confusion_matrix(y, pred, labels=range(k)))
    expected_auc = (
        skm.roc_auc_score(y, proba[:, 1]) if k == 2 else skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    assert ev.macro_auc(y, proba) == pytest.approx(expected_auc, abs=1e-12)


def test_absent_and_never_predicted_classes_follow_sklearn() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    pred = np.array([0, 2, 1, 1, 0, 0])  # class 2 predicted but absent from y; class 3 nowhere
    assert ev.macro_f1(y, pred, 4) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    with pytest.warns(UserWarning):
        expected = skm.balanced_accuracy_score(y, pred)
    assert ev.balanced_accuracy(y, pred, 4) == pytest.approx(expected)
    recall = ev.per_class_recall(y, pred, 4)
    assert math.isnan(recall[2]) and math.isnan(recall[3])
    # AUC over the classes present in y only (sklearn raises for multiclass here)
    proba = np.full((6, 3), 0.1)
    proba[np.arange(6), pred % 3] = 0.8
    expected_auc = np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in (0, 1)])
    assert ev.macro_auc(y, proba) == pytest.approx(expected_auc)


def test_ece_matches_a_direct_loop() -> None:
    y, proba = _predictions(3, 300, seed=1, coarse=False)
    conf, pred = proba.max(axis=1), proba.argmax(axis=1)
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            expected += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    assert ev.expected_calibration_error(y, proba) == pytest.approx(expected, abs=1e-12)
    perfect = np.eye(3)[y]
    assert ev.expected_calibration_error(y, perfect) == pytest.approx(0.0)


def test_bootstrap_is_seeded_vectorised_and_brackets_the_estimate() -> None:
    y, proba = _predictions(3, 300, seed=2, coarse=True)
    a = ev.compute_metrics(y, proba, 3, n_bootstrap=600, seed=4)
    b = ev.compute_metrics(y, proba, 3, n_bootstrap=600, seed=4)
    c = ev.compute_metrics(y, proba, 3, n_bootstrap=600, seed=5)
    assert a == b and a["ci"] != c["ci"]
    for name in ev.SCALAR_METRICS:
        low, high = a["ci"][name]
        assert low <= a[name] <= high and high - low < 0.25, name
    assert len(a["per_class_recall_ci"]) == 3 and a["n"] == 300 and a["n_bootstrap"] == 600
    # the weight engine reproduces a plain resample metric for metric
    rng = np.random.default_rng(0)
    w = ev.bootstrap_weights(300, 1, rng)
    idx = np.repeat(np.arange(300), w[0].astype(int))
    one = ev._metrics_w(w, y, proba, 15)
    assert one["accuracy"][0] == pytest.approx(skm.accuracy_score(y[idx], proba[idx].argmax(1)))
    assert one["macro_auc"][0] == pytest.approx(skm.roc_auc_score(y[idx], proba[idx], multi_class="ovr"))
    assert one["macro_f1"][0] == pytest.approx(skm.f1_score(y[idx], proba[idx].argmax(1), average="macro"))
    no_ci = ev.compute_metrics(y, proba, 3, n_bootstrap=0)
    assert "ci" not in no_ci and no_ci["accuracy"] == a["accuracy"]


def test_predict_proba_and_evaluate_model(spec: DataSpec, global_test) -> None:
    model = build_model("student_cnn", spec, seed=0, **TINY_STUDENT)
    model.train()
    x, y = global_test
    proba = ev.predict_proba(model, x, batch_size=7)
    assert proba.shape == (60, 3) and np.allclose(proba.sum(axis=1), 1.0) and model.training
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(proba, torch.softmax(model(x), 1).double().numpy(), atol=1e-6)
    result = ev.evaluate_model(model, x, y, num_classes=3, n_bootstrap=50, seed=0)
    assert set(ev.SCALAR_METRICS) <= set(result) and len(result["confusion_matrix"]) == 3
    assert result["accuracy"] == pytest.approx(ev.accuracy_of(model, x, y))


def test_summarize_sites_mean_and_worst() -> None:
    sites = [
        {"client_id": 4, "accuracy": 0.9, "ece": 0.05, "macro_auc": float("nan")},
        {"client_id": 7, "accuracy": 0.6, "ece": 0.20, "macro_auc": 0.8},
        {"client_id": 9, "accuracy": 0.75, "ece": 0.10, "macro_auc": 0.7},
    ]
    s = ev.summarize_sites(sites)
    assert s["num_sites"] == 3
    assert s["mean"]["accuracy"] == pytest.approx(0.75) and s["worst"]["accuracy"] == 0.6
    assert s["worst_site"]["accuracy"] == 7
    assert s["worst"]["ece"] == 0.20 and s["worst_site"]["ece"] == 7  # lower is better for ECE
    assert s["mean"]["macro_auc"] == pytest.approx(0.75) and s["worst_site"]["macro_auc"] == 9  # NaN ignored


def test_evaluate_result_reports_global_and_sites(clients: list[ClientData], spec: DataSpec, global_test) -> None:
    algorithm = build_algorithm("fedavg", {"model_options": TINY_STUDENT, "batch_size": 8}, spec)
    result = run_simulation(algorithm, clients, spec, SimulationConfig(num_rounds=1))
    report = evaluate_result(result, clients, 3, global_test=global_test, n_bootstrap=20)
    assert report["global"]["n"] == 60 and len(report["sites"]) == 3
    assert [s["client_id"] for s in report["sites"]] == [0, 1, 2]
    assert report["site_summary"]["num_sites"] == 3 and "accuracy" in report["site_summary"]["worst"]


def test_reliability_bins_are_the_ece_behind_the_metric() -> None:
    """The bins the reliability diagram draws reproduce the reported ECE exactly."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet([0.5, 0.5, 0.5], 300)
    metrics = ev.compute_metrics(y, proba, 3, n_bootstrap=0)
    bins = metrics["reliability"]
    assert sum(bins["count"]) == 300 and len(bins["count"]) == 15
    ece = sum(n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["mean_confidence"]) if n) / 300
    assert ece == pytest.approx(metrics["ece"], abs=1e-12)
