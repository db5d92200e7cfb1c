"""What SecAgg+ costs per round on loopback: bytes and seconds, with and without it.

    python -m fedmic_pipeline.flower.secagg_cost --nodes 4 --rounds 2 [--data-dir DIR] [--output FILE]

On one loopback federation (``launch.LoopbackFederation``: TLS, registered node keys, the
sites' app check, warm ClientApps) it runs, on the same partitions, seed and ``conf/base``
parameters, one torch thread per process:

* ``fedavg`` plain (one train message per node, the dense float32 model each way);
* ``fedavg`` with ``secure-aggregation = "secaggplus"`` (``secure_aggregation``: four
  exchanges per round; the masked vector holds one int64 per floating entry);
* ``fedmic`` plain (the compressed low-rank upload). FedMIC cannot run under SecAgg+
  (``secure_aggregation.check_supported``); a dense FedMIC under SecAgg+ would upload the
  dense update of the same student, whose masked vector is what the ``fedavg`` SecAgg+ row
  uploads when FedAvg trains that student -- the table says so rather than inventing a row.

Per run it reports the mean round time (the engine's ``round_time_s``: train exchange,
aggregation, validation), the mean seconds of the train exchange, bytes per round as the
core counts them and as serialized Flower messages (``records.message_wire_nbytes``, all
four SecAgg+ stages included), and the SecAgg+ stage seconds. Validation is scored only
after the last round, so the round times are mostly the train exchange. A measurement,
not a test: on shared cores the seconds move with the load; the bytes do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import task
from .round_timing import _run_config

__all__ = ["RunCost", "main", "measure"]

_KB = 1024.0
#: (label, algorithm, extra run config) of the runs compared.
RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("fedavg", "fedavg", {}),
    ("fedavg + SecAgg+", "fedavg", {"secure-aggregation": "secaggplus"}),
    ("fedmic (compressed)", "fedmic", {}),
)


@dataclass
class RunCost:
    """Per-round means of one run (bytes are totals over the round's nodes)."""

    label: str
    rounds: int
    round_s: float
    train_s: float
    core_up: float
    core_down: float
    wire_up: float
    wire_down: float
    stages_s: dict[str, float] = field(default_factory=dict)
    val_balanced_accuracy: float | None = None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cost(label: str, summary: dict[str, Any]) -> RunCost:
    history = summary["history"]
    stages: dict[str, list[float]] = {}
    for record in history:
        for stage in record.get("secagg_stages", []):
            stages.setdefault(stage["stage"], []).append(float(stage["seconds"]))
    return RunCost(
        label=label,
        rounds=len(history),
        round_s=_mean([r["round_time_s"] for r in history]),
        train_s=_mean([r["train_time_s"] for r in history]),
        core_up=_mean([r["bytes_up_total"] for r in history]),
        core_down=_mean([r["bytes_down_total"] for r in history]),
        wire_up=_mean([r["wire_bytes_up_total"] for r in history]),
        wire_down=_mean([r["wire_bytes_down_total"] for r in history]),
        stages_s={name: _mean(values) for name, values in stages.items()},
        val_balanced_accuracy=summary["totals"].get("last_global_val_balanced_accuracy"),
    )


def measure(nodes: int, data_dir: Path, rounds: int, extra: dict[str, Any], work_dir: Path, timeout: float = 1800) -> list[RunCost]:
    """Every run of ``RUNS`` on one loopback federation, one after another."""
    from .launch import LoopbackFederation

    costs = []
    federation = LoopbackFederation(
        nodes, data_dir, work_dir=work_dir, env={"OMP_NUM_THREADS": "1"}, max_poll_wait_s=0.2,
        node_configs=[{"num-threads": 1} for _ in range(nodes)],
    )  # fmt: skip
    with federation:
        for i, (label, algorithm, run_extra) in enumerate(RUNS):
            config = _run_config(algorithm, rounds, work_dir / f"out-{i}", {"eval-every": rounds, **extra, **run_extra})
            result = federation.run(config, timeout=timeout)
            if result.status != "completed":
                raise RuntimeError(f"{label} ended {result.status}:\n{result.output[-3000:]}")
            costs.append(_cost(label, result.summary))
    return costs


def table(costs: list[RunCost]) -> str:
    """The markdown table (ratios against the first, plain FedAvg, row)."""
    base = costs[0]
    lines = [
        "| run | mean round (s) | train exchange (s) | × fedavg time | core up (KiB) | wire up (KiB) | wire down (KiB) "
        "| × fedavg wire up | SecAgg+ stages (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in costs:
        stages = " / ".join(f"{name} {s:.2f}" for name, s in c.stages_s.items()) or "-"
        lines.append(
            f"| {c.label} | {c.round_s:.2f} | {c.train_s:.2f} | {c.train_s / base.train_s:.2f} | {c.core_up / _KB:.1f} "
            f"| {c.wire_up / _KB:.1f} | {c.wire_down / _KB:.1f} | {c.wire_up / base.wire_up:.2f} | {stages} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmic_pipeline.flower.secagg_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=task.RUN_CONFIG_DEFAULTS["data-dir"])
    parser.add_argument("--run-config", default="{}", help="JSON object of extra run-config values for every run")
    parser.add_argument("--output", default=None, help="also write the table (markdown) and the note to this file")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    task.configure_logging()
    for key, value in {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "FLWR_TELEMETRY_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedmic-secagg-cost-")).resolve()
    extra = {"evaluate-personalized": False, **json.loads(args.run_config)}
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    costs = measure(args.nodes, task.resolve_path(args.data_dir), args.rounds, extra, work_dir)
    command = "python -m fedmic_pipeline.flower.secagg_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"`{command}` -- {args.nodes} hospitals (partitions 0-{args.nodes - 1} of `{args.data_dir}`), {args.rounds} "
        f"rounds per run, seed and parameters from the run-config defaults (`conf/base`), validation after the last "
        f"round only, one torch thread per process, CPU, TLS + node keys + app check; {time.perf_counter() - t0:.0f} s "
        f"in all, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after. Bytes are per round, summed "
        "over the nodes; 'core' is the payload the core counts, 'wire' every serialized Flower message of the train "
        "exchange (all four SecAgg+ stages). A dense FedMIC under SecAgg+ would upload what 'fedavg + SecAgg+' "
        "uploads for the same student."
    )
    text = table(costs)
    print(text)
    print(note)
    if args.output:
        Path(args.output).write_text(f"{note}\n\n{text}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
