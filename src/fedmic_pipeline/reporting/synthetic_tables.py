"""The FedSSG quality report for humans: a tidy CSV table and a Markdown summary.

Built from the JSON result of `fedmic_pipeline.synthetic_sets.measure_quality`, so the
numbers a reader sees are exactly the recorded ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

QUALITY_COLUMNS = ["reference", "section", "scope", "class", "device", "metric", "synthetic", "real_reference", "n_real", "n_compared"]
_DIST_METRICS = ("fd", "mmd2", "precision_k3", "recall_k3", "precision_k5", "recall_k5")
_DISABLED = "# Synthetic sample quality\n\nSynthetic generation is disabled (`synthetic.enabled: false`).\n"
_REFERENCE_TEXT = {
    "validation": "the hospitals' local VALIDATION images of the cell's class and device (pooled over the hospitals of that "
    "device; the held-out device has none). Choose generators and sampling settings on these numbers.",
    "test": "the global TEST images of the cell's class rendered by the cell's device (every device, the held-out one "
    "included). The final report: do not choose settings on it.",
}


def quality_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy rows per reference: distribution metrics (synthetic vs the reference, real train
    vs the reference as the floor) per cell/class/device/overall, and CAS (synthetic-trained
    vs real-trained student) accuracy and per-class recall per device; none when disabled."""
    if not result.get("enabled"):
        return pd.DataFrame(columns=QUALITY_COLUMNS)
    rows = []
    classes = result["class_names"]
    for reference, block in result["references"].items():
        dist = block["distribution"]
        scopes = [("cell", e.get("class_name"), e.get("device_name"), e) for e in dist["cells"]]
        scopes += [("class", e["class_name"], "all", e) for e in dist["by_class"]]
        scopes += [("device", "all", e["device_name"], e) for e in dist["by_device"]]
        if dist.get("overall"):
            scopes.append(("overall", "all", "all", dist["overall"]))
        for scope, cls, dev, e in scopes:
            syn, ref = e.get("synthetic"), e.get("real_train")
            if not syn:
                continue
            for metric in [m for m in _DIST_METRICS if m in syn] or list(_DIST_METRICS):
                rows.append([reference, "distribution", scope, cls, dev, metric, syn.get(metric), ref.get(metric), syn["n_real"], syn["n_fake"]])
        cas = block["cas"]
        for dev, got in cas["trained_on_synthetic"].items():
            real = cas["trained_on_real"][dev]
            rows.append([reference, "cas", "device", "all", dev, "accuracy", got["accuracy"], real["accuracy"], got["n"], cas["train_size"]])
            for c, (a, b) in enumerate(zip(got["per_class_recall"], real["per_class_recall"], strict=True)):
                rows.append([reference, "cas", "device", classes[c], dev, "recall", a, b, got["n"], cas["train_size"]])
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _headline_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per summary (``QualityRuler.score``'s ``summary``): the numbers the floors name."""
    lines = [
        "| reference | FD synth | FD real train | FD ratio | P@3 | R@3 | CAS seen synth / real (ratio) | CAS held-out synth / real |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {_fmt(s['fd'])} | {_fmt(s['fd_real_train'])} | {_fmt(s['fd_ratio'], '.1f')}x | {_fmt(s['precision_k3'], '.2f')} | "
            f"{_fmt(s['recall_k3'], '.2f')} | {_fmt(s['cas_seen'])} / {_fmt(s['cas_real_seen'])} ({_fmt(s['cas_ratio'], '.2f')}x) | "
            f"{_fmt(s['cas_held_out'])} / {_fmt(s['cas_real_held_out'])} |"
        )
    return lines


def quality_markdown(result: Mapping[str, Any], table: pd.DataFrame) -> str:
    """A human summary: the headline per reference, then per reference the distribution
    metrics with their real-data floor, and CAS."""
    if not result.get("enabled"):
        return _DISABLED
    lines = [
        "# Synthetic sample quality (FedSSG)",
        "",
        f"Generator sha256 `{result['generator_sha256'][:16]}...`; seed {result['seed']}. {result['reference_encoder_note']}",
        "`synthetic` compares generator samples with a held-out real reference set; `real train` compares the real training "
        "images of the same cells (same sample size) with it, i.e. the value a perfect generator would reach. Lower FD/MMD^2 "
        "and higher precision/recall are better. FD ratio = FD synth / FD real train.",
        "",
        *_headline_rows(result["summary"]),
    ]
    for reference, block in result["references"].items():
        lines += _reference_section(reference, block, table[table["reference"] == reference], result["class_names"])
    lines += ["", "Reference encoder (per rendering device): device identified / joint class x device label"]
    for reference, acc in result["encoder"]["accuracy"].items():
        pairs = ", ".join(f"{k} {_fmt(v)} / {_fmt(acc['joint_by_device'].get(k))}" for k, v in acc["device_by_device"].items())
        lines.append(f"- {reference}: {pairs}")
    return "\n".join(lines + [""])


def _reference_section(reference: str, block: Mapping[str, Any], table: pd.DataFrame, class_names: list[str]) -> list[str]:
    lines = [
        "",
        f"## Against the {reference} reference",
        "",
        f"Real reference set: {_REFERENCE_TEXT.get(reference, reference)}",
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
    cas = block["cas"]
    lines += [
        "",
        f"Classification accuracy score: a student CNN trained on {cas['train_size']} synthetic images only (same class x "
        "device counts as the real training data) vs the same recipe trained on the real training data, tested on this "
        "reference's images of each device.",
        "",
        "| device | CAS (synthetic-trained) | real-trained | " + " | ".join(f"recall {c} synth / real" for c in class_names) + " |",
        "|---|---|---|" + "---|" * len(class_names),
    ]
    for dev, got in cas["trained_on_synthetic"].items():
        real = cas["trained_on_real"][dev]
        tag = " (held out, unseen)" if dev == cas["held_out_device"] else ""
        recalls = " | ".join(f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(got["per_class_recall"], real["per_class_recall"], strict=True))
        lines.append(f"| {dev}{tag} | {_fmt(got['accuracy'])} | {_fmt(real['accuracy'])} | {recalls} |")
    return lines
