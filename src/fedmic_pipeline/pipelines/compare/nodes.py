"""Nodes of `compare`: the same federation built for each lambda and seed, every method run
on it, and the results gathered into one table and two plots.

Every (lambda, seed) pair gets its own partition (the data_partition stage's own functions
with those two values changed), and every method sees exactly that partition, so methods
differ only in the algorithm. The seed drives the partition, the device assignment and the
training. With an active MLflow run each method x lambda x seed becomes a nested run.
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

from fedmic_pipeline import experiment
from fedmic_pipeline.datasets.atomic import write_bytes_atomically
from fedmic_pipeline.pipelines.data_partition.nodes import build_partition_plan, materialise_partition
from fedmic_pipeline.reporting import comparison_plots, findings

logger = logging.getLogger(__name__)

#: Columns of the comparison table: (metric column, heading). Balanced accuracy and macro AUC
#: lead: on one-class hospitals and an imbalanced test set accuracy rewards a constant model.
TABLE_COLUMNS = (
    ("global.balanced_accuracy", "global bal. acc"),
    ("global.macro_auc", "global AUC"),
    ("global.accuracy", "global acc"),
    ("global_last.balanced_accuracy", "global bal. acc (last round)"),
    ("global.pooled_local_test.accuracy", "pooled local-test acc"),
    ("unseen_device.global.balanced_accuracy", "unseen-device bal. acc"),
    ("personalized.mean.balanced_accuracy", "personalized bal. acc"),
    ("personalized.mean.macro_auc", "personalized AUC"),
    ("personalized.mean.accuracy", "personalized acc"),
    ("personalized.worst.balanced_accuracy", "worst-site bal. acc"),
    ("communication.mb_up_total", "MB up total"),
    ("wall_time_s", "wall time (s)"),
)
GLOBAL_HEADINGS = [h for c, h in TABLE_COLUMNS if c.startswith(("global", "unseen"))]
PERSONAL_HEADINGS = [h for c, h in TABLE_COLUMNS if not c.startswith(("global", "unseen"))]
#: Headings of the constant-predictor counts (seeds with a constant global model; constant sites per seed).
CONSTANT_GLOBAL, CONSTANT_SITES = "constant global (seeds)", "constant sites / seed"
#: Constant personalized models at hospitals whose test split has >= 5 images of two classes, all seeds.
CONSTANT_TWO_CLASS = "constant two-class sites"
#: Bumped when what a cached run means changes (metrics, selection), so old caches are not reused.
CACHE_VERSION = 2


def as_list(value: Any) -> list[Any]:
    """A YAML list, or a space-separated string: `kedro run --params` splits on commas,
    so the command line gives lists as `compare.seeds="0 1 2"`."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


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
    for method in dict.fromkeys(m for _, _, _, m in grid):  # fail on a typo before hours of training
        experiment.make_algorithm(method, algorithm_params, experiment.data_spec(dataset_info))
    cache_dir = Path(compare["cache_dir"]) if compare.get("cache_dir") else None
    total, done = len(grid), 0
    run_evaluation = {**evaluation, "n_bootstrap": int(compare.get("n_bootstrap", evaluation["n_bootstrap"]))}
    dataset = str(dataset_info.get("flag"))
    rows, curves = [], []
    started_grid = time.perf_counter()
    partition_key: tuple[float, int] | None = None
    for lam, join, seed, method in grid:
        part_params = {**partition, "dirichlet_lambda": float(lam), "seed": int(seed)}
        device_params = {**devices, "seed": int(seed)}
        done += 1
        settings = {**run_training, "seed": int(seed), "join_ratio": float(join)}
        key = _cache_key(
            method=method, dataset_md5=dataset_info.get("md5"), partition=part_params, devices=device_params,
            training={k: v for k, v in settings.items() if k not in ("progress", "num_threads", "device")},
            algorithm=experiment.algorithm_params_for(method, algorithm_params), evaluation=run_evaluation,
        )  # fmt: skip
        path = None if cache_dir is None else cache_dir / f"{method}-{dataset}-l{lam}-j{join}-s{seed}-{key}.json"
        cached = _read_cache(path)
        if cached is not None:
            row, history = cached
            logger.info("compare %d/%d: %s lambda=%s join=%s seed=%s from the cache", done, total, method, lam, join, seed)
        else:
            if partition_key != (lam, seed):  # the grid is sorted so that each partition is built once
                plan = build_partition_plan(validated_dataset, dataset_info, part_params, device_params)
                client_arrays, global_test_set, manifest, _ = materialise_partition(
                    validated_dataset, dataset_info, plan, part_params, device_params, True
                )
                partition_key = (lam, seed)
            started = time.perf_counter()
            report, summary, result = experiment.run_and_evaluate(
                method, algorithm_params, dataset_info, client_arrays, global_test_set,
                manifest.get("held_out_device"), settings, run_evaluation,
            )  # fmt: skip
            row = {
                "dataset": dataset, "method": method, "lambda": float(lam), "join_ratio": float(join), "seed": int(seed),
                **experiment.headline_metrics(report, summary),
            }  # fmt: skip
            row.pop("algorithm", None)
            history = experiment.history_table(result.history).assign(
                dataset=dataset, method=method, **{"lambda": float(lam)}, join_ratio=float(join), seed=int(seed)
            )
            _log_nested_run(row, history, summary)
            _write_cache(path, row, history)
            elapsed = time.perf_counter() - started_grid
            logger.info(
                "compare %d/%d: %s lambda=%s join=%s seed=%s | global bal. acc %s | personalized bal. acc %s | "
                "%.0fs (grid %.0f min so far)",
                done, total, method, lam, join, seed, _fmt(row["global.balanced_accuracy"]),
                _fmt(row["personalized.mean.balanced_accuracy"]), time.perf_counter() - started, elapsed / 60,
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


def _mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _scenario_keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in ("dataset", "lambda", "join_ratio") if c in runs.columns]


