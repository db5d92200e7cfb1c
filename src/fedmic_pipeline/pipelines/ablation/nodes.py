"""Nodes of `ablation`: does FedSSG help through coverage, or would any extra data do?

For each seed: a Dirichlet partition (the ablation's lambda), a federated generator and a
synthesis plan on it (`fedmic_pipeline.partitioning` and `fedmic_pipeline.synthetic_sets`,
the steps of the data_partition and synthetic_generation stages, in memory), the synthetic
data gate on the sampled sets (a seed whose sets fail it stops the ablation, as it would
stop `synthetic_generation`), then every method trained five ways on the same partition
(`ARMS`): with no extra data, with each hospital's synthetic set, with the same number of
classically augmented real samples, with the server's pretraining on the synthetic pool
alone, and with both pretraining and the shipped synthetic sets. Reported: recall of the
rare class, balanced accuracy, and balanced accuracy on the unseen imaging device, with
differences paired by seed against no extra data and against classical augmentation.
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
from fedmic_pipeline.reporting.findings import paired_differences
from fedmic_pipeline.sweeps import GridClock, as_list, cell_params, check_methods
from fedmic_pipeline.validation.stage_gate import enforce_stage_gate

logger = logging.getLogger(__name__)

#: arm -> (what each hospital adds to its training split, does the server pretrain on the pool).
ARM_SETTINGS = {
    "none": ("none", False),
    "synthetic": ("synthetic", False),
    "augmented": ("augmented", False),
    "pretraining": ("none", True),
    "pretraining+synthetic": ("synthetic", True),
}
ARMS = tuple(ARM_SETTINGS)
#: The arms every other arm is compared with, paired by seed.
BASELINE_ARMS = ("none", "augmented")


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
        _gate(synthesised, synthesis_plan, clients_arrays, global_test_set, manifest, synth_params, seed)
        n_synthetic = int(sum(len(s["labels"]) for s in synthesised.values()))
        for method in methods:
            for arm in ARMS:
                started = time.perf_counter()
                mode, pretrain = ARM_SETTINGS[arm]
                extra = federation.extra_training_sets(mode, clients_arrays, synthesised, seed)
                arm_training = {**run_training, "seed": seed, "extra_training_data": mode,
                                "pretraining": {**run_training.get("pretraining", {}), "enabled": pretrain}}  # fmt: skip
                report, _, _ = federation.run_and_evaluate(
                    method, algorithm_params, dataset_info, clients_arrays, global_test_set, manifest.get("held_out_device"),
                    arm_training, run_evaluation, extra, synthesised,
                )  # fmt: skip
                row = _row(report, method, arm, seed, rare, n_synthetic)
                rows.append(row)
                took = time.perf_counter() - started
                logger.info(
                    "ablation %s: %s + %s seed=%d | rare-class recall global %s personalized %.3f | balanced acc %s | "
                    "unseen-device balanced acc %s | %.0fs",
                    clock.tick(took), method, arm, seed, _fmt(row["global.rare_class_recall"]),
                    row["personalized.rare_class_recall"], _fmt(row["global.balanced_accuracy"]),
                    _fmt(row["unseen_device.global.balanced_accuracy"]), took,
                )  # fmt: skip
    return pd.DataFrame(rows)


def _gate(
    synthesised: Mapping[str, Any], plan: Mapping[str, Any], clients: Mapping[str, Any],
    global_test_set: Mapping[str, np.ndarray], manifest: Mapping[str, Any], synth_params: Mapping[str, Any], seed: int,
) -> None:
    """The synthetic data gate of `synthetic_generation`, on this seed's sets (no data docs
    written: they belong to the pipeline's own run)."""
    params = {**synth_params, "gate": {**(synth_params.get("gate") or {}), "docs_dir": None}}
    report = synthetic_sets.validate_candidates(synthesised, plan, clients, global_test_set, manifest, params)
    if not report.get("success"):
        logger.error("ablation seed %d: the synthetic sets failed the synthetic data gate", seed)
    enforce_stage_gate(report, "ablation", withheld="ablation result", upstream="parameters_synthetic_generation.yml")


