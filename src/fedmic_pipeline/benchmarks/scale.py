"""Client-samples per second at 10, 100 and 1000 clients: one by one against clients together.

    python -m fedmic_pipeline.benchmarks.scale [--clients 10 100 1000] [--samples-per-client 64]
        [--device auto] [--amp off on] [--rounds 2] [--threads 1]
        # writes data/08_reporting/scale.{md,json}

The speed issue's GPU figure: FedAvg (the recipe's StudentCNN, SGD with momentum, batch 32,
one local epoch) on a synthetic federation of N clients, every client taking part in every
round (join ratio 1), with ``vectorize_clients`` 'never' (the sequential loop) and 'always'
(``core/vectorized.py``), and AMP off and on (AMP applies on CUDA only; on a CPU the 'on'
rows are skipped). The images are random 1x28x28 tensors resident on the device and the
labels random over 2 classes: the figure is the cost of training, which does not depend on
what the pixels show. Reported per setting: client-samples/s over the timed rounds (the
engine's ``train_time_s``, after one warm-up round) and the ratio of clients-together to
one-by-one at the same N and AMP setting, measured in the same process one after the other.
The sizes of the clients vary (``--samples-per-client`` +-50 %, seeded), so the stacked path
pays for its masking and restacking as it would on a real partition.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import resolve_device
from fedmic_pipeline.core.protocol import ClientData, DataSpec

from .cli import configure_logging, publish, run_arguments
from .settings import BenchmarkSettings
from .variants import round_timings, simulate

__all__ = ["main", "measure", "synthetic_clients"]

RECIPE = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 32, "local_epochs": 1, "loss": "ce"}


def synthetic_clients(count: int, samples_per_client: int, device: torch.device, seed: int = 0) -> list[ClientData]:
    """``count`` clients of random images, sizes uniform in [0.5, 1.5] x ``samples_per_client``."""
    generator = torch.Generator().manual_seed(seed)
    low, high = max(2, samples_per_client // 2), max(3, samples_per_client * 3 // 2)
    sizes = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    clients = []
    for cid, n in enumerate(sizes):
        x = torch.rand(n, 1, 28, 28, generator=generator).to(device)
        y = torch.randint(0, 2, (n,), generator=generator).to(device)
        clients.append(ClientData(cid, x, y, x[:2], y[:2], x[:2], y[:2]))
    return clients


def measure(clients: list[ClientData], mode: str, amp: str, device: torch.device, rounds: int) -> dict[str, Any]:
    """One federation of ``rounds`` + 1 rounds; the figures of all but the first."""
    spec = DataSpec(in_channels=1, num_classes=2)
    settings = BenchmarkSettings(join_ratio=1.0, seed=0, amp=amp)
    started = time.perf_counter()
    history = simulate(build_algorithm("fedavg", RECIPE, spec), clients, spec, settings, device, rounds + 1, mode)[1:]
    timings = round_timings(history)
    seconds = sum(t for _, t in timings)
    return {
        "clients": len(clients),
        "mode": mode,
        "amp": amp,
        "client_samples_per_s": sum(n for n, _ in timings) / seconds,
        "round_time_s": seconds / len(timings),
        "wall_s": time.perf_counter() - started,
    }


def to_markdown(rows: list[dict[str, Any]], device: torch.device, samples_per_client: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        "# FedAvg client-samples/s: one by one against clients together",
        "",
        f"Device {name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); synthetic clients of about "
        f"{samples_per_client} images (+-50 %), batch 32, every client in every round.",
        "",
        "| clients | AMP | one by one (samples/s) | together (samples/s) | together / one by one | round, together (s) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    by_key = {(r["clients"], r["amp"], r["mode"]): r for r in rows}
    for clients, amp in dict.fromkeys((r["clients"], r["amp"]) for r in rows):
        seq, vec = by_key[(clients, amp, "never")], by_key[(clients, amp, "always")]
        lines.append(
            f"| {clients} | {amp} | {seq['client_samples_per_s']:,.0f} | {vec['client_samples_per_s']:,.0f} | "
            f"{vec['client_samples_per_s'] / seq['client_samples_per_s']:.2f} | {vec['round_time_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = run_arguments(__doc__)
    parser.set_defaults(rounds=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--samples-per-client", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = parser.parse_args(argv)
    configure_logging()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amps = [a for a in args.amp if a == "off" or device.type == "cuda"]
    rows = []
    for count in args.clients:
        clients = synthetic_clients(count, args.samples_per_client, device)
        for amp in amps:
            for mode in ("never", "always"):
                rows.append(measure(clients, mode, amp, device, args.rounds))
                print(
                    f"{count} clients, amp {amp}, {mode}: {rows[-1]['client_samples_per_s']:,.0f} client-samples/s",
                    flush=True,
                )
    publish(to_markdown(rows, device, args.samples_per_client), rows, args.root / "data/08_reporting", "scale")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
