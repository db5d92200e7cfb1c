"""Where a FedMIC round's time goes: dual distillation (teacher vs student), SVD, the rest.

    python -m fedmic_pipeline.benchmarks.fedmic_round [--rounds 3] [--join-ratio 0.5] [--threads 1]
        [--param fedmic.teacher_width=1.0]   # writes data/08_reporting/fedmic_round.{md,json}

Runs FedMIC through the round engine on the saved partition with the project's recipe and
times, inside the same rounds, the calls a round is made of: ``train_dual`` (the local
epochs of dual distillation), ``encode_update`` (the truncated SVDs of the uplink on every
client and of the downlink on the server), ``decode_update``, and BatchNorm
recalibration; the remainder of ``train_time_s`` is payload copies, error feedback and
aggregation. The timers wrap the module-level functions FedMIC calls (instrumentation
only: what runs is unchanged). ``train_dual`` is split into teacher and student by a side
measurement on the same batches: a forward and backward pass of each model alone, whose
ratio apportions the distillation time (the projections and losses go with the student,
whose step they belong to).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedmic_pipeline.configuration import PARAMS_FILE
from fedmic_pipeline.core.algorithms import base as algorithm_base
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.algorithms import fedmic as fedmic_module
from fedmic_pipeline.core.data import resolve_device

from .cli import configure_logging, publish, run_arguments
from .settings import parse_overrides, resolve_settings
from .variants import load_partition, simulate

__all__ = ["main", "profile_rounds"]

_TIMED = (
    (fedmic_module, "train_dual"),
    (fedmic_module, "encode_update"),
    (fedmic_module, "decode_update"),
    (algorithm_base, "recalibrate_batchnorm"),
)


@contextlib.contextmanager
def _timers(totals: dict[str, float]) -> Iterator[None]:
    """Wrap each of ``_TIMED`` so its seconds add up in ``totals`` (restored on exit)."""
    originals = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return timed

    for module, name in _TIMED:
        originals[(module, name)] = getattr(module, name)
        setattr(module, name, wrap(name, originals[(module, name)]))
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def _pass_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """Seconds of one training forward + backward of ``model`` on (x, y), median of repeats."""
    model.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def profile_rounds(
    root: Path, rounds: int, join_ratio: float, overrides: dict[str, dict[str, Any]], device: str = "cpu"
) -> dict[str, Any]:
    """The time components of ``rounds`` FedMIC rounds, in seconds per round and shares."""
    dev = resolve_device(device)
    clients, spec, _ = load_partition(root / "data/05_model_input", dev)
    settings = resolve_settings(root / PARAMS_FILE, overrides)
    settings.join_ratio = join_ratio
    params = settings.algorithm_params.get("fedmic", {})
    algorithm = build_algorithm("fedmic", params, spec)
    totals: dict[str, float] = {}
    with _timers(totals):
        history = simulate(algorithm, clients, spec, settings, dev, rounds)
    train_time = sum(r["train_time_s"] for r in history)
    samples = sum(sum(m["num_samples"] for m in r["client_metrics"]) for r in history)

    cfg = algorithm.cfg  # type: ignore[attr-defined]
    sample = clients[0]
    x, y = sample.train_x[: cfg.batch_size], sample.train_y[: cfg.batch_size]
    teacher = algorithm.new_model(0, name=cfg.teacher_model, **cfg.teacher_kwargs())  # type: ignore[attr-defined]
    student = algorithm.new_model(0)  # type: ignore[attr-defined]
    teacher_pass, student_pass = _pass_seconds(teacher, x, y), _pass_seconds(student, x, y)
    teacher_share = teacher_pass / (teacher_pass + student_pass)

    dual = totals.get("train_dual", 0.0)
    components = {
        "teacher (forward, backward, step)": dual * teacher_share,
        "student + projections + distillation losses": dual * (1 - teacher_share),
        "SVD encode (uplink on clients, downlink on the server)": totals.get("encode_update", 0.0),
        "decode (server and clients)": totals.get("decode_update", 0.0),
        "BatchNorm recalibration": totals.get("recalibrate_batchnorm", 0.0),
    }
    components["other (copies, error feedback, aggregation)"] = max(0.0, train_time - sum(components.values()))
    return {
        "rounds": rounds,
        "clients_per_round": len(history[0]["client_metrics"]),
        "samples_per_s": samples / train_time,
        "round_time_s": train_time / rounds,
        "teacher": {"model": cfg.teacher_model, **cfg.teacher_kwargs(), "pass_ms": teacher_pass * 1e3},
        "student_pass_ms": student_pass * 1e3,
        "components": {k: {"seconds_per_round": v / rounds, "share": v / train_time} for k, v in components.items()},
        "settings_source": settings.source,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
    }


def _teacher_name(teacher: dict[str, Any]) -> str:
    options = ", ".join(f"{k} {v}" for k, v in teacher.items() if k not in ("model", "pass_ms"))
    return f"{teacher['model']} ({options})" if options else teacher["model"]


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Where a FedMIC round's time goes",
        "",
        f"{report['rounds']} rounds, {report['clients_per_round']} clients per round, {report['device']}, "
        f"{report['torch_threads']} torch thread(s): {report['samples_per_s']:.1f} samples/s, "
        f"{report['round_time_s']:.2f} s per round. One training pass of a batch: teacher "
        f"{_teacher_name(report['teacher'])} {report['teacher']['pass_ms']:.1f} ms, student {report['student_pass_ms']:.1f} ms.",
        "",
        "| Component | s per round | share |",
        "|---|---:|---:|",
    ]
    for name, c in report["components"].items():
        lines.append(f"| {name} | {c['seconds_per_round']:.3f} | {100 * c['share']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = run_arguments(__doc__)
    parser.set_defaults(rounds=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--param", action="append", default=[], help="SCOPE.KEY=VALUE, e.g. fedmic.teacher_width=1.0")
    args = parser.parse_args(argv)
    configure_logging()
    torch.set_num_threads(args.threads)
    report = profile_rounds(args.root, args.rounds, args.join_ratio, parse_overrides(args.param), args.device)
    publish(to_markdown(report), report, args.root / "data/08_reporting", "fedmic_round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
