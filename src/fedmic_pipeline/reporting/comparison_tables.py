"""The comparison grid's summary for humans: mean ± std over seeds per scenario and method.

Built from `comparison_runs` (one row per method x lambda x join ratio x seed), with a
majority-class reference row per scenario and counts of constant predictors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def _mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _scenario_keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in ("dataset", "lambda", "join_ratio") if c in runs.columns]


def comparison_summary(comparison_runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
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