def comparison_table(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Mean ± std over seeds per scenario and method, a majority-class row per scenario,
    and constant-predictor counts; as CSV rows and a markdown table."""
    records = []
    order = list(dict.fromkeys(comparison_runs["method"]))
    keys = _scenario_keys(comparison_runs)
    for scenario, runs in comparison_runs.groupby(keys, sort=True):
        scenario = dict(zip(keys, scenario if isinstance(scenario, tuple) else (scenario,), strict=True))
        first = runs[runs["method"] == runs["method"].iloc[0]]
        majority = {"method": "majority class", "seeds": len(first)}
        for column, prefix in (
            ("global.balanced_accuracy", "majority_class.global.balanced_accuracy"),
            ("global.macro_auc", "majority_class.global.macro_auc"),
            ("global.accuracy", "majority_class.global.accuracy"),
            ("personalized.mean.balanced_accuracy", "majority_class.personalized.mean.balanced_accuracy"),
            ("personalized.mean.macro_auc", "majority_class.personalized.mean.macro_auc"),
            ("personalized.mean.accuracy", "majority_class.personalized.mean.accuracy"),
        ):
            if prefix in first:
                heading = dict(TABLE_COLUMNS)[column]
                majority[f"{column}.mean"] = first[prefix].astype(float).mean()
                majority[heading] = _mean_std(first[prefix])
        records.append({**scenario, **majority})
        for method in sorted(runs["method"].unique(), key=order.index):
            group = runs[runs["method"] == method]
            record = {**scenario, "method": method, "seeds": len(group)}
            for column, heading in TABLE_COLUMNS:
                if column in group:
                    record[f"{column}.mean"] = group[column].astype(float).mean()
                    record[f"{column}.std"] = group[column].astype(float).std(ddof=1) if len(group) > 1 else 0.0
                    record[heading] = _mean_std(group[column])
            if "global.constant_predictor" in group:
                flags = group["global.constant_predictor"].dropna().astype(float)
                record[CONSTANT_GLOBAL] = f"{int(flags.sum())}/{len(group)}" if len(flags) else "n/a"
            if "personalized.num_constant_two_class_sites" in group and group["personalized.num_constant_two_class_sites"].notna().any():
                flagged = group["personalized.num_constant_two_class_sites"].astype(float)
                eligible = group["personalized.num_two_class_sites"].astype(float)
                record[CONSTANT_TWO_CLASS] = f"{int(flagged.sum())} of {int(eligible.sum())}"
            if "personalized.num_constant_sites" in group:
                sites = group["personalized.num_constant_sites"].astype(float)
                total = group["personalized.num_sites"].astype(float).mean() if "personalized.num_sites" in group else np.nan
                record[CONSTANT_SITES] = f"{sites.mean():.1f} of {total:.0f}"
            records.append(record)
    table = pd.DataFrame(records)
    views = []
    for title, wanted in (
        ("Global model (official test set)", [*GLOBAL_HEADINGS, CONSTANT_GLOBAL]),
        ("Personalized models (each hospital's local test split) and cost", [*PERSONAL_HEADINGS, CONSTANT_SITES, CONSTANT_TWO_CLASS]),
    ):
        headings = [h for h in [*keys, "method", "seeds", *wanted] if h in table]
        views += [f"## {title}", "", table[headings].fillna("").to_markdown(index=False), ""]
    markdown = "\n".join(
        [
            "# Method comparison (mean ± std over seeds)",
            "",
            "Models are selected on validation data (global: the round with the best pooled validation "
            "balanced accuracy; personalized: each hospital's best round on its own validation split); the "
            "test sets are touched only for these numbers. global: the shared model on the official test "
            "set (n/a for methods without one), `last round` beside it; pooled local-test acc: the global "
            "model on all hospitals' local test splits together (PFLlib's metric); personalized: each "
            "hospital's own model on its local test split, mean over hospitals; worst-site: the lowest "
            "hospital; unseen-device: the global model on the test set as the held-out imaging device "
            "renders it. `majority class` always predicts the training majority: a method at or near "
            "that row has learned nothing. constant: the model gives one class to >= 95 % of a test set; "
            "two-class sites: hospitals whose local test split has >= 5 images of two or more classes.",
            "",
            *views,
        ]
    )
    numeric = table[[*keys, "method", "seeds", *[c for c in table.columns if c.endswith((".mean", ".std"))]]]
    return numeric, markdown


def comparison_findings(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """FedMIC against every baseline, paired by seed (``reporting.findings``)."""
    differences = findings.paired_differences(comparison_runs, reference="fedmic")
    return differences, findings.findings_markdown(differences, reference="fedmic")


def plot_accuracy_per_round(comparison_curves: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_per_round(comparison_curves)


def plot_accuracy_vs_communication(comparison_runs: pd.DataFrame) -> Figure:
    return comparison_plots.accuracy_vs_communication(comparison_runs)
