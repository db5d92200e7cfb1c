"""Nodes of `compare`: the same federation built for each lambda and seed, every method run
on it, and the results gathered into one table and two plots.

Every (lambda, seed) pair gets its own partition (the data_partition stage's own functions
with those two values changed), and every method sees exactly that partition, so methods
differ only in the algorithm. The seed drives the partition, the device assignment and the
training. With an active MLflow run each method x lambda x seed becomes a nested run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import experiment
from fedmic_pipeline.pipelines.data_partition.nodes import build_partition_plan, materialise_partition
from fedmic_pipeline.reporting import comparison_plots

logger = logging.getLogger(__name__)

#: Columns of the comparison table: (metric column, heading).
TABLE_COLUMNS = (
    ("personalized.mean.accuracy", "personalized acc"),
    ("personalized.worst.accuracy", "worst-site acc"),
    ("personalized.mean.macro_auc", "personalized AUC"),
    ("global.accuracy", "global acc"),
    ("global.macro_auc", "global AUC"),
    ("unseen_device.global.accuracy", "unseen-device acc"),
    ("communication.mb_up_per_client_per_round", "MB up / client / round"),
    ("communication.mb_up_total", "MB up total"),
    ("wall_time_s", "wall time (s)"),
)


def as_list(value: Any) -> list[Any]:
    """A YAML list, or a space-separated string: `kedro run --params` splits on commas,
    so the command line gives lists as `compare.seeds="0 1 2"`."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def run_comparison(
    validated_dataset: Mapping[str, np.ndarray],
    dataset_info: dict[str, Any],
    partition: dict[str, Any],
    devices: dict[str, Any],
    training: dict[str, Any],
    algorithm_params: dict[str, Any],
    evaluation: dict[str, Any],
    compare: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every method x lambda x seed; return one row per run and the per-round curves."""
    methods = [str(m) for m in as_list(compare["methods"])]
    lambdas = [float(v) for v in as_list(compare["lambdas"])]
    seeds = [int(v) for v in as_list(compare["seeds"])]
    for method in methods:  # fail on a typo before hours of training
        experiment.make_algorithm(method, algorithm_params, experiment.data_spec(dataset_info))
    grid = [(lam, seed) for lam in lambdas for seed in seeds]
    total, done = len(grid) * len(methods), 0
    run_training = {**training, **compare.get("training_overrides", {})}
    run_evaluation = {**evaluation, "n_bootstrap": int(compare.get("n_bootstrap", evaluation["n_bootstrap"]))}
    rows, curves = [], []
    for lam, seed in grid:
        part_params = {**partition, "dirichlet_lambda": float(lam), "seed": int(seed)}
        device_params = {**devices, "seed": int(seed)}
        plan = build_partition_plan(validated_dataset, dataset_info, part_params, device_params)
        client_arrays, global_test_set, manifest, _ = materialise_partition(
            validated_dataset, dataset_info, plan, part_params, device_params, True
        )
        for method in methods:
            done += 1
            started = time.perf_counter()
            report, summary, result = experiment.run_and_evaluate(
                method, algorithm_params, dataset_info, client_arrays, global_test_set, manifest.get("held_out_device"),
                {**run_training, "seed": int(seed)}, run_evaluation,
            )  # fmt: skip
            row = {"method": method, "lambda": float(lam), "seed": int(seed), **experiment.headline_metrics(report, summary)}
            row.pop("algorithm", None)
            rows.append(row)
            history = experiment.history_table(result.history).assign(method=method, **{"lambda": float(lam)}, seed=int(seed))
            curves.append(history)
            _log_nested_run(row, history, summary)
            logger.info(
                "compare %d/%d: %s lambda=%s seed=%s | personalized acc %.3f | global acc %s | %.3f MB up/client/round | %.0fs",
                done, total, method, lam, seed, row["personalized.mean.accuracy"] or float("nan"),
                "-" if row["global.accuracy"] is None else f"{row['global.accuracy']:.3f}",
                row["communication.mb_up_per_client_per_round"], time.perf_counter() - started,
            )  # fmt: skip
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def _log_nested_run(row: dict[str, Any], history: pd.DataFrame, summary: dict[str, Any]) -> None:
    """One nested MLflow run per method x lambda x seed, when a parent run is active."""
    import mlflow

    if mlflow.active_run() is None:
        return
    from fedmic_pipeline.tracking.mlflow_logging import log_metric_history

    name = f"{row['method']}-lambda{row['lambda']}-seed{row['seed']}"
    with mlflow.start_run(run_name=name, nested=True) as run:
        mlflow.set_tags({"compare.method": row["method"], "compare.lambda": str(row["lambda"]), "compare.seed": str(row["seed"])})
        mlflow.log_params({"method": row["method"], "lambda": row["lambda"], "seed": row["seed"]})
        mlflow.log_params({f"resolved.{k}": str(v)[:500] for k, v in summary.get("algorithm_config", {}).items()})
        log_metric_history(run.info.run_id, history[[c for c in history.columns if c not in ("method", "lambda", "seed", "sampled")]])
        mlflow.log_metrics({f"final.{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None and np.isfinite(v) and k not in ("lambda", "seed")})


def _mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def comparison_table(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Mean ± std over seeds per method and lambda, as CSV rows and a markdown table."""
    records = []
    order = list(dict.fromkeys(comparison_runs["method"]))
    for (lam, method), group in sorted(
        comparison_runs.groupby(["lambda", "method"]), key=lambda item: (item[0][0], order.index(item[0][1]))
    ):
        record = {"lambda": lam, "method": method, "seeds": len(group)}
        for column, heading in TABLE_COLUMNS:
            if column in group:
                record[f"{column}.mean"] = group[column].astype(float).mean()
                record[f"{column}.std"] = group[column].astype(float).std(ddof=1) if len(group) > 1 else 0.0
                record[heading] = _mean_std(group[column])
        records.append(record)
    table = pd.DataFrame(records)
    headings = ["lambda", "method", "seeds", *[h for c, h in TABLE_COLUMNS if h in table]]
    markdown = "\n".join(
        [
            "# Method comparison (mean ± std over seeds)",
            "",
            "personalized acc: each hospital's own model on its local test split, mean over hospitals; "
            "worst-site: the lowest hospital; global acc/AUC: the shared model on the official test set "
            "(n/a for methods without one); unseen-device acc: the global model on the test set as the "
            "held-out imaging device renders it; MB up: exact bytes uploaded per participating client per round.",
            "",
            table[headings].to_markdown(index=False),
            "",
        ]
    )
    numeric = table[["lambda", "method", "seeds", *[c for c in table.columns if c.endswith((".mean", ".std"))]]]
    return numeric, markdown


def plot_accuracy_per_round(comparison_curves: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_per_round(comparison_curves)


def plot_accuracy_vs_communication(comparison_runs: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_vs_communication(comparison_runs)
