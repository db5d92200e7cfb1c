"""The `ablation` nodes: the synthetic data gate stands between the generator and every arm,
and the paired-by-seed differences and verdict are computed, not read off a table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmic_pipeline import synthetic_sets
from fedmic_pipeline.core.synthesis import SynthesisPlan
from fedmic_pipeline.pipelines.ablation import nodes
from fedmic_pipeline.validation.gate import DataGateError

from fixtures_pipelines import PROJECT_ROOT, project_params, training_params
from pipelines.synthetic_generation.test_pipeline import tiny_dataset, tiny_synthetic_params


def test_sets_that_fail_the_synthetic_gate_stop_the_ablation_before_any_training(monkeypatch):
    """One synthetic image labelled with the held-out device (which no hospital may train on)
    is enough: the ablation raises the gate's error and trains nothing."""
    real_sample_sets = synthetic_sets.sample_sets
    trained = []

    def sample_with_a_held_out_device_image(generator, plan, params):
        sets = real_sample_sets(generator, plan, params)
        victim = next(k for k in sorted(sets) if sets[k]["labels"].size)
        sets[victim]["devices"][0] = SynthesisPlan.from_dict(plan).held_out_device
        return sets

    monkeypatch.setattr(synthetic_sets, "sample_sets", sample_with_a_held_out_device_image)
    monkeypatch.setattr(nodes.federation, "run_and_evaluate", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    dataset, info = tiny_dataset()
    partition = project_params(min_samples_per_client=15)
    training = training_params()
    evaluation = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_federated_training.yml").read_text())["evaluation"]
    ablation = {"dirichlet_lambda": 0.3, "methods": ["fedavg"], "seeds": [0], "n_bootstrap": 0, "training_overrides": {}}
    with pytest.raises(DataGateError, match="No ablation result was written"):
        nodes.run_ablation(
            dataset, {**info, "size": 16}, partition["partition"], partition["devices"], tiny_synthetic_params()["synthetic"],
            training["training"], training["algorithm_params"], evaluation, ablation,
        )  # fmt: skip
    assert trained == []


def _runs(effects: dict[str, list[float]]) -> pd.DataFrame:
    """Ablation rows for one method over three seeds: each arm's metrics = the seed's base + effect."""
    base = {0: 0.50, 1: 0.60, 2: 0.55}
    rows = []
    for arm, per_seed in effects.items():
        for seed, effect in zip(base, per_seed, strict=True):
            row = {"method": "fedavg", "arm": arm, "seed": seed, "extra_samples": 0 if arm == "none" else 100, "rare_class": "pneumonia"}
            row.update({column: base[seed] + effect for column, _ in nodes.TABLE_COLUMNS})
            row.update({"global.constant_predictor": arm == "pretraining" and seed == 2, "unseen_device.global.constant_predictor": False})
            rows.append(row)
    return pd.DataFrame(rows)


def test_paired_differences_t_interval_and_verdict():
    runs = _runs({
        "none": [0.0, 0.0, 0.0],
        "synthetic": [0.1, 0.2, 0.3],           # better in every seed, mean 0.2 > std 0.1: stated
        "augmented": [0.05, -0.05, 0.0],        # no consistent sign
        "pretraining": [-0.1, -0.1, -0.13],     # worse in every seed
        "pretraining+synthetic": [0.3, -0.2, 0.1],
    })  # fmt: skip
    differences = nodes.arm_differences(runs)
    rare = differences[differences["metric"] == "global.rare_class_recall"].set_index(["arm", "baseline"])
    assert set(rare.index) == {(a, b) for a in nodes.ARMS for b in nodes.BASELINE_ARMS if a != b and a != "none"}
    synthetic = rare.loc[("synthetic", "none")]
    assert synthetic["mean_difference"] == pytest.approx(0.2) and synthetic["std_difference"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / np.sqrt(3)
    assert (synthetic["ci95_low"], synthetic["ci95_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert synthetic["verdict"] == "better" and rare.loc[("pretraining", "none")]["verdict"] == "worse"
    assert rare.loc[("augmented", "none")]["verdict"] == rare.loc[("pretraining+synthetic", "none")]["verdict"] == "not distinguishable"
    assert rare.loc[("synthetic", "augmented")]["mean_difference"] == pytest.approx(0.2)

    _, markdown, table = nodes.ablation_table(runs)
    assert len(table) == len(differences)
    pretraining_row = next(line for line in markdown.splitlines() if line.startswith("| fedavg   | pretraining   "))
    assert pretraining_row.rstrip(" |").endswith("1 / 0"), "one seed's global model is constant: the table says so"
    verdict = markdown.split("## Verdict")[1]
    assert "- synthetic on the rare class (global recall): vs none: helps (+0.200 ± 0.100, better in 3/3 seeds)" in verdict
    assert "- pretraining on the rare class (global recall): vs none: hurts" in verdict
