"""FedMIC's whole-run traffic (up + down) against FedAvg's, with the downlink dense or compressed.

    python -m fedmic_pipeline.benchmarks.traffic --seeds 0 1 2 --join-ratio 0.5 --rounds 20

Runs FedAvg, FedMIC with the dense broadcast and FedMIC with the compressed broadcast
(``downlink_compression``: under partial participation a hospital that missed rounds
catches up, see ``core/algorithms/fedmic.py``) on the partition in `data/05_model_input`
(`kedro run --pipelines data_ingestion,data_partition` first), one run per training seed,
and prints the bytes each run moved and the global model's balanced accuracy (selected on
validation, scored on the official test split), with the paired difference compressed -
dense per seed. Writes `data/08_reporting/traffic.{md,json}`. One torch thread by default.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from fedmic_pipeline import federation, model_evaluation
from fedmic_pipeline.benchmarks.cli import configure_logging, publish, run_arguments
from fedmic_pipeline.benchmarks.recipe import load_saved_partition

logger = logging.getLogger(__name__)

#: (label, method, overrides of the method's own parameter block)
ARMS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("fedavg", "fedavg", {}),
    ("fedmic, dense downlink", "fedmic", {"downlink_compression": False}),
    ("fedmic, compressed downlink", "fedmic", {"downlink_compression": True}),
)


def run(seeds: list[int], rounds: int, join_ratio: float, threads: int, root: Path) -> list[dict[str, Any]]:
    conf = yaml.safe_load((root / "conf/base/parameters_federated_training.yml").read_text())
    clients, global_test, manifest, info = load_saved_partition(root / "data")
    evaluation = {**conf["evaluation"], "n_bootstrap": 0}
    rows = []
    for seed in seeds:
        training = {**conf["training"], "num_rounds": rounds, "join_ratio": join_ratio, "seed": seed, "num_threads": threads}
        for label, method, overrides in ARMS:
            params = {key: dict(value or {}) for key, value in conf["algorithm_params"].items()}
            params.setdefault(method, {}).update(overrides)
            started = time.perf_counter()
            report, summary, _ = federation.run_and_evaluate(
                method, params, info, clients, global_test, manifest.get("held_out_device"), training, evaluation
            )
            headline = model_evaluation.headline_metrics(report, summary)
            totals = summary["totals"]
            rows.append({
                "arm": label, "seed": seed, "bytes_up": totals["bytes_up_total"], "bytes_down": totals["bytes_down_total"],
                "bytes_total": totals["bytes_total"], "global_balanced_accuracy": headline["global.balanced_accuracy"],
                "selected_round": headline["selection.global_round"], "wall_s": time.perf_counter() - started,
            })  # fmt: skip
            logger.info("%s seed %d: %.2f MB, global bal. acc %.3f", label, seed, rows[-1]["bytes_total"] / 1e6,
                        rows[-1]["global_balanced_accuracy"])  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], rounds: int, join_ratio: float) -> str:
    fedavg = {r["seed"]: r["bytes_total"] for r in rows if r["arm"] == "fedavg"}
    lines = [
        f"# Whole-run traffic, {rounds} rounds, join ratio {join_ratio}",
        "",
        "| arm | seed | MB up | MB down | MB total | share of FedAvg's total | global bal. acc (test) | selected round | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['bytes_total'] / 1e6:.2f} | "
            f"{r['bytes_total'] / fedavg[r['seed']]:.1%} | {r['global_balanced_accuracy']:.3f} | {r['selected_round']} | "
            f"{r['wall_s']:.0f} |"
        )
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted(fedavg)
    diffs = [
        by["fedmic, compressed downlink", s]["global_balanced_accuracy"] - by["fedmic, dense downlink", s]["global_balanced_accuracy"]
        for s in seeds
    ]
    shares = [by["fedmic, compressed downlink", s]["bytes_total"] / fedavg[s] for s in seeds]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    lines += [
        "",
        f"Compressed downlink: total traffic {statistics.mean(shares):.1%} of FedAvg's (per seed "
        f"{', '.join(f'{s:.1%}' for s in shares)}); global balanced accuracy minus the dense downlink's, paired by seed: "
        f"{', '.join(f'{d:+.3f}' for d in diffs)} (mean {statistics.mean(diffs):+.3f}, std {spread:.3f}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    configure_logging()
    rows = run(args.seeds, args.rounds, args.join_ratio, args.threads, args.root)
    publish(markdown(rows, args.rounds, args.join_ratio), rows, args.root / "data/08_reporting", "traffic")


if __name__ == "__main__":
    main()
