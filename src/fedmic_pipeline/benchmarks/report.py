"""The throughput report as people read it: a markdown file beside the JSON, a console table.

Separate from the measurement so that a saved ``benchmark.json`` can be re-rendered
(``to_markdown(json.load(...))``) without running anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .variants import VARIANT_LABELS

__all__ = ["print_table", "to_markdown", "write_report"]


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table with its setting and load."""
    host, setting = report["host"], report["setting"]
    lines = [
        "# Client-training throughput",
        "",
        f"{setting['num_clients']} clients ({setting['train_samples_total']} train samples), "
        f"{setting['clients_per_round']} per round (join ratio {setting['join_ratio']}), {setting['rounds']} rounds x "
        f"{setting['repeats']} repeats, medians; defaults from: {setting['defaults_source']}.",
        f"torch {host['torch']} on {host['device']} ({host['device_name']}), {host['torch_threads']} threads, "
        f"{host['cpu_count']} CPUs; load average (1 min) {host['load_avg_1m_start']} at start, "
        f"{host['load_avg_1m_end']} at end; CPU cores used by other processes during the timed runs "
        f"(median) {host['foreign_cpu_cores_median']}.",
        "",
        "| Algorithm | Variant | Data path | Batch | Samples/round | Samples/s | s/round | x naive | Other procs (cores) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['algorithm']} | {row['variant']} | {VARIANT_LABELS[row['variant']]} | {row['batch_size']} | "
            f"{row['samples_per_round']:.0f} | {row['samples_per_s']:.1f} | {row['round_time_s']:.3f} | "
            f"{row['speedup_vs_naive']:.2f} | {row['foreign_cpu_cores_median']} |"
        )
    lines += [
        "",
        "Ratios of the medians (in brackets: median of the within-repetition ratios).",
        "",
        "| Algorithm | resident vs naive | data-path gain (bs 10) | batch-size gain | clients together vs one by one "
        "| repetitions discarded (contended) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["ratios"].items():
        lines.append(
            f"| {name} | {r['resident_vs_naive']:.2f} ({r['resident_vs_naive_paired']:.2f}) | "
            f"{r['data_path_gain_at_bs10']:.2f} ({r['data_path_gain_at_bs10_paired']:.2f}) | "
            f"{r['batch_size_gain']:.2f} ({r['batch_size_gain_paired']:.2f}) | {_together(r)} | "
            f"{len(report.get('discarded_repetitions', {}).get(name, []))} |"
        )
    return "\n".join(lines) + "\n"


def _together(ratios: Mapping[str, Any]) -> str:
    """The stacking ratio, or a dash for a method whose clients cannot be stacked."""
    if "vectorized_vs_resident" not in ratios:
        return "-"
    return f"{ratios['vectorized_vs_resident']:.2f} ({ratios['vectorized_vs_resident_paired']:.2f})"


def print_table(report: Mapping[str, Any]) -> None:
    """The report as a rich table on stdout, with one line of ratios per algorithm."""
    from rich.console import Console
    from rich.table import Table

    host, setting = report["host"], report["setting"]
    table = Table(
        title=(
            f"Client-training throughput: {setting['num_clients']} clients, {setting['clients_per_round']}/round, "
            f"{setting['rounds']} rounds x {setting['repeats']} repeats (medians)"
        ),
        caption=(
            f"torch {host['torch']}, {host['device']}, {host['torch_threads']} threads; load 1m "
            f"{host['load_avg_1m_start']} -> {host['load_avg_1m_end']}, other processes "
            f"{host['foreign_cpu_cores_median']} cores (median); defaults: {setting['defaults_source']}"
        ),
    )
    for col, justify in (
        ("Algorithm", "left"), ("Variant", "left"), ("Batch", "right"), ("Samples/round", "right"),
        ("Samples/s", "right"), ("s/round", "right"), ("x naive", "right"), ("Samples/s min-max", "right"),
        ("Other procs (cores)", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report["results"]:
        sps = [r["samples_per_s"] for r in row["runs"]]
        table.add_row(
            row["algorithm"], row["variant"], str(row["batch_size"]), f"{row['samples_per_round']:.0f}",
            f"{row['samples_per_s']:.1f}", f"{row['round_time_s']:.3f}", f"{row['speedup_vs_naive']:.2f}",
            f"{min(sps):.1f}-{max(sps):.1f}", str(row["foreign_cpu_cores_median"]),
        )  # fmt: skip
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for name, r in report["ratios"].items():
        console.print(
            f"{name}: resident vs naive x{r['resident_vs_naive']:.2f} = data path (bs 10) x{r['data_path_gain_at_bs10']:.2f}"
            f" * batch size x{r['batch_size_gain']:.2f}  (within-repetition ratios: x{r['resident_vs_naive_paired']:.2f},"
            f" x{r['data_path_gain_at_bs10_paired']:.2f}, x{r['batch_size_gain_paired']:.2f}); "
            f"clients together vs one by one {_together(r)}; "
            f"{len(report['discarded_repetitions'].get(name, []))} contended repetitions discarded"
        )


def write_report(report: Mapping[str, Any], output: Path) -> Path:
    """Write the JSON to ``output`` and the markdown beside it (same stem, ``.md``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md = output.with_suffix(".md")
    md.write_text(to_markdown(report), encoding="utf-8")
    return md