def _constant_counts(group: pd.DataFrame) -> str:
    """How many seeds' global models predict one class (>= 95 % of one prediction) on the
    test set and on the unseen device: a balanced accuracy near 0.5 is then no model at all."""
    counts = [int(group[c].fillna(False).astype(bool).sum()) if c in group else 0
              for c in ("global.constant_predictor", "unseen_device.global.constant_predictor")]  # fmt: skip
    return f"{counts[0]} / {counts[1]}"


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
        "unseen_device.global.balanced_accuracy": unseen["balanced_accuracy"] if unseen else None,
        "global.constant_predictor": bool(g["constant_predictor"]) if g else None,
        "unseen_device.global.constant_predictor": bool(unseen["constant_predictor"]) if unseen else None,
        "unseen_device.global.rare_class_recall": unseen["per_class_recall"][rare] if unseen else None,
        "personalized.rare_class_recall": float(np.mean(valid)) if valid else float("nan"),
        "personalized.balanced_accuracy": summary["mean"]["balanced_accuracy"] if summary else None,
        "personalized.accuracy": summary["mean"]["accuracy"] if summary else None,
        "unseen_device.personalized.accuracy": unseen_pers["mean"]["accuracy"] if unseen_pers else None,
        "unseen_device.personalized.balanced_accuracy": unseen_pers["mean"]["balanced_accuracy"] if unseen_pers else None,
    }


TABLE_COLUMNS = (
    ("global.rare_class_recall", "rare-class recall (global)"),
    ("personalized.rare_class_recall", "rare-class recall (personalized)"),
    ("global.balanced_accuracy", "balanced acc (global)"),
    ("personalized.balanced_accuracy", "balanced acc (personalized)"),
    ("unseen_device.global.balanced_accuracy", "unseen-device balanced acc (global)"),
    ("unseen_device.personalized.balanced_accuracy", "unseen-device balanced acc (personalized)"),
)


#: The two questions of FedSSG's claim, answered per method in the verdict.
VERDICT_METRICS = (
    ("global.rare_class_recall", "the rare class (global recall)"),
    ("unseen_device.global.balanced_accuracy", "the unseen device (global balanced accuracy)"),
)


def arm_differences(ablation_runs: pd.DataFrame) -> pd.DataFrame:
    """Every arm against each of `BASELINE_ARMS`, per method and metric, paired by seed.

    The rule is the comparison's (`reporting.findings`): a difference is stated only when
    every seed agrees on its sign and |mean| > std. The 95% interval beside it is Student's
    t over the seeds (wide with three seeds: t = 4.30).
    """
    from scipy import stats

    frames = []
    for method in dict.fromkeys(ablation_runs["method"]):
        runs = ablation_runs[ablation_runs["method"] == method]
        for arm in ARMS:
            baselines = [b for b in BASELINE_ARMS if b != arm and not (arm == "none" and b == "augmented")]
            chosen = runs[runs["arm"].isin([arm, *baselines])].assign(method=lambda f: f["arm"])
            if arm not in set(chosen["arm"]) or not baselines:
                continue
            found = paired_differences(chosen, reference=arm, metrics=TABLE_COLUMNS, scenario_columns=())
            if found.empty:
                continue
            frames.append(found.assign(method=method, arm=arm))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    half = [
        stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) if n > 1 and np.isfinite(sd) else np.nan
        for n, sd in zip(table["seeds"], table["std_difference"], strict=True)
    ]
    table["ci95_low"] = table["mean_difference"] - np.asarray(half)
    table["ci95_high"] = table["mean_difference"] + np.asarray(half)
    first = ["method", "arm", "baseline", "metric", "label", "seeds"]
    return table[[*first, *[c for c in table.columns if c not in first]]]


def _verdict_lines(differences: pd.DataFrame) -> list[str]:
    lines = ["## Verdict (paired by seed; stated only when every seed agrees and |mean| > std)", ""]
    if differences.empty:
        return [*lines, "No paired runs.", ""]
    for method in dict.fromkeys(differences["method"]):
        lines.append(f"**{method}**")
        for metric, question in VERDICT_METRICS:
            for arm in ("synthetic", "pretraining", "pretraining+synthetic"):
                verdicts = []
                for baseline in BASELINE_ARMS:
                    row = differences[(differences["method"] == method) & (differences["arm"] == arm)
                                      & (differences["baseline"] == baseline) & (differences["metric"] == metric)]  # fmt: skip
                    if row.empty:
                        continue
                    r = row.iloc[0]
                    word = {"better": "helps", "worse": "hurts", "not distinguishable": "no stated effect"}[r["verdict"]]
                    verdicts.append(f"vs {baseline}: {word} ({r['mean_difference']:+.3f} ± {r['std_difference']:.3f}, "
                                    f"better in {r['seeds_reference_better']}/{r['seeds']} seeds)")  # fmt: skip
                if verdicts:
                    lines.append(f"- {arm} on {question}: " + "; ".join(verdicts))
        lines.append("")
    return lines


