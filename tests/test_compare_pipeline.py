"""The comparison sweep: same partitions for every method, one row per run, a readable table."""

from __future__ import annotations

import yaml

from fedmic_pipeline.pipelines.compare import nodes
from test_data_partition_pipeline import project_params, synthetic_dataset
from test_training_pipeline import ROOT


def test_comparison_runs_every_method_on_each_grid_point_and_tabulates():
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    training = yaml.safe_load((ROOT / "conf/base/parameters_federated_training.yml").read_text())
    training["algorithm_params"]["common"]["batch_size"] = 16
    compare = {"methods": "fedavg local_only", "lambdas": "0.3", "seeds": "0 1", "n_bootstrap": 0,
               "training_overrides": {"num_rounds": 1, "num_threads": 1}}  # fmt: skip
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
    assert list(summary["method"]) == ["fedavg", "local_only"] and (summary["seeds"] == 2).all()
    assert "| fedavg" in markdown and "±" in markdown and "n/a" in markdown
