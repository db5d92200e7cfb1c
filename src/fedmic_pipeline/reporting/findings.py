"""Findings a comparison states by itself: paired-by-seed differences against the spread.

Methods in a comparison run on the same partition for each seed, so the honest contrast
between FedMIC and a baseline is the per-seed difference d_s = m_FedMIC(s) - m_base(s).
A difference is **stated** only when it exceeds the seed-to-seed spread: every seed
agrees on its sign and |mean(d)| > std(d) (sample std over seeds). Anything else is
reported as "not distinguishable", with the numbers, so the README can quote the
generated sentences instead of reading a table by eye.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["FINDING_METRICS", "findings_markdown", "paired_differences"]

#: (metric column, label[, higher is better]) compared by default.
FINDING_METRICS: tuple[tuple, ...] = (
    ("global.balanced_accuracy", "global balanced accuracy"),
    ("global.macro_auc", "global AUC"),
    ("unseen_device.global.balanced_accuracy", "unseen-device balanced accuracy"),
    ("personalized.mean.balanced_accuracy", "personalized balanced accuracy"),
    ("personalized.mean.macro_auc", "personalized AUC"),
    ("communication.mb_up_total", "MB uploaded", False),
)


def paired_differences(
    runs: pd.DataFrame,
    reference: str = "fedmic",
    metrics: Sequence[tuple[str, str]] = FINDING_METRICS,
    scenario_columns: Sequence[str] = ("dataset", "lambda", "join_ratio"),
) -> pd.DataFrame:
    """One row per scenario x baseline x metric: paired differences reference - baseline.

    ``runs`` has one row per method x scenario x seed (the comparison's ``runs.csv``).
    Seeds missing for either method are left out of that pair; pairs with fewer than two
    seeds are never stated (no spread to compare against). A metric may carry a third
    element, False, when lower is better (bytes): "better" then means a negative difference.
    """
    keys = [c for c in scenario_columns if c in runs.columns]
    rows = []
    for scenario, group in runs.groupby(keys, sort=True) if keys else [((), runs)]:
        scenario = scenario if isinstance(scenario, tuple) else (scenario,)
        mine = group[group["method"] == reference].set_index("seed")
        if mine.empty:
            continue
        for baseline in dict.fromkeys(group["method"]):
            if baseline == reference:
                continue
            theirs = group[group["method"] == baseline].set_index("seed")
            for column, label, *direction in metrics:
                higher_is_better = direction[0] if direction else True
                if column not in group:
                    continue
                a = pd.to_numeric(mine[column], errors="coerce")
                b = pd.to_numeric(theirs[column], errors="coerce")
                d = (a - b).dropna()
                if d.empty:
                    continue
                mean = float(d.mean())
                std = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
                same_sign = bool((d > 0).all() or (d < 0).all())
                stated = len(d) >= 2 and same_sign and abs(mean) > std
                rows.append(
                    {
                        **dict(zip(keys, scenario, strict=True)),
                        "baseline": baseline,
                        "metric": column,
                        "label": label,
                        "seeds": int(len(d)),
                        "reference_mean": float(a.loc[d.index].mean()),
                        "baseline_mean": float(b.loc[d.index].mean()),
                        "mean_difference": mean,
                        "std_difference": std,
                        "seeds_reference_better": int(((d > 0) if higher_is_better else (d < 0)).sum()),
                        "stated": stated,
                        "verdict": ("better" if (mean > 0) == higher_is_better else "worse") if stated else "not distinguishable",
                    }
                )
    return pd.DataFrame(rows)


def _scenario_title(row: pd.Series, keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        if key in row and pd.notna(row[key]):
            parts.append(f"{key} = {row[key]}")
    return ", ".join(parts) or "all runs"


def findings_markdown(differences: pd.DataFrame, reference: str = "fedmic") -> str:
    """Sentences per scenario: what the reference wins, loses, and where it cannot be told apart."""
    lines = [
        f"# Findings: {reference} against every baseline, paired by seed",
        "",
        "A difference is stated only when all seeds agree on its sign and |mean| > std of the paired "
        "differences; figures are mean ± std of (reference - baseline) over seeds.",
        "",
    ]
    if differences.empty:
        return "\n".join([*lines, "No paired runs to compare.", ""])
    keys = [c for c in ("dataset", "lambda", "join_ratio") if c in differences.columns]
    for _, group in differences.groupby(keys, sort=True) if keys else [((), differences)]:
        lines.append(f"## {_scenario_title(group.iloc[0], keys)}")
        lines.append("")
        for verdict, title in (("better", "beats"), ("worse", "loses to"), ("not distinguishable", "cannot be told apart from")):
            chosen = group[group["verdict"] == verdict]
            if chosen.empty:
                continue
            lines.append(f"- **{reference} {title}**:")
            for _, row in chosen.iterrows():
                std = "n/a" if np.isnan(row["std_difference"]) else f"{row['std_difference']:.3f}"
                lines.append(
                    f"  - {row['baseline']} on {row['label']}: {row['reference_mean']:.3f} vs {row['baseline_mean']:.3f} "
                    f"(difference {row['mean_difference']:+.3f} ± {std}, {reference} better in "
                    f"{row['seeds_reference_better']}/{row['seeds']} seeds)"
                )
        lines.append("")
    return "\n".join(lines)
