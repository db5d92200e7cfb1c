"""The FedSSG quality report for humans: a tidy CSV table and a Markdown summary.

Built from the JSON result of `fedmic_pipeline.synthetic_sets.measure_quality`, so the
numbers a reader sees are exactly the recorded ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

QUALITY_COLUMNS = ["section", "scope", "class", "device", "metric", "synthetic", "real_reference", "n_real", "n_compared"]
_DIST_METRICS = ("fd", "mmd2", "precision_k3", "recall_k3", "precision_k5", "recall_k5")
_DISABLED = "# Synthetic sample quality\n\nSynthetic generation is disabled (`synthetic.enabled: false`).\n"


def quality_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy rows: distribution metrics (synthetic vs test, real train vs test as the
    reference) per cell/class/device/overall, and CAS (synthetic-trained vs real-trained
    student) accuracy and per-class recall per test-set device; no rows when disabled."""
    if not result.get("enabled"):
        return pd.DataFrame(columns=QUALITY_COLUMNS)
    rows = []
    dist = result["distribution"]
    scopes = [("cell", e.get("class_name"), e.get("device_name"), e) for e in dist["cells"]]
    scopes += [("class", e["class_name"], "all", e) for e in dist["by_class"]]
    scopes += [("device", "all", e["device_name"], e) for e in dist["by_device"]]
    if dist.get("overall"):
        scopes.append(("overall", "all", "all", dist["overall"]))
    for scope, cls, dev, e in scopes:
        syn, ref = e.get("synthetic_vs_test"), e.get("real_train_vs_test")
        if not syn:
            continue
        metrics = [m for m in _DIST_METRICS if m in syn] or list(_DIST_METRICS)
        for metric in metrics:
            rows.append(["distribution", scope, cls, dev, metric, syn.get(metric), ref.get(metric), syn["n_real"], syn["n_fake"]])
    cas = result["cas"]
    classes = result["class_names"]
    for dev, block in cas["trained_on_synthetic"].items():
        real = cas["trained_on_real"][dev]
        rows.append(["cas", "device", "all", dev, "accuracy", block["accuracy"], real["accuracy"], block["n"], cas["train_size"]])
        for c, (a, b) in enumerate(zip(block["per_class_recall"], real["per_class_recall"], strict=True)):
            rows.append(["cas", "device", classes[c], dev, "recall", a, b, block["n"], cas["train_size"]])
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def quality_markdown(result: Mapping[str, Any], table: pd.DataFrame) -> str:
    """A human summary: distribution metrics with their real-data reference, and CAS."""
    if not result.get("enabled"):
        return _DISABLED
    lines = [
        "# Synthetic sample quality (FedSSG)",
        "",
        f"Generator sha256 `{result['generator_sha256'][:16]}...`; seed {result['seed']}. {result['reference_encoder_note']}",
        "Real reference set: the global TEST images of the cell's class rendered by the cell's device. `synthetic` compares "
        "generator samples with it; `real train` compares the real training images of the same cell (same sample size) "
        "with it, i.e. the value a perfect generator would reach. Lower FD/MMD^2 and higher precision/recall are better.",
        "",
        "## Distribution metrics",
        "",
        "| scope | class | device | n synth | FD synth | FD real train | MMD^2 synth | MMD^2 real train | P@3 synth | R@3 synth | P@3 real | R@3 real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dist = table[table["section"] == "distribution"]
    for (scope, cls, dev), group in dist.groupby(["scope", "class", "device"], sort=False):
        g = group.set_index("metric")
        def val(metric: str, column: str) -> str:
            return _fmt(g[column].get(metric)) if metric in g.index else "-"
        lines.append(
            f"| {scope} | {cls} | {dev} | {int(g['n_compared'].iloc[0])} | {val('fd', 'synthetic')} | {val('fd', 'real_reference')} | "
            f"{val('mmd2', 'synthetic')} | {val('mmd2', 'real_reference')} | {val('precision_k3', 'synthetic')} | "
            f"{val('recall_k3', 'synthetic')} | {val('precision_k3', 'real_reference')} | {val('recall_k3', 'real_reference')} |"
        )
    cas = result["cas"]
    lines += [
        "",
        "## Classification accuracy score (train on synthetic only, test on real)",
        "",
        f"Student CNN trained on {cas['train_size']} synthetic images (same class x device counts as the real training "
        "data) vs the same recipe trained on the real training data; tested on the global test set rendered by each device.",
        "",
        "| test device | CAS (synthetic-trained) | real-trained | " + " | ".join(f"recall {c} synth / real" for c in result["class_names"]) + " |",
        "|---|---|---|" + "---|" * len(result["class_names"]),
    ]
    for dev, block in cas["trained_on_synthetic"].items():
        real = cas["trained_on_real"][dev]
        tag = " (held out, unseen)" if dev == cas["held_out_device"] else ""
        recalls = " | ".join(f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(block["per_class_recall"], real["per_class_recall"], strict=True))
        lines.append(f"| {dev}{tag} | {_fmt(block['accuracy'])} | {_fmt(real['accuracy'])} | {recalls} |")
    lines += [
        "",
        f"Mean over seen devices: CAS {_fmt(cas.get('trained_on_synthetic_mean_seen_devices'))} vs real-trained "
        f"{_fmt(cas.get('trained_on_real_mean_seen_devices'))}.",
        "",
        "Reference encoder on the global test set (per rendering device): device identified "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in result["encoder"]["test_device_accuracy_by_device"].items())
        + "; joint class x device label "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in result["encoder"]["test_joint_accuracy_by_device"].items()) + ".",
        "",
    ]
    return "\n".join(lines)
