"""Selection on validation, the constant-predictor flag, the majority row and the paired findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedmic_pipeline.core import evaluation as ev
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.protocol import ClientData, DataSpec
from fedmic_pipeline.core.selection import ValidationSelector, balanced_accuracy_from_counts, validation_counts
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation
from fedmic_pipeline.core.training import class_log_prior, recalibrate_batchnorm, round_lr
from fedmic_pipeline.reporting.findings import findings_markdown, paired_differences

from .conftest import NUM_CLASSES, TINY_STUDENT

COMMON = {"model_options": TINY_STUDENT, "batch_size": 8, "lr": 0.05, "momentum": 0.9}


def _constant_model(num_classes: int, winner: int) -> nn.Module:
    """Ignores its input and always scores class ``winner`` highest."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(num_classes) == winner)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the selector


def test_selector_keeps_the_best_validation_round_and_ties_keep_the_later() -> None:
    selector = ValidationSelector()
    models = [nn.Linear(2, 2) for _ in range(4)]
    for rnd, (score, model) in enumerate(zip((0.6, 0.8, 0.7, 0.8), models, strict=True)):
        selector.offer_global(rnd, score, model)
    assert selector.global_best.round == 3  # 0.8 twice: the later round
    chosen = ValidationSelector.materialise(models[0], selector.global_best)
    assert chosen is not models[0]
    assert all(torch.equal(chosen.state_dict()[k], v) for k, v in models[3].state_dict().items())
    assert selector.summary()["global_round"] == 4  # 1-based in reports


def test_personal_selection_needs_validation_signal() -> None:
    selector = ValidationSelector(min_val_per_class=5)
    model = nn.Linear(2, 2)
    one_class = np.array([[20, 0], [0, 0]])
    one_minority_image = np.array([[20, 0], [0, 1]])
    enough = np.array([[18, 2], [1, 6]])
    assert not selector.offer_personal(0, 0, one_class, 1.0, model)
    assert not selector.offer_personal(0, 0, one_minority_image, 1.0, model)
    assert selector.offer_personal(0, 0, enough, 5.0, model)
    # same balanced accuracy, lower loss wins; a worse balanced accuracy never does
    assert selector.offer_personal(0, 1, enough, 2.0, model)
    assert not selector.offer_personal(0, 2, np.array([[10, 10], [1, 6]]), 0.1, model)
    assert selector.personal_best[0].round == 1


def test_validation_counts_match_the_model() -> None:
    x = torch.rand(30, 1, 28, 28)
    y = torch.tensor([0] * 10 + [1] * 20)
    counts, nll = validation_counts(_constant_model(2, winner=1), x, y, num_classes=2)
    assert counts.tolist() == [[0, 10], [0, 20]] and nll > 0
    assert balanced_accuracy_from_counts(counts) == pytest.approx(0.5)


def test_selection_never_reads_a_test_set(clients: list[ClientData], spec: DataSpec) -> None:
    """Planting a signal in the test splits (labels rotated, images inverted) changes
    nothing about which rounds are selected or the weights reported."""
    config = SimulationConfig(num_rounds=3, seed=1, min_val_per_class=2)
    first = run_simulation(build_algorithm("fedavg", COMMON, spec), clients, spec, config)
    planted = [
        ClientData(**{**c.__dict__, "test_x": 1.0 - c.test_x, "test_y": (c.test_y + 1) % NUM_CLASSES}) for c in clients
    ]
    second = run_simulation(build_algorithm("fedavg", COMMON, spec), planted, spec, config)
    assert first.selector.summary() == second.selector.summary()
    a, b = first.global_model().state_dict(), second.global_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the choice is the best validation round of the history
    scores = [r["global_val_balanced_accuracy"] for r in first.history]
    best = max(range(len(scores)), key=lambda i: (scores[i], i))
    assert first.selector.summary()["global_round"] == best + 1


# --------------------------------------------------------------------------- metrics that cannot be gamed


