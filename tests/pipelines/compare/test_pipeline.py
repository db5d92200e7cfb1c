"""The comparison sweep: same partitions for every method, one row per run, a readable table."""

from __future__ import annotations

import pytest
import yaml

from fedmic_pipeline.pipelines.compare import nodes
from fixtures_pipelines import PROJECT_ROOT as ROOT
from fixtures_pipelines import project_params, synthetic_dataset


def test_comparison_runs_every_method_on_each_grid_point_and_tabulates(tmp_path, caplog):
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    training = yaml.safe_load((ROOT / "conf/base/parameters_federated_training.yml").read_text())
    training["algorithm_params"]["common"]["batch_size"] = 16
    compare = {"methods": "fedavg local_only", "lambdas": "0.3", "seeds": "0 1", "n_bootstrap": 0,
               "training_overrides": {"num_rounds": 1, "num_threads": 1}, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    runs, curves = nodes.run_comparison(
        dataset, {**info, "size": 16}, params["partition"], params["devices"], training["training"],
        training["algorithm_params"], training["evaluation"], compare,
    )  # fmt: skip
    assert list(runs[["method", "seed"]].itertuples(index=False, name=None)) == [
        ("fedavg", 0), ("local_only", 0), ("fedavg", 1), ("local_only", 1)
    ]
    assert (runs.loc[runs["method"] == "local_only", "communication.mb_up_total"] == 0).all()
    assert (runs.loc[runs["method"] == "fedavg", "communication.mb_up_total"] > 0).all()
    assert runs.loc[runs["method"] == "local_only", "global.accuracy"].isna().all()
    assert len(curves) == 4 and set(curves["round"]) == {1}
    summary, markdown = nodes.comparison_table(runs)
    assert list(summary["method"]) == ["majority class", "fedavg", "local_only"] and (summary["seeds"] == 2).all()
    assert "| fedavg" in markdown and "±" in markdown and "n/a" in markdown and "| majority class" in markdown
    majority = summary[summary["method"] == "majority class"].iloc[0]
    assert majority["global.balanced_accuracy.mean"] == pytest.approx(1 / info["n_classes"])  # a constant model: 1 / K
    assert "constant global (seeds)" in markdown

    # Every finished run was cached: a second sweep trains nothing and returns the same rows.
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4
    with caplog.at_level("INFO", logger="fedmic_pipeline.pipelines.compare.nodes"):
        again, _ = nodes.run_comparison(
            dataset, {**info, "size": 16}, params["partition"], params["devices"], training["training"],
            training["algorithm_params"], training["evaluation"], compare,
        )  # fmt: skip
    assert sum("from the cache" in r.getMessage() for r in caplog.records) == 4
    assert again.drop(columns=["wall_time_s"]).equals(runs.drop(columns=["wall_time_s"]))


def test_scenarios_join_grids_without_repeating_cells():
    compare = {"methods": "fedavg", "lambdas": "0.3", "seeds": "0", "scenarios": [
        {"methods": ["fedavg", "fedmic"], "lambdas": [0.1, 0.3]},
        {"lambdas": [0.3], "join_ratios": [0.2]},
        {"methods": ["fedavg"], "lambdas": [0.3]},  # already in the first block
    ]}  # fmt: skip
    cells = nodes.comparison_grid(compare, default_join_ratio=0.5)
    assert cells == [
        (0.1, 0.5, 0, "fedavg"), (0.1, 0.5, 0, "fedmic"),
        (0.3, 0.2, 0, "fedavg"), (0.3, 0.5, 0, "fedavg"), (0.3, 0.5, 0, "fedmic"),
    ]  # fmt: skip
