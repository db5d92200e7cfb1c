"""Does ``torch.compile`` pay for the local training step? Eager against compiled, side by side.

    python -m fedmic_pipeline.benchmarks.compiled_step [--batch-sizes 10 32] [--threads 1]
        # writes data/08_reporting/compiled_step.{md,json}

One optimizer step of the shared StudentCNN (channels-last, SGD with momentum, foreach),
as ``train_local`` takes it, on random 1x28x28 images: the eager step against the same step
with the model under ``torch.compile`` (inductor; on a CPU it generates C++ through the
system compiler). Reported per batch size: steady-state samples/s of each, the ratio, the
seconds the first compiled pass took (compilation, and a recompilation for the trailing
batch's shape), and the number of samples a run must train before the compiled step has
paid its compilation back. The project's rounds are short (``make run`` trains about 55k
samples per method), which is what that last figure is compared with.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import DataSpec

from .cli import configure_logging, publish, run_arguments

__all__ = ["main", "measure"]

_SAMPLES = 400


def _steps(model: torch.nn.Module, forward: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Seconds of one pass over (x, y) in batches of ``batch_size``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    start = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x[i : i + batch_size]), y[i : i + batch_size]).backward()
        optimizer.step()
    return time.perf_counter() - start


def measure(batch_size: int, repeats: int = 3) -> dict[str, Any]:
    """Eager and compiled figures for one batch size (fresh models, same data)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_SAMPLES, 1, 28, 28, generator=generator)
    y = torch.randint(0, 2, (_SAMPLES,), generator=generator)
    spec = DataSpec(in_channels=1, num_classes=2)
    eager = build_model("student_cnn", spec, seed=1, channels_last=True)
    compiled_model = build_model("student_cnn", spec, seed=1, channels_last=True)
    compiled = torch.compile(compiled_model)
    _steps(eager, eager, x, y, batch_size)
    first_compiled = _steps(compiled_model, compiled, x, y, batch_size)
    eager_s, compiled_s = [], []
    for _ in range(repeats):  # alternating, so a load change hits both
        eager_s.append(_steps(eager, eager, x, y, batch_size))
        compiled_s.append(_steps(compiled_model, compiled, x, y, batch_size))
    eager_rate = _SAMPLES / sorted(eager_s)[repeats // 2]
    compiled_rate = _SAMPLES / sorted(compiled_s)[repeats // 2]
    overhead = first_compiled - _SAMPLES / compiled_rate
    saved_per_sample = 1 / eager_rate - 1 / compiled_rate
    return {
        "batch_size": batch_size,
        "eager_samples_per_s": eager_rate,
        "compiled_samples_per_s": compiled_rate,
        "compiled_vs_eager": compiled_rate / eager_rate,
        "first_compiled_pass_s": first_compiled,
        "break_even_samples": overhead / saved_per_sample if saved_per_sample > 0 else None,
    }


def to_markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        "# torch.compile of the local training step (StudentCNN, channels-last, SGD)",
        "",
        f"torch {torch.__version__}, {threads} thread(s), cpu; medians of alternating repeats.",
        "",
        "| Batch | eager samples/s | compiled samples/s | compiled / eager | first compiled pass (s) | break-even (samples) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        even = "never" if r["break_even_samples"] is None else f"{r['break_even_samples']:,.0f}"
        lines.append(
            f"| {r['batch_size']} | {r['eager_samples_per_s']:.0f} | {r['compiled_samples_per_s']:.0f} | "
            f"{r['compiled_vs_eager']:.2f} | {r['first_compiled_pass_s']:.1f} | {even} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = run_arguments(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    args = parser.parse_args(argv)
    configure_logging()
    torch.set_num_threads(args.threads)
    rows = [measure(bs) for bs in args.batch_sizes]
    publish(to_markdown(rows, args.threads), rows, args.root / "data/08_reporting", "compiled_step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
