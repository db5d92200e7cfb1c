"""Client-training throughput of the federated algorithms vs. a naive DataLoader loop.

    python -m fedmic_pipeline.benchmarks.throughput [--algorithms fedavg fedmic] [--rounds 2]
        [--repeats 3] [--threads 2] [--partition-dir data/05_model_input]
        [--output data/08_reporting/benchmark.json] [--param fedmic.teacher_width=0.25]

For every algorithm three *variants* run the same federated rounds through the round
engine (``core.simulation.run_simulation``) on the same partition (same sampled clients,
same models, same optimizer and hyper-parameters, same local epochs), and only the
client's local-training data path and batch size differ:

``naive``
    What common FL research code does: one ``torch.utils.data.DataLoader`` per client
    over a map-style ``Dataset`` whose ``__getitem__`` turns one uint8 image into a float
    tensor (``/255``, CHW, like torchvision's ``ToTensor``); batch size 10, shuffled,
    ``num_workers=0`` (worker processes would compete for the two shared cores), default
    collation, a plain (contiguous) model, the torch-default optimizer implementation,
    ``loss.item()`` and an accuracy ``.item()`` per batch, the batch moved to the device
    per step, no autocast. The algorithm is the project's own: ``naive.NaiveFedAvg`` and
    ``naive.NaiveFedMIC`` subclass FedAvg and FedMIC and replace only the local-training
    step, so the payload, the upload (delta, error feedback, codec), the aggregation, the
    byte counts and the client sampling are the project's code by construction, and the
    comparison isolates the client's training loop. (On CUDA the resident path also
    trains under autocast when ``amp: auto``; on a CPU AMP is never used.)
``resident_bs10``
    The project's path (``client_update`` -> ``train_local``/``train_dual``: the
    client's split resident as one float32 tensor, batches sliced by a seeded
    permutation, channels-last weights, ``foreach`` optimizers, metrics read once per
    client) at the naive batch size 10: the ratio to ``naive`` is the data-path (and
    loop-engineering) gain alone.
``resident``
    The project's path at the configured batch size (default 32): the ratio to
    ``resident_bs10`` is the batch-size gain; the ratio to ``naive`` is the whole gain.
``vectorized`` (methods whose local update stacks: FedAvg, FedProx)
    ``resident`` with the round's clients trained together as one grouped network
    (``core/vectorized.py``, ``vectorize_clients: always``); ``resident`` and the others
    run ``never``, so the ratio to ``resident`` is the gain of stacking alone.

Measured, from the engine's history: per round, the samples that went through local
training (``client_metrics[*].num_samples``: epochs x train sizes of the sampled clients)
and ``train_time_s``, the seconds from the first client's update to the end of
aggregation (evaluation is off); throughput is samples / seconds. Model building, client
set-up and DataLoader creation are outside the timed span for every variant. Protocol:
``torch.set_num_threads(--threads)``, one warm-up round per variant on the two smallest
clients, then ``--repeats`` repetitions, each a fresh federation of ``--rounds`` rounds
per variant with the variants in alternating order (forward on even, backward on odd
repetitions) inside one process so that a load change on the shared machine hits all of
them alike; the medians over the repetitions are reported (and the medians of the
within-repetition ratios, ``*_paired``), with the raw values, the 1-minute load average
and the CPU cores that *other* processes used during each run (``load.py``). A
repetition during which other processes used more than ``--max-foreign-cores`` (default
0.5) is discarded and run again (at most 2 x repeats times; the discarded ones stay in
the JSON): two torch threads on two cores shared with one busy process slow down
many-fold, which says nothing about the code.

Settings (``settings.py``): the project's recipe from
``conf/base/parameters_federated_training.yml`` when that file exists (``--params-file``;
``none`` ignores it), else the core's defaults; the JSON records which. The variants are
built in ``variants.py``, the report rendered in ``report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedmic_pipeline.configuration import PARAMS_FILE
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.algorithms.fedavg import FedAvg
from fedmic_pipeline.core.data import resolve_device
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError
from fedmic_pipeline.core.vectorized import can_stack

from .load import ForeignLoad, load1, wait_for_load
from .naive import SUPPORTED_ALGORITHMS, NaiveImageDataset
from .report import print_table, write_report
from .settings import BenchmarkSettings, parse_overrides, resolve_settings
from .variants import (
    DATA_PATHS,
    NAIVE,
    NAIVE_BATCH_SIZE,
    RESIDENT,
    RESIDENT_BS10,
    VECTORIZED,
    build_variant,
    load_partition,
    round_timings,
    simulate,
)

__all__ = [
    "NAIVE",
    "RESIDENT",
    "RESIDENT_BS10",
    "SUPPORTED_ALGORITHMS",
    "BenchmarkSettings",
    "NaiveImageDataset",
    "load_partition",
    "main",
    "resolve_settings",
    "run_benchmark",
]

SCHEMA = "fedmic-throughput/1"
DEFAULT_PARTITION_DIR = Path("data/05_model_input")
DEFAULT_OUTPUT = Path("data/08_reporting/benchmark.json")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(_median(known), 2) if known else None


def run_benchmark(
    algorithms: Sequence[str],
    partition_dir: Path,
    settings: BenchmarkSettings,
    rounds: int = 2,
    repeats: int = 3,
    threads: int = 2,
    device: str = "auto",
    naive_batch_size: int = NAIVE_BATCH_SIZE,
    warmup: bool = True,
    log: Any = None,
    max_foreign_cores: float | None = 0.5,
    max_discarded: int | None = None,
) -> dict[str, Any]:
    """Measure every variant of every algorithm; return the report as a JSON-able dict.

    A repetition during which other processes used more than ``max_foreign_cores`` CPU
    cores (on a shared machine, two torch threads then wait on a descheduled thread and
    slow down many-fold) is discarded and run again, at most ``max_discarded`` times per
    algorithm (default: ``2 * repeats``); after that contended repetitions are kept and
    flagged. ``None`` keeps every repetition.
    """
    max_discarded = 2 * repeats if max_discarded is None else max_discarded
    if rounds < 1 or repeats < 1 or threads < 1 or naive_batch_size < 2:
        raise ConfigurationError("rounds, repeats and threads must be >= 1 and the naive batch size >= 2.")
    unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
    if unknown:
        raise ConfigurationError(f"Unsupported algorithm(s) {unknown}; the benchmark covers {', '.join(SUPPORTED_ALGORITHMS)}.")
    say = log or (lambda *_: None)
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    load_start = load1()
    clients, spec, raw = load_partition(partition_dir, dev)
    sampled_per_round = max(1, math.floor(settings.join_ratio * len(clients) + 1e-9))
    smallest = sorted(clients, key=lambda c: c.num_train)[:2]
    warm_settings = dataclasses.replace(settings, join_ratio=1.0)

    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {}
    discarded_total: dict[str, list[dict[str, Any]]] = {}
    resolved: dict[str, dict[str, Any]] = {}
    for name in algorithms:
        params = settings.algorithm_params.get(name, {})
        algo = build_algorithm(name, params, spec)
        resolved[name] = algo.describe()  # type: ignore[attr-defined]
        default_bs = int(algo.config.batch_size)  # type: ignore[attr-defined]
        variants: list[tuple[str, int]] = [(NAIVE, naive_batch_size), (RESIDENT_BS10, naive_batch_size), (RESIDENT, default_bs)]
        if isinstance(algo, FedAvg) and algo.stacked_proximal_mu() is not None and can_stack(algo.scratch_model()):
            variants.append((VECTORIZED, default_bs))  # FedAvg, FedProx: the methods whose clients stack

        def run(variant: str, bs: int, use_clients: Sequence[ClientData], s: BenchmarkSettings, r: int) -> list[tuple[int, float]]:
            algorithm = build_variant(variant, name, params, spec, use_clients, raw, bs, s.seed)
            mode = "always" if variant == VECTORIZED else "never"
            return round_timings(simulate(algorithm, use_clients, spec, s, dev, r, vectorize_clients=mode))

        if warmup:
            for variant, bs in variants:
                say(f"{name}: warm-up {variant} (batch {bs}) on clients {[c.client_id for c in smallest]}")
                run(variant, bs, smallest, warm_settings, 1)
                gc.collect()
        per_run: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in variants}
        discarded: list[dict[str, Any]] = []
        attempt = 0
        while len(per_run[NAIVE]) < repeats:
            order = variants if attempt % 2 == 0 else variants[::-1]
            attempt += 1
            repetition: dict[str, dict[str, Any]] = {}
            for variant, bs in order:
                load = load1()
                with ForeignLoad() as foreign:
                    timings = run(variant, bs, clients, settings, rounds)
                samples = sum(s for s, _ in timings)
                seconds = sum(t for _, t in timings)
                repetition[variant] = {
                    "samples": samples,
                    "seconds": seconds,
                    "samples_per_s": samples / seconds,
                    "round_time_s": seconds / len(timings),
                    "load_avg_1m": load,
                    "foreign_cpu_cores": foreign.cores,
                }
                say(
                    f"{name}: attempt {attempt} (kept {len(per_run[NAIVE])}/{repeats}) {variant:<14} batch {bs:>3}: "
                    f"{samples / seconds:9.1f} samples/s, {seconds / len(timings):7.3f} s/round "
                    f"(load {load}, other processes {foreign.cores} cores)"
                )
                gc.collect()
            contended = max_foreign_cores is not None and any(
                (r["foreign_cpu_cores"] or 0.0) > max_foreign_cores for r in repetition.values()
            )
            if contended and len(discarded) < max_discarded:
                say(f"{name}: attempt {attempt} discarded: other processes used > {max_foreign_cores} cores")
                discarded.append({"attempt": attempt, **repetition})
                continue
            for variant, record in repetition.items():
                per_run[variant].append({"attempt": attempt, "contended": contended, **record})
        discarded_total[name] = discarded
        medians = {v: _median([r["samples_per_s"] for r in per_run[v]]) for v, _ in variants}

        def paired(a: str, b: str) -> float:
            """Median over repetitions of the ratio within each repetition (robust to drift)."""
            return _median([ra["samples_per_s"] / rb["samples_per_s"] for ra, rb in zip(per_run[a], per_run[b], strict=True)])

        for variant, bs in variants:
            runs = per_run[variant]
            rows.append(
                {
                    "algorithm": name,
                    "variant": variant,
                    "data_path": DATA_PATHS[variant],
                    "batch_size": bs,
                    "samples_per_round": _median([r["samples"] / rounds for r in runs]),
                    "samples_per_s": medians[variant],
                    "round_time_s": _median([r["round_time_s"] for r in runs]),
                    "speedup_vs_naive": medians[variant] / medians[NAIVE],
                    "speedup_vs_naive_paired": paired(variant, NAIVE),
                    "foreign_cpu_cores_median": _median_or_none([r["foreign_cpu_cores"] for r in runs]),
                    "runs": runs,
                }
            )
        ratios[name] = {
            "resident_vs_naive": medians[RESIDENT] / medians[NAIVE],
            "data_path_gain_at_bs10": medians[RESIDENT_BS10] / medians[NAIVE],
            "batch_size_gain": medians[RESIDENT] / medians[RESIDENT_BS10],
            "resident_vs_naive_paired": paired(RESIDENT, NAIVE),
            "data_path_gain_at_bs10_paired": paired(RESIDENT_BS10, NAIVE),
            "batch_size_gain_paired": paired(RESIDENT, RESIDENT_BS10),
        }
        if VECTORIZED in medians:
            ratios[name]["vectorized_vs_resident"] = medians[VECTORIZED] / medians[RESIDENT]
            ratios[name]["vectorized_vs_resident_paired"] = paired(VECTORIZED, RESIDENT)
    return {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": load1(),
            "foreign_cpu_cores_median": _median_or_none(
                [run["foreign_cpu_cores"] for row in rows for run in row["runs"]]
            ),
        },
        "setting": {
            "partition_dir": str(partition_dir),
            "num_clients": len(clients),
            "train_samples_total": sum(c.num_train for c in clients),
            "join_ratio": settings.join_ratio,
            "clients_per_round": sampled_per_round,
            "seed": settings.seed,
            "amp": settings.amp,
            "rounds": rounds,
            "repeats": repeats,
            "warmup": warmup,
            "naive_batch_size": naive_batch_size,
            "max_foreign_cpu_cores": max_foreign_cores,
            "defaults_source": settings.source,
            "ignored_keys": settings.ignored_keys,
            "data_spec": dataclasses.asdict(spec),
            "algorithms": resolved,
        },
        "results": rows,
        "ratios": ratios,
        "discarded_repetitions": discarded_total,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedmic_pipeline.benchmarks.throughput",
        description="Client-training throughput (samples/s) and time per round, resident-tensor path vs naive DataLoader.",
    )
    p.add_argument("--algorithms", nargs="+", default=list(SUPPORTED_ALGORITHMS), choices=SUPPORTED_ALGORITHMS)
    p.add_argument("--rounds", type=int, default=2, help="timed federated rounds per repetition (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per variant, alternating order (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--partition-dir", type=Path, default=DEFAULT_PARTITION_DIR)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON path; the markdown goes beside it (.md)")
    p.add_argument(
        "--params-file", default=str(PARAMS_FILE),
        help="federated-training parameters (YAML); 'none' = the core defaults",
    )  # fmt: skip
    p.add_argument(
        "--param", action="append", default=[], metavar="SCOPE.KEY=VALUE",
        help="override, e.g. fedmic.teacher_width=0.25 or simulation.join_ratio=0.5 (repeatable)",
    )  # fmt: skip
    p.add_argument("--naive-batch-size", type=int, default=NAIVE_BATCH_SIZE)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up round per variant")
    p.add_argument("--quiet", action="store_true", help="no per-repetition progress lines")
    p.add_argument(
        "--wait-load", type=float, default=None, metavar="LOAD",
        help="before starting, wait until the 1-minute load average is at most LOAD",
    )  # fmt: skip
    p.add_argument("--wait-timeout", type=float, default=1800.0, help="seconds --wait-load waits at most (default 1800)")
    p.add_argument(
        "--max-foreign-cores", type=float, default=0.5, metavar="CORES",
        help="rerun a repetition during which other processes used more CPU cores than this "
        "(default 0.5; a negative value keeps every repetition)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params_file = None if str(args.params_file).lower() == "none" else Path(args.params_file)
    try:
        settings = resolve_settings(params_file, parse_overrides(args.param))
        log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.wait_load is not None:
            wait_for_load(args.wait_load, args.wait_timeout, log)
        if log is not None:
            log(f"defaults: {settings.source}; load average (1 min) {load1()}")
        report = run_benchmark(
            args.algorithms, args.partition_dir, settings, rounds=args.rounds, repeats=args.repeats,
            threads=args.threads, device=args.device, naive_batch_size=args.naive_batch_size,
            warmup=args.warmup, log=log,
            max_foreign_cores=None if args.max_foreign_cores < 0 else args.max_foreign_cores,
        )  # fmt: skip
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md = write_report(report, args.output)
    print_table(report)
    print(f"wrote {args.output} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
