"""Nodes of `compare`: the same federation built for each lambda and seed, every method run
on it, and the results gathered into one table and two plots.

Every (lambda, seed) pair gets its own partition, built in memory as the data_partition
stage builds it (`fedmic_pipeline.partitioning`) with those two values changed, and every
method sees exactly that partition, so methods differ only in the algorithm. The seed
drives the partition, the device assignment and the training. With an active MLflow run
each method x lambda x seed becomes a nested run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import configuration
from fedmic_pipeline import federation
from fedmic_pipeline import model_evaluation
from fedmic_pipeline import run_records
from fedmic_pipeline.datasets.atomic import write_bytes_atomically
from fedmic_pipeline.partitioning import partition_in_memory
from fedmic_pipeline.reporting import comparison_plots, comparison_tables, findings
from fedmic_pipeline.sweeps import GridClock, as_list, cell_params, check_methods

logger = logging.getLogger(__name__)

#: Bumped when what a cached run means changes (metrics, selection), so old caches are not reused.
CACHE_VERSION = 2


def comparison_grid(compare: Mapping[str, Any], default_join_ratio: float) -> list[tuple[float, float, int, str]]:
    """The (lambda, join ratio, seed, method) cells to run, in an order that reuses partitions.

    Either the product of ``methods`` x ``lambdas`` x ``join_ratios`` x ``seeds``, or, when
    ``scenarios`` is given, the union of one such product per scenario (each scenario may
    set its own ``methods``, ``lambdas``, ``join_ratios`` and ``seeds``; missing keys come
    from the top level), so one grid can hold all methods at one participation level and a
    few at another.
    """
    def product(block: Mapping[str, Any]) -> list[tuple[float, float, int, str]]:
        merged = {**compare, **block}
        joins = merged.get("join_ratios") or [default_join_ratio]
        return [
            (float(lam), float(join), int(seed), str(method))
            for lam in as_list(merged["lambdas"])
            for join in as_list(joins)
            for seed in as_list(merged["seeds"])
            for method in as_list(merged["methods"])
        ]

    scenarios = compare.get("scenarios")
    if scenarios is None or (isinstance(scenarios, str) and scenarios.strip().lower() in ("", "none", "null")):
        scenarios = [{}]  # the command line's `compare.scenarios=none`: just the top-level lists
    cells = list(dict.fromkeys(cell for block in scenarios for cell in product(block)))
    return sorted(cells, key=lambda c: (c[0], c[2], c[1]))  # same (lambda, seed): one partition


def _cache_key(**parts: Any) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_cache(path: Path | None) -> tuple[dict[str, Any], pd.DataFrame] | None:
    if path is None or not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
        return cached["row"], pd.DataFrame(cached["curves"])
    except (ValueError, KeyError) as exc:  # a damaged entry is recomputed, never trusted
        logger.warning("Ignoring the unreadable comparison cache entry %s (%s); the run is repeated.", path, exc)
        return None


def _write_cache(path: Path | None, row: dict[str, Any], curves: pd.DataFrame) -> None:
    if path is None:
        return
    text = json.dumps({"row": row, "curves": json.loads(curves.to_json(orient="records"))}, default=str)
    write_bytes_atomically(path, text.encode())  # a run killed mid-write leaves no valid-looking entry


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
    """Run every method x lambda x join ratio x seed; return one row per run and the curves.

    Each finished run is cached under ``compare.cache_dir`` (keyed by everything that
    determines it), so an interrupted grid continues where it stopped and a grown grid
    runs only its new cells.
    """
    run_training = {**training, **compare.get("training_overrides", {})}
    grid = comparison_grid(compare, default_join_ratio=float(run_training.get("join_ratio", 1.0)))
    check_methods((m for _, _, _, m in grid), algorithm_params, dataset_info)
    cache_dir = Path(compare["cache_dir"]) if compare.get("cache_dir") else None
    clock = GridClock(len(grid))
    run_evaluation = {**evaluation, "n_bootstrap": int(compare.get("n_bootstrap", evaluation["n_bootstrap"]))}
    dataset = str(dataset_info.get("flag"))
    rows, curves = [], []
    partition_key: tuple[float, int] | None = None
    for lam, join, seed, method in grid:
        part_params, device_params = cell_params(partition, devices, lam, seed)
        settings = {**run_training, "seed": int(seed), "join_ratio": float(join)}
        key = _cache_key(
            method=method, dataset_md5=dataset_info.get("md5"), partition=part_params, devices=device_params,
            training={k: v for k, v in settings.items() if k not in ("progress", "num_threads", "device")},
            algorithm=configuration.algorithm_params_for(method, algorithm_params), evaluation=run_evaluation,
        )  # fmt: skip
        path = None if cache_dir is None else cache_dir / f"{method}-{dataset}-l{lam}-j{join}-s{seed}-{key}.json"
        cached = _read_cache(path)
        if cached is not None:
            row, history = cached
            logger.info("compare %s: %s lambda=%s join=%s seed=%s from the cache", clock.tick(), method, lam, join, seed)
        else:
            if partition_key != (lam, seed):  # the grid is sorted so that each partition is built once
                client_arrays, global_test_set, manifest = partition_in_memory(validated_dataset, dataset_info, part_params, device_params)
                partition_key = (lam, seed)
            started = time.perf_counter()
            report, summary, result = federation.run_and_evaluate(
                method, algorithm_params, dataset_info, client_arrays, global_test_set,
                manifest.get("held_out_device"), settings, run_evaluation,
            )  # fmt: skip
            row = {
                "dataset": dataset, "method": method, "lambda": float(lam), "join_ratio": float(join), "seed": int(seed),
                **model_evaluation.headline_metrics(report, summary),
            }  # fmt: skip
            row.pop("algorithm", None)
            history = run_records.history_table(result.history).assign(
                dataset=dataset, method=method, **{"lambda": float(lam)}, join_ratio=float(join), seed=int(seed)
            )
            _log_nested_run(row, history, summary)
            _write_cache(path, row, history)
            took = time.perf_counter() - started
            logger.info(
                "compare %s: %s lambda=%s join=%s seed=%s | global bal. acc %s | personalized bal. acc %s | %.0fs",
                clock.tick(took), method, lam, join, seed, _fmt(row["global.balanced_accuracy"]),
                _fmt(row["personalized.mean.balanced_accuracy"]), took,
            )  # fmt: skip
        rows.append(row)
        curves.append(history)
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _log_nested_run(row: dict[str, Any], history: pd.DataFrame, summary: dict[str, Any]) -> None:
    """One nested MLflow run per method x lambda x seed, when a parent run is active."""
    import mlflow

    if mlflow.active_run() is None:
        return
    from fedmic_pipeline.tracking.mlflow_logging import log_metric_history

    name = f"{row['method']}-lambda{row['lambda']}-join{row['join_ratio']}-seed{row['seed']}"
    with mlflow.start_run(run_name=name, nested=True) as run:
        mlflow.set_tags({"compare.method": row["method"], "compare.lambda": str(row["lambda"]), "compare.seed": str(row["seed"])})
        mlflow.log_params({"method": row["method"], "lambda": row["lambda"], "join_ratio": row["join_ratio"], "seed": row["seed"]})
        mlflow.log_params({f"resolved.{k}": str(v)[:500] for k, v in summary.get("algorithm_config", {}).items()})
        log_metric_history(run.info.run_id, history[[c for c in history.columns if c not in ("dataset", "method", "lambda", "join_ratio", "seed", "sampled")]])
        mlflow.log_metrics({f"final.{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None and np.isfinite(v) and k not in ("lambda", "seed", "join_ratio")})


def comparison_table(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The grid's summary (``reporting.comparison_tables``): CSV rows and a markdown table."""
    return comparison_tables.comparison_summary(comparison_runs)


def comparison_findings(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """FedMIC against every baseline, paired by seed (``reporting.findings``)."""
    differences = findings.paired_differences(comparison_runs, reference="fedmic")
    return differences, findings.findings_markdown(differences, reference="fedmic")


def plot_accuracy_per_round(comparison_curves: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_per_round(comparison_curves)


def plot_accuracy_vs_communication(comparison_runs: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_vs_communication(comparison_runs)
