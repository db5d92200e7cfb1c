"""Round times of a Flower deployment on loopback next to the in-process runner's.

    python -m fedmic_pipeline.flower.round_timing --nodes 4 --rounds 2 --algorithms fedavg fedmic \\
        [--modes warm cold] [--output docs/results/flower_rounds.md]

For each algorithm it runs the same rounds on partitions 0..N-1 of ``--data-dir`` with the
same run config (seed, rounds, the params file, one torch thread per process) twice:

* in this process with ``core.simulation.run_simulation`` (data loading and
  ``init_client`` count as start-up);
* over Flower on 127.0.0.1 (``launch.LoopbackFederation``, TLS + node keys + app check as
  by default), once per ``--modes`` entry: ``warm`` (the launcher's default: ClientApps
  forked from a warm SuperExec, 0.2 s SuperNode polls) and ``cold`` (Flower's default:
  a new ``flwr-clientapp`` interpreter per message, 3 s idle polls).

Both runners time a round the same way (``core.engine.RoundEngine``'s ``round_time_s``:
sampling, train exchange, aggregation, evaluation). Start-up is reported apart: for
Flower the federation's start (SuperLink, key registration, SuperNodes, warm SuperExecs)
and each run's (``flwr run`` until the first round starts: ServerApp process, partition
query). It prints the table and writes it (with the machine's load) to ``--output``.
This is a measurement, not a test: on 2 shared cores the numbers move with the load.
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

__all__ = ["Timing", "main", "time_flower", "time_in_process"]


@dataclass
class Timing:
    """Start-up seconds and per-round seconds of one runner for one algorithm."""

    runner: str
    algorithm: str
    startup_s: float
    round_s: list[float]
    federation_startup_s: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_round_s(self) -> float:
        return sum(self.round_s) / len(self.round_s)


def _run_config(algorithm: str, rounds: int, output_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "num-rounds": rounds,
        "device": "cpu",
        "num-threads": 1,
        "mlflow-tracking-uri": "none",
        "output-dir": str(output_dir),
        **extra,
    }


def time_in_process(algorithm: str, nodes: int, data_dir: Path, run_config: dict[str, Any]) -> Timing:
    """``run_simulation`` on partitions 0..nodes-1 with the ServerApp's own config."""
    import torch

    from ..core.simulation import run_simulation

    t0 = time.perf_counter()
    cfg = task.ServerRunConfig.from_run_config({**run_config, "data-dir": str(data_dir)})
    torch.set_num_threads(1)
    spec = task.load_data_spec(data_dir)
    clients = [task.load_client_data(data_dir, i) for i in range(nodes)]
    algorithm_obj = task.build_algorithm_for(cfg.algorithm, cfg.algorithm_params, spec, torch.device("cpu"))
    loading = time.perf_counter() - t0
    result = run_simulation(algorithm_obj, clients, spec, cfg.simulation_config())
    rounds = [float(r["round_time_s"]) for r in result.history]
    return Timing("in-process", algorithm, loading + result.wall_time_s - sum(rounds), rounds)


def time_flower(
    algorithms: list[str], nodes: int, data_dir: Path, rounds: int, extra: dict[str, Any], warm: bool, work_dir: Path
) -> list[Timing]:
    """One loopback federation, one ``flwr run`` per algorithm."""
    from .launch import LoopbackFederation

    mode = "warm" if warm else "cold"
    timings = []
    t0 = time.perf_counter()
    federation = LoopbackFederation(
        nodes, data_dir, work_dir=work_dir / mode, env={"OMP_NUM_THREADS": "1"}, warm_clientapps=warm,
        max_poll_wait_s=0.2 if warm else None, node_configs=[{"num-threads": 1} for _ in range(nodes)],
    )  # fmt: skip
    with federation:
        federation_startup = time.perf_counter() - t0
        for algorithm in algorithms:
            result = federation.run(_run_config(algorithm, rounds, work_dir / mode / f"out-{algorithm}", extra), timeout=3600)
            if result.status != "completed":
                raise RuntimeError(f"Flower run of {algorithm} ({mode}) ended {result.status}:\n{result.output[-3000:]}")
            history = result.summary["history"]
            round_s = [float(r["round_time_s"]) for r in history]
            clients = [m for r in history for m in r.get("client_metrics", []) if isinstance(m, dict)]
            timings.append(
                Timing(
                    f"Flower ({mode})", algorithm, result.wall_s - sum(round_s), round_s, federation_startup,
                    extras={"client_metrics": clients[:1]},
                )
            )  # fmt: skip
    return timings


def _table(timings: list[Timing]) -> str:
    reference = {t.algorithm: t for t in timings if t.runner == "in-process"}
    lines = [
        "| algorithm | runner | federation start-up (s) | run start-up (s) | round 1 (s) | round 2+ (s) | mean round (s) | × in-process |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in timings:
        later = " / ".join(f"{r:.1f}" for r in t.round_s[1:]) or "-"
        base = reference.get(t.algorithm)
        ratio = f"{t.mean_round_s / base.mean_round_s:.2f}" if base is not None and t is not base else "1"
        fed = "-" if t.federation_startup_s is None else f"{t.federation_startup_s:.1f}"
        lines.append(
            f"| {t.algorithm} | {t.runner} | {fed} | {t.startup_s:.1f} | {t.round_s[0]:.1f} | {later} | "
            f"{t.mean_round_s:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmic_pipeline.flower.round_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedmic"])
    parser.add_argument("--modes", nargs="+", choices=["warm", "cold"], default=["warm"])
    parser.add_argument("--data-dir", default=task.RUN_CONFIG_DEFAULTS["data-dir"])
    parser.add_argument("--run-config", default="{}", help="JSON object of extra run-config values for both runners")
    parser.add_argument("--output", default=None, help="write the table (markdown) to this file")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    task.configure_logging()
    for key, value in {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "FLWR_TELEMETRY_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    data_dir = task.resolve_path(args.data_dir)
    extra = json.loads(args.run_config)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedmic-round-timing-")).resolve()
    load_before = os.getloadavg()
    timings: list[Timing] = []
    for algorithm in args.algorithms:
        timings.append(time_in_process(algorithm, args.nodes, data_dir, _run_config(algorithm, args.rounds, work_dir / "ip", extra)))
    for mode in args.modes:
        timings += time_flower(args.algorithms, args.nodes, data_dir, args.rounds, extra, mode == "warm", work_dir)
    order = {name: i for i, name in enumerate(args.algorithms)}
    timings.sort(key=lambda t: (order[t.algorithm], t.runner != "in-process", t.runner))
    table = _table(timings)
    command = "python -m fedmic_pipeline.flower.round_timing " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"`{command}` -- {args.nodes} hospitals (partitions 0-{args.nodes - 1} of `{args.data_dir}`), {args.rounds} "
        f"rounds, seed and parameters from the run config defaults (`conf/base`), one torch thread per process, "
        f"CPU; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (2 shared cores)."
    )
    print(table)
    print(note)
    if args.output:
        Path(args.output).write_text(
            "# Flower rounds on loopback vs the in-process runner\n\n"
            f"{note}\n\nFederation start-up: SuperLink, key registration, SuperNodes (and warm SuperExecs) until the "
            "SuperLink listens and keys are registered; run start-up: `flwr run` wall time minus the rounds (ServerApp "
            "process, waiting for the nodes, partition query, teardown of the run). A round is the engine's "
            "`round_time_s` in both runners (train exchange, aggregation, evaluation on every node).\n\n"
            f"{table}\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