def _differences_markdown(differences: pd.DataFrame) -> list[str]:
    if differences.empty:
        return []
    shown = differences.assign(
        difference=[f"{m:+.3f} ± {sd:.3f}" for m, sd in zip(differences["mean_difference"], differences["std_difference"], strict=True)],
        ci95=[f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(differences["ci95_low"], differences["ci95_high"], strict=True)],
        better=[f"{b}/{n}" for b, n in zip(differences["seeds_reference_better"], differences["seeds"], strict=True)],
    )
    columns = {"method": "method", "arm": "arm", "baseline": "against", "label": "metric", "difference": "difference (mean ± std)",
               "ci95": "95% t-interval", "better": "seeds better", "verdict": "verdict"}  # fmt: skip
    return ["## Paired differences (arm - baseline, same partition and seed)", "",
            shown[list(columns)].rename(columns=columns).to_markdown(index=False), ""]  # fmt: skip


def ablation_table(ablation_runs: pd.DataFrame) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    """Mean ± std over seeds per method and arm (CSV and markdown, with the paired
    differences and the verdict) and the paired differences as their own table."""
    records = []
    for method in dict.fromkeys(ablation_runs["method"]):
        for arm in ARMS:
            group = ablation_runs[(ablation_runs["method"] == method) & (ablation_runs["arm"] == arm)]
            if group.empty:
                continue
            record: dict[str, Any] = {"method": method, "extra data": arm, "seeds": len(group),
                                      "extra samples": int(group["extra_samples"].mean()),
                                      "constant global models (test / unseen device)": _constant_counts(group)}  # fmt: skip
            for column, heading in TABLE_COLUMNS:
                values = group[column].dropna().astype(float)
                record[f"{column}.mean"] = values.mean() if len(values) else None
                record[f"{column}.std"] = values.std(ddof=1) if len(values) > 1 else 0.0
                record[heading] = "n/a" if values.empty else (
                    f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.iloc[0]:.3f}"
                )
            records.append(record)
    table = pd.DataFrame(records)
    differences = arm_differences(ablation_runs)
    rare = ablation_runs["rare_class"].iloc[0] if len(ablation_runs) else "?"
    headings = ["method", "extra data", "seeds", "extra samples", *[h for _, h in TABLE_COLUMNS],
                "constant global models (test / unseen device)"]  # fmt: skip
    markdown = "\n".join(
        [
            "# FedSSG ablation (mean ± std over seeds)",
            "",
            f"Rare class: **{rare}**. Arms: no extra data; each hospital's FedSSG synthetic set (passed by the "
            "synthetic data gate); the same number of classically augmented real samples of the same classes "
            "(shift, flip, brightness/contrast); the server's pretraining of the shared model on the synthetic "
            "pool before round 1, alone and with the shipped synthetic sets. "
            "Global: the shared model on the official test set; personalized: each hospital's model on its "
            "local test split (mean over hospitals); unseen device: the official test set as the held-out "
            "imaging device renders it. For the pretraining arms, extra samples are the server's pool (the "
            "hospitals add none in the pretraining-only arm).",
            "",
            table[headings].to_markdown(index=False),
            "",
            *_differences_markdown(differences),
            *_verdict_lines(differences),
        ]
    )
    numeric = table[["method", "extra data", "seeds", "extra samples", *[c for c in table.columns if c.endswith((".mean", ".std"))]]]
    return numeric, markdown, differences


def plot_ablation(ablation_runs: pd.DataFrame) -> Figure:
    return ablation_plots.ablation_bars(ablation_runs, [c for c, _ in TABLE_COLUMNS], [h for _, h in TABLE_COLUMNS], ARMS)
