"""Nodes of `ablation`: does FedSSG help through coverage, or would any extra data do?

For each seed: a Dirichlet partition (the ablation's lambda), a federated generator and a
synthesis plan on it (`fedmic_pipeline.partitioning` and `fedmic_pipeline.synthetic_sets`,
the steps of the data_partition and synthetic_generation stages, in memory), then every method
trained three ways on the same partition: with no extra data, with each hospital's
synthetic set, and with the same number of classically augmented real samples. Reported:
recall of the rare class, balanced accuracy and accuracy on the unseen imaging device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import federation, synthetic_sets
from fedmic_pipeline.partitioning import partition_in_memory
from fedmic_pipeline.reporting import ablation_plots
from fedmic_pipeline.sweeps import GridClock, as_list, cell_params, check_methods

logger = logging.getLogger(__name__)

ARMS = ("none", "synthetic", "augmented")


def _rare_class(validated_dataset: Mapping[str, np.ndarray]) -> int:
    labels = np.concatenate([validated_dataset["train_labels"], validated_dataset["val_labels"]]).reshape(-1)
    return int(np.argmin(np.bincount(labels)))


def run_ablation(
    validated_dataset: Mapping[str, np.ndarray],
    dataset_info: dict[str, Any],
    partition: dict[str, Any],
    devices: dict[str, Any],
    synthetic: dict[str, Any],
    training: dict[str, Any],
    algorithm_params: dict[str, Any],
    evaluation: dict[str, Any],
    ablation: dict[str, Any],
) -> pd.DataFrame:
    """One row per seed x method x arm with the metrics the ablation is about."""
    methods = [str(m) for m in as_list(ablation["methods"])]
    seeds = [int(s) for s in as_list(ablation["seeds"])]
    check_methods(methods, algorithm_params, dataset_info)
    rare = _rare_class(validated_dataset)
    run_training = {**training, **ablation.get("training_overrides", {})}
    run_evaluation = {**evaluation, "n_bootstrap": int(ablation.get("n_bootstrap", 0))}
    rows, clock = [], GridClock(len(seeds) * len(methods) * len(ARMS))
    for seed in seeds:
        part_params, device_params = cell_params(partition, devices, ablation["dirichlet_lambda"], seed)
        clients_arrays, global_test_set, manifest = partition_in_memory(validated_dataset, dataset_info, part_params, device_params)
        synth_params = {**synthetic, "enabled": True, "seed": seed}
        generator, _ = synthetic_sets.train_generator(clients_arrays, manifest, synth_params)
        synthesis_plan = synthetic_sets.plan_synthesis(clients_arrays, manifest, synth_params)
        synthesised = synthetic_sets.sample_sets(generator, synthesis_plan, synth_params)
        n_synthetic = int(sum(len(s["labels"]) for s in synthesised.values()))
        for method in methods:
            for arm in ARMS:
                started = time.perf_counter()
                extra = federation.extra_training_sets(arm, clients_arrays, synthesised, seed)
                report, _, _ = federation.run_and_evaluate(
                    method, algorithm_params, dataset_info, clients_arrays, global_test_set, manifest.get("held_out_device"),
                    {**run_training, "seed": seed}, run_evaluation, extra,
                )  # fmt: skip
                row = _row(report, method, arm, seed, rare, n_synthetic)
                rows.append(row)
                took = time.perf_counter() - started
                logger.info(
                    "ablation %s: %s + %s seed=%d | rare-class recall global %s personalized %.3f | unseen-device acc %s | %.0fs",
                    clock.tick(took), method, arm, seed, _fmt(row["global.rare_class_recall"]),
                    row["personalized.rare_class_recall"], _fmt(row["unseen_device.global.accuracy"]), took,
                )  # fmt: skip
    return pd.DataFrame(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.3f}"


def _row(report: dict[str, Any], method: str, arm: str, seed: int, rare: int, n_extra: int) -> dict[str, Any]:
    g = report["global"]
    held_out = report["held_out_device"]
    unseen = report["global_by_device"].get(held_out) if g else None
    site_recalls = [s["per_class_recall"][rare] for s in report["sites"]]
    valid = [r for r in site_recalls if not np.isnan(r)]
    summary = report["site_summary"]
    unseen_pers = report["personalized_on_unseen_device_summary"]
    return {
        "method": method,
        "arm": arm,
        "seed": seed,
        "extra_samples": 0 if arm == "none" else n_extra,
        "rare_class": report["class_names"][rare],
        "global.rare_class_recall": g["per_class_recall"][rare] if g else None,
        "global.balanced_accuracy": g["balanced_accuracy"] if g else None,
        "global.accuracy": g["accuracy"] if g else None,
        "unseen_device.global.accuracy": unseen["accuracy"] if unseen else None,
        "unseen_device.global.rare_class_recall": unseen["per_class_recall"][rare] if unseen else None,
        "personalized.rare_class_recall": float(np.mean(valid)) if valid else float("nan"),
        "personalized.balanced_accuracy": summary["mean"]["balanced_accuracy"] if summary else None,
        "personalized.accuracy": summary["mean"]["accuracy"] if summary else None,
        "unseen_device.personalized.accuracy": unseen_pers["mean"]["accuracy"] if unseen_pers else None,
    }


TABLE_COLUMNS = (
    ("global.rare_class_recall", "rare-class recall (global)"),
    ("personalized.rare_class_recall", "rare-class recall (personalized)"),
    ("global.balanced_accuracy", "balanced acc (global)"),
    ("personalized.balanced_accuracy", "balanced acc (personalized)"),
    ("unseen_device.global.accuracy", "unseen-device acc (global)"),
    ("unseen_device.personalized.accuracy", "unseen-device acc (personalized)"),
)


def ablation_table(ablation_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Mean ± std over seeds per method and arm, as CSV and markdown."""
    records = []
    for method in dict.fromkeys(ablation_runs["method"]):
        for arm in ARMS:
            group = ablation_runs[(ablation_runs["method"] == method) & (ablation_runs["arm"] == arm)]
            if group.empty:
                continue
            record: dict[str, Any] = {"method": method, "extra data": arm, "seeds": len(group),
                                      "extra samples": int(group["extra_samples"].mean())}  # fmt: skip
            for column, heading in TABLE_COLUMNS:
                values = group[column].dropna().astype(float)
                record[f"{column}.mean"] = values.mean() if len(values) else None
                record[f"{column}.std"] = values.std(ddof=1) if len(values) > 1 else 0.0
                record[heading] = "n/a" if values.empty else (
                    f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.iloc[0]:.3f}"
                )
            records.append(record)
    table = pd.DataFrame(records)
    rare = ablation_runs["rare_class"].iloc[0] if len(ablation_runs) else "?"
    headings = ["method", "extra data", "seeds", "extra samples", *[h for _, h in TABLE_COLUMNS]]
    markdown = "\n".join(
        [
            "# FedSSG ablation (mean ± std over seeds)",
            "",
            f"Rare class: **{rare}**. Arms: no extra data; each hospital's FedSSG synthetic set; the same number "
            "of classically augmented real samples of the same classes (shift, flip, brightness/contrast). "
            "Global: the shared model on the official test set; personalized: each hospital's model on its "
            "local test split (mean over hospitals); unseen device: the official test set as the held-out "
            "imaging device renders it.",
            "",
            table[headings].to_markdown(index=False),
            "",
        ]
    )
    numeric = table[["method", "extra data", "seeds", "extra samples", *[c for c in table.columns if c.endswith((".mean", ".std"))]]]
    return numeric, markdown


def plot_ablation(ablation_runs: pd.DataFrame) -> Figure:
    return ablation_plots.ablation_bars(ablation_runs, [c for c, _ in TABLE_COLUMNS], [h for _, h in TABLE_COLUMNS], ARMS)