def test_constant_flag_fires_on_a_constant_model_and_not_on_a_good_one() -> None:
    y = np.array([0] * 40 + [1] * 60)
    constant = np.tile([0.2, 0.8], (100, 1))
    good = np.where(y[:, None] == 1, [0.1, 0.9], [0.9, 0.1])
    assert ev.compute_metrics(y, constant, 2, n_bootstrap=0)["constant_predictor"] is True
    report = ev.compute_metrics(y, good, 2, n_bootstrap=0)
    assert report["constant_predictor"] is False and report["top_class_share"] == pytest.approx(0.6)
    # 96 % of one class with a few right minority calls is still flagged
    almost = constant.copy()
    almost[:4] = [0.9, 0.1]
    assert ev.compute_metrics(y, almost, 2, n_bootstrap=0)["constant_predictor"] is True


def test_majority_row_equals_the_class_prior() -> None:
    train = np.array([1] * 70 + [0] * 20 + [2] * 10)
    test = np.array([1] * 30 + [0] * 50 + [2] * 20)
    row = ev.majority_class_metrics(train, test, 3)
    assert row["accuracy"] == pytest.approx(0.30)  # the test share of the training majority
    assert row["balanced_accuracy"] == pytest.approx(1 / 3)
    assert row["macro_auc"] == pytest.approx(0.5)
    assert row["constant_predictor"] is True


def test_site_summary_says_how_many_sites_it_covers() -> None:
    sites = [
        {"client_id": 0, "accuracy": 0.9, "macro_auc": float("nan"), "constant_predictor": True},
        {"client_id": 1, "accuracy": 0.7, "macro_auc": 0.8, "constant_predictor": False},
    ]
    summary = ev.summarize_sites(sites)
    assert summary["num_sites"] == 2 and summary["num_constant_sites"] == 1
    assert summary["sites_covered"] == {"accuracy": 2, "macro_auc": 1}


# --------------------------------------------------------------------------- recipe pieces


def test_cosine_schedule_runs_from_lr_to_the_final_fraction() -> None:
    rates = [round_lr(0.1, "cosine", r, 11, 0.1) for r in range(11)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert round_lr(0.1, "constant", 7, 11, 0.1) == 0.1


def test_logit_adjustment_offset_is_the_smoothed_log_prior() -> None:
    offset = class_log_prior(torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert torch.allclose(offset.exp(), torch.tensor([4 / 7, 2 / 7, 1 / 7]))  # absent class: finite


def test_batchnorm_recalibration_makes_eval_match_the_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(64, 1, 8, 8) * 3 + 2
    model.train()
    model(torch.randn(16, 1, 8, 8))  # stale statistics of other data
    recalibrate_batchnorm(model, x, batch_size=16)
    features = model[0](x).detach()
    bn = model[1]
    assert torch.allclose(bn.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1  # restored


# --------------------------------------------------------------------------- findings


def _runs(fedmic: list[float], fedavg: list[float]) -> pd.DataFrame:
    rows = []
    for seed, (a, b) in enumerate(zip(fedmic, fedavg, strict=True)):
        rows.append({"dataset": "d", "lambda": 0.3, "join_ratio": 0.5, "seed": seed, "method": "fedmic", "global.balanced_accuracy": a})
        rows.append({"dataset": "d", "lambda": 0.3, "join_ratio": 0.5, "seed": seed, "method": "fedavg", "global.balanced_accuracy": b})
    return pd.DataFrame(rows)


def test_findings_state_a_difference_only_beyond_the_paired_spread() -> None:
    metrics = (("global.balanced_accuracy", "global balanced accuracy"),)
    clear = paired_differences(_runs([0.80, 0.85, 0.90], [0.70, 0.76, 0.79]), metrics=metrics).iloc[0]
    assert clear["stated"] and clear["verdict"] == "better" and clear["seeds_reference_better"] == 3
    # a large mean gap driven by one seed: the signs disagree -> not stated
    noisy = paired_differences(_runs([0.95, 0.70, 0.90], [0.60, 0.72, 0.80]), metrics=metrics).iloc[0]
    assert not noisy["stated"] and noisy["verdict"] == "not distinguishable"
    # same sign everywhere but |mean| below the spread -> not stated
    spread = paired_differences(_runs([0.71, 0.80, 0.72], [0.70, 0.70, 0.71]), metrics=metrics).iloc[0]
    assert abs(spread["mean_difference"]) < spread["std_difference"] and not spread["stated"]
    worse = paired_differences(_runs([0.60, 0.65, 0.70], [0.70, 0.76, 0.79]), metrics=metrics)
    text = findings_markdown(worse)
    assert worse.iloc[0]["verdict"] == "worse" and "**fedmic loses to**" in text and "fedavg" in text
