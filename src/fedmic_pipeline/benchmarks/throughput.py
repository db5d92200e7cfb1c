"""Client-training throughput of the federated algorithms vs. a naive DataLoader loop.

    python -m fedmic_pipeline.benchmarks.throughput [--algorithms fedavg fedmic] [--rounds 2]
        [--repeats 3] [--threads 2] [--partition-dir data/05_model_input]
        [--output data/08_reporting/benchmark.json] [--param fedmic.teacher_width=0.25]

For every algorithm three *variants* run the same federated rounds on the same partition
(same sampled clients, same models, same optimizer and hyper-parameters, same local
epochs), and only the client's local-training data path and batch size differ:

``naive``
    What common FL research code does: one ``torch.utils.data.DataLoader`` per client
    over a map-style ``Dataset`` whose ``__getitem__`` turns one uint8 image into a float
    tensor (``/255``, CHW, like torchvision's ``ToTensor``); batch size 10, shuffled,
    ``num_workers=0`` (worker processes would compete for the two shared cores), default
    collation, a plain (contiguous) model, the torch-default optimizer implementation,
    ``loss.item()`` and an accuracy ``.item()`` per batch, the batch moved to the device
    per step, no autocast. Everything around local training (the server payload, the
    FedMIC upload codec and the aggregation) is the project's own code, so the
    comparison isolates the client's training loop. (On CUDA the resident path also
    trains under autocast when ``amp: auto``; this machine has no GPU, so the figures
    here are CPU figures, where AMP is never used.)
``resident_bs10``
    The project's path (``core.simulation.run_simulation`` -> ``client_update`` ->
    ``train_local``/``train_dual``: the client's split resident as one float32 tensor,
    batches sliced by a seeded permutation, channels-last weights, ``foreach``
    optimizers, metrics read once per client) at the naive batch size 10: the ratio to
    ``naive`` is the data-path (and loop-engineering) gain alone.
``resident``
    The project's path at the configured batch size (default 32): the ratio to
    ``resident_bs10`` is the batch-size gain; the ratio to ``naive`` is the whole gain.

Measured: per round, the samples that went through local training (epochs x train
sizes of the sampled clients) and the seconds from the first client's update to the end
of aggregation (no evaluation), i.e. ``run_simulation``'s ``train_time_s``; throughput is
samples / seconds. Model building, client set-up and DataLoader creation are outside the
timed span for every variant. Protocol: ``torch.set_num_threads(--threads)``, one
warm-up round per variant on the two smallest clients, then ``--repeats`` repetitions,
each a fresh federation of ``--rounds`` rounds per variant with the variants in
alternating order (forward on even, backward on odd repetitions) inside one process so
that a load change on the shared machine hits all of them alike; the medians over the
repetitions are reported (and the medians of the within-repetition ratios, ``*_paired``),
with the raw values, the 1-minute load average and the CPU cores that *other* processes
used during each run (from /proc/stat). A repetition during which other processes used
more than ``--max-foreign-cores`` (default 0.5) is discarded and run again (at most
2 x repeats times; the discarded ones stay in the JSON): two torch threads on two cores
shared with one busy process slow down many-fold, which says nothing about the code.

Settings: the defaults of the project, read from ``conf/base/parameters_federated_training.yml``
when that file exists (``--params-file``; ``none`` ignores it), else the core's defaults
(``SimulationConfig`` / the algorithms' config dataclasses); the JSON records which.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmic_pipeline.core.algorithms import ALGORITHMS, build_algorithm
from fedmic_pipeline.core.codec import ErrorFeedback, decode_update, encode_update
from fedmic_pipeline.core.data import derive_seed, make_generator, resolve_device, to_client_data
from fedmic_pipeline.core.distillation import Projections, dual_distillation_step
from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, Payload, RoundContext
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation, sample_clients
from fedmic_pipeline.core.training import model_delta, state_to_payload
from fedmic_pipeline.datasets.npz_dataset import load_npz

__all__ = [
    "NAIVE",
    "RESIDENT",
    "RESIDENT_BS10",
    "SUPPORTED_ALGORITHMS",
    "BenchmarkSettings",
    "NaiveFederation",
    "NaiveImageDataset",
    "load_partition",
    "main",
    "resolve_settings",
    "run_benchmark",
]

SCHEMA = "fedmic-throughput/1"
DEFAULT_PARAMS_FILE = Path("conf/base/parameters_federated_training.yml")
DEFAULT_PARTITION_DIR = Path("data/05_model_input")
DEFAULT_OUTPUT = Path("data/08_reporting/benchmark.json")
NAIVE_BATCH_SIZE = 10
SUPPORTED_ALGORITHMS: tuple[str, ...] = ("fedavg", "fedmic")

NAIVE = "naive"
RESIDENT_BS10 = "resident_bs10"
RESIDENT = "resident"
_DATA_PATHS = {
    NAIVE: "DataLoader(map-style Dataset, uint8->float per __getitem__), num_workers=0",
    RESIDENT_BS10: "resident float32 tensors, seeded index slices (project)",
    RESIDENT: "resident float32 tensors, seeded index slices (project)",
}
_SIM_KEYS = ("join_ratio", "seed", "amp")
_SIM_BLOCKS = ("training", "simulation", "federation", "federated_training")
_ALGO_BLOCKS = ("algorithm_params", "algorithms")


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchmarkSettings:
    """The federation setting measured, and where each value came from."""

    join_ratio: float = 1.0
    seed: int = 0
    amp: str = "auto"
    algorithm_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    source: str = "core defaults"
    ignored_keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _parse_value(text: str) -> Any:
    """A YAML scalar: '0.25' -> 0.25, 'true' -> True, '[8, 16]' -> [8, 16], else the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``['fedmic.teacher_width=0.25', 'simulation.join_ratio=0.5']`` -> nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, dot, name = key.strip().partition(".")
        if not sep or not dot or not scope or not name:
            raise ConfigurationError(
                f"--param expects SCOPE.KEY=VALUE (SCOPE an algorithm or 'simulation'), got {item!r}."
            )
        out.setdefault(scope, {})[name] = _parse_value(value)
    return out


def _read_params_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(simulation settings, {algorithm: params}) from a federated-training parameters file.

    The project's layout (``conf/base/parameters_federated_training.yml``) is
    ``training: {seed, join_ratio, amp, ...}`` and ``algorithm_params: {common: {...},
    <algorithm>: {...}}`` (the algorithm's block overrides ``common``). Also accepted:
    simulation settings at the top level or under ``simulation:``/``federation:``, and
    algorithm blocks under ``algorithms:`` or at the top level.
    """
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path}: expected a mapping at the top level.")
    sim: dict[str, Any] = {k: doc[k] for k in _SIM_KEYS if k in doc and not isinstance(doc[k], dict)}
    for key in _SIM_BLOCKS:
        if isinstance(doc.get(key), dict):
            sim.update({k: v for k, v in doc[key].items() if k in _SIM_KEYS})
    blocks: dict[str, Any] = next((doc[k] for k in _ALGO_BLOCKS if isinstance(doc.get(k), dict)), doc)
    common: dict[str, Any] = {}
    for key in ("common", "defaults", "shared"):
        if isinstance(blocks.get(key), dict):
            common.update(blocks[key])
    algos = {
        name: {**common, **(blocks.get(name) or {})}
        for name in ALGORITHMS
        if isinstance(blocks.get(name), dict) or common
    }
    return sim, algos


def resolve_settings(
    params_file: Path | None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> BenchmarkSettings:
    """The project's default federation setting (file, else core defaults) plus overrides.

    Keys that an algorithm's config class does not know are dropped and listed in
    ``ignored_keys`` (a parameters file may hold run-level keys such as ``num_rounds``).
    """
    core = SimulationConfig()
    sim: dict[str, Any] = {"join_ratio": core.join_ratio, "seed": core.seed, "amp": core.amp}
    algos: dict[str, dict[str, Any]] = {}
    settings = BenchmarkSettings()
    if params_file is not None and params_file.is_file():
        file_sim, algos = _read_params_file(params_file)
        sim.update(file_sim)
        settings.source = str(params_file)
    elif params_file is not None:
        settings.source = f"core defaults ({params_file} does not exist)"
    else:
        settings.source = "core defaults (--params-file none)"
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    sim.update({k: v for k, v in overrides.pop("simulation", {}).items()})
    unknown_sim = sorted(set(sim) - set(_SIM_KEYS))
    if unknown_sim:
        raise ConfigurationError(f"Unknown simulation override(s) {unknown_sim}; valid: {', '.join(_SIM_KEYS)}.")
    for name, values in overrides.items():
        if name not in ALGORITHMS:
            raise ConfigurationError(f"--param scope '{name}' is neither 'simulation' nor an algorithm ({', '.join(sorted(ALGORITHMS))}).")
        algos.setdefault(name, {}).update(values)
    if overrides:
        settings.source += " + --param overrides"
    for name, params in algos.items():
        valid = {f.name for f in dataclasses.fields(ALGORITHMS[name].config_class)}  # type: ignore[attr-defined]
        ignored = sorted(set(params) - valid)
        if ignored:
            settings.ignored_keys[name] = ignored
        settings.algorithm_params[name] = {k: v for k, v in params.items() if k in valid}
    settings.join_ratio = float(sim["join_ratio"])
    settings.seed = int(sim["seed"])
    settings.amp = str(sim["amp"])
    return settings


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _client_id(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        raise ConfigurationError(f"{path.name}: client files must be named client_<number>.npz.") from None


def load_partition(
    partition_dir: Path, device: torch.device | str = "cpu"
) -> tuple[list[ClientData], DataSpec, dict[int, dict[str, np.ndarray]]]:
    """The clients of a partition (``<dir>/clients/client_XX.npz`` or ``<dir>/client_XX.npz``).

    Returns the project's resident ClientData, the DataSpec (channels and image size from
    the images; classes from ``partition_manifest.json`` when present, else the largest
    label + 1) and the raw numpy arrays per client id (the naive path reads those).
    """
    root = Path(partition_dir)
    client_dir = root / "clients" if (root / "clients").is_dir() else root
    files = sorted(client_dir.glob("client_*.npz"))
    if not files:
        raise ConfigurationError(
            f"No client_*.npz under {client_dir}; run the partition first (make run) or pass --partition-dir."
        )
    raw = {_client_id(f): load_npz(f) for f in files}
    clients = [to_client_data(arrays, cid, device) for cid, arrays in sorted(raw.items())]
    num_classes = None
    manifest = root / "partition_manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text(encoding="utf-8")).get("dataset", {})
        num_classes = info.get("n_classes")
    if num_classes is None:
        splits = [getattr(c, f"{s}_y") for c in clients for s in ("train", "val", "test")]
        labels = [int(y.max()) for y in splits if y.numel()]
        num_classes = max(2, max(labels) + 1)
    x = clients[0].train_x
    spec = DataSpec(in_channels=int(x.shape[1]), num_classes=int(num_classes), image_size=int(x.shape[2]))
    return clients, spec, raw


class NaiveImageDataset(Dataset):
    """The common research-code dataset: uint8 arrays, one float tensor made per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = np.asarray(images)
        self.labels = np.asarray(labels).reshape(-1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.tensor(self.images[index], dtype=torch.float32) / 255.0
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------------------
# The naive reference federation
# ---------------------------------------------------------------------------------------


def _naive_optimizer(params: Any, optimizer: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The same optimizer and hyper-parameters as the project, torch's default implementation."""
    key = optimizer.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    betas = (momentum if momentum > 0 else 0.9, 0.999)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[key]
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NaiveFederation:
    """FedAvg or FedMIC rounds whose local training is the naive DataLoader loop.

    The payload, the FedMIC upload codec and the aggregation are the project's
    (``algorithm.init_server``/``aggregate``, ``codec.encode_update``), so the timed
    difference to the resident path is the client's training loop only.
    """

    def __init__(
        self,
        name: str,
        params: Mapping[str, Any],
        raw: Mapping[int, Mapping[str, np.ndarray]],
        spec: DataSpec,
        device: torch.device,
        batch_size: int,
        seed: int,
        num_rounds: int,
    ) -> None:
        if name not in SUPPORTED_ALGORITHMS:
            raise ConfigurationError(f"The naive reference exists for {', '.join(SUPPORTED_ALGORITHMS)}, not '{name}'.")
        self.name = name
        self.device = device
        self.seed = seed
        self.num_rounds = num_rounds
        self.algorithm = build_algorithm(name, dict(params), spec).to(device)
        cfg = self.algorithm.config  # type: ignore[attr-defined]
        self.cfg = cfg
        if name == "fedmic" and cfg.downlink_compression:
            raise ConfigurationError("The naive FedMIC reference does not model downlink_compression; set it false.")
        self.server_state, self.payload = self.algorithm.init_server(seed)
        self.loaders: dict[int, DataLoader] = {}
        self.num_train: dict[int, int] = {}
        self.clients: dict[int, dict[str, Any]] = {}
        for cid, arrays in sorted(raw.items()):
            dataset = NaiveImageDataset(arrays["train_images"], arrays["train_labels"])
            gen = torch.Generator().manual_seed(derive_seed(seed, cid))
            self.loaders[cid] = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=gen)
            self.num_train[cid] = len(dataset)
            self.clients[cid] = self._init_client(spec)

    def _init_client(self, spec: DataSpec) -> dict[str, Any]:
        cfg = self.cfg
        student = build_model(cfg.model, spec, seed=self.seed, **cfg.model_options).to(self.device)
        if self.name == "fedavg":
            return {"model": student}
        teacher = build_model(cfg.teacher_model, spec, seed=derive_seed(self.seed, 1), **cfg.teacher_kwargs()).to(self.device)
        projections = Projections(
            int(student.feature_dim), int(teacher.feature_dim), "bidirectional", generator=make_generator(self.seed, 2)
        ).to(self.device)
        teacher_opt = _naive_optimizer(
            list(teacher.parameters()) + projections.teacher_side_parameters(),
            cfg.optimizer,
            cfg.teacher_lr if cfg.teacher_lr is not None else cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
        )
        return {
            "model": student,
            "teacher": teacher,
            "projections": projections,
            "teacher_optimizer": teacher_opt,
            "error_feedback": ErrorFeedback() if cfg.error_feedback else None,
        }

    def _train_fedavg(self, cid: int) -> tuple[Payload, int]:
        cfg, state = self.cfg, self.clients[cid]
        model: nn.Module = state["model"]
        model.load_state_dict(self.payload)
        model.train()
        optimizer = _naive_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        seen, loss_sum, correct = 0, 0.0, 0
        for _ in range(cfg.local_epochs):
            for x, y in self.loaders[cid]:
                x, y = x.to(self.device), y.to(self.device)
                optimizer.zero_grad()
                output = model(x)
                loss = F.cross_entropy(output, y)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * y.shape[0]
                correct += (output.argmax(dim=1) == y).sum().item()
                seen += int(y.shape[0])
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, seen

    def _train_fedmic(self, cid: int, ctx: RoundContext) -> tuple[Payload, int]:
        cfg, state = self.cfg, self.clients[cid]
        algo = self.algorithm
        student: nn.Module = state["model"]
        student.load_state_dict(self.payload, strict=False)  # the shared (floating) entries
        projections: Projections = state["projections"]
        teacher: nn.Module = state["teacher"]
        student_opt = _naive_optimizer(
            list(student.parameters()) + projections.student_side_parameters(),
            cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
        )  # fmt: skip
        teacher.train()
        student.train()
        projections.train()
        distill = cfg.distill_config()
        seen, loss_sum = 0, 0.0
        for _ in range(cfg.local_epochs):
            for x, y in self.loaders[cid]:
                x, y = x.to(self.device), y.to(self.device)
                metrics = dual_distillation_step(
                    teacher, student, projections, x, y, state["teacher_optimizer"], student_opt, distill
                )
                loss_sum += metrics["loss_student"].item() * y.shape[0]
                seen += int(y.shape[0])
        keys = algo.shared_keys()  # type: ignore[attr-defined]
        delta = model_delta(state_to_payload(student, keys), self.payload, keys)
        ef: ErrorFeedback | None = state["error_feedback"]
        corrected = ef.add(delta) if ef is not None else delta
        if cfg.compress_uplink:
            upload, _ = encode_update(corrected, algo.energy(ctx), fp16_factors=cfg.fp16_factors)  # type: ignore[attr-defined]
            if ef is not None:
                ef.update(corrected, decode_update(upload, {k: v.shape for k, v in corrected.items()}))
        else:
            upload = {k: v.detach().clone() for k, v in corrected.items()}
        return upload, seen

    def round(self, rnd: int, join_ratio: float) -> tuple[int, float]:
        """One timed round: (samples trained, seconds from first client to aggregated)."""
        ctx = RoundContext(round=rnd, num_rounds=self.num_rounds, seed=self.seed, device=self.device)
        sampled = sample_clients(sorted(self.clients), join_ratio, self.seed, rnd)
        ctx.extras.update(sampled=list(sampled), num_clients=len(self.clients))
        _sync(self.device)
        start = time.perf_counter()
        uploads: list[tuple[Payload, int]] = []
        samples = 0
        for cid in sampled:
            if self.name == "fedavg":
                upload, seen = self._train_fedavg(cid)
            else:
                upload, seen = self._train_fedmic(cid, ctx)
            uploads.append((upload, self.num_train[cid]))
            samples += seen
        self.payload, self.server_state = self.algorithm.aggregate(self.server_state, uploads, ctx)
        _sync(self.device)
        return samples, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Running the variants
# ---------------------------------------------------------------------------------------


def _run_naive(
    name: str, params: Mapping[str, Any], raw: Mapping[int, Mapping[str, np.ndarray]], spec: DataSpec,
    settings: BenchmarkSettings, device: torch.device, rounds: int, batch_size: int,
) -> list[tuple[int, float]]:  # fmt: skip
    fed = NaiveFederation(name, params, raw, spec, device, batch_size, settings.seed, rounds)
    return [fed.round(r, settings.join_ratio) for r in range(rounds)]


def _run_resident(
    name: str, params: Mapping[str, Any], clients: Sequence[ClientData], spec: DataSpec,
    settings: BenchmarkSettings, device: torch.device, rounds: int, batch_size: int | None,
) -> list[tuple[int, float]]:  # fmt: skip
    given = dict(params)
    if batch_size is not None:
        given["batch_size"] = batch_size
    algorithm = build_algorithm(name, given, spec)
    config = SimulationConfig(
        num_rounds=rounds, join_ratio=settings.join_ratio, seed=settings.seed, device=str(device),
        amp=settings.amp, eval_every=rounds, evaluate_personalized=False,
    )  # fmt: skip
    result = run_simulation(algorithm, clients, spec, config)
    return [(int(sum(m["num_samples"] for m in r["client_metrics"])), float(r["train_time_s"])) for r in result.history]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(_median(known), 2) if known else None


def _cpu_busy_s() -> float | None:
    """Seconds of CPU time all processes of the machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _ForeignLoad:
    """CPU cores used by *other* processes during a span: machine busy time minus this
    process's own CPU time, over wall time (None where /proc/stat is unreadable)."""

    def __enter__(self) -> "_ForeignLoad":
        self.busy0, self.own0, self.wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, own1, wall1 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        if self.busy0 is not None and busy1 is not None and wall1 > self.wall0:
            self.cores = round(max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / (wall1 - self.wall0), 2)


def wait_for_load(max_load: float, timeout_s: float, say: Any = None) -> float | None:
    """Wait (up to ``timeout_s``) until the 1-minute load average is at most ``max_load``."""
    deadline = time.monotonic() + timeout_s
    load = _load1()
    while load is not None and load > max_load and time.monotonic() < deadline:
        if say is not None:
            say(f"load average {load} > {max_load}: waiting...")
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
        load = _load1()
    return load


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


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
    load_start = _load1()
    clients, spec, raw = load_partition(partition_dir, dev)
    sampled_per_round = max(1, math.floor(settings.join_ratio * len(clients) + 1e-9))
    smallest = sorted(clients, key=lambda c: c.num_train)[:2]
    warm_raw = {c.client_id: raw[c.client_id] for c in smallest}
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

        def run(variant: str, bs: int, use_clients: Sequence[ClientData], use_raw: Mapping[int, Any], s: BenchmarkSettings, r: int) -> list[tuple[int, float]]:
            if variant == NAIVE:
                return _run_naive(name, params, use_raw, spec, s, dev, r, bs)
            return _run_resident(name, params, use_clients, spec, s, dev, r, bs)

        if warmup:
            for variant, bs in variants:
                say(f"{name}: warm-up {variant} (batch {bs}) on clients {[c.client_id for c in smallest]}")
                run(variant, bs, smallest, warm_raw, warm_settings, 1)
                gc.collect()
        per_run: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in variants}
        discarded: list[dict[str, Any]] = []
        attempt = 0
        while len(per_run[NAIVE]) < repeats:
            order = variants if attempt % 2 == 0 else variants[::-1]
            attempt += 1
            repetition: dict[str, dict[str, Any]] = {}
            for variant, bs in order:
                load = _load1()
                with _ForeignLoad() as foreign:
                    timings = run(variant, bs, clients, raw, settings, rounds)
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
                    "data_path": _DATA_PATHS[variant],
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
            "load_avg_1m_end": _load1(),
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


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

_VARIANT_LABEL = {NAIVE: "naive DataLoader", RESIDENT_BS10: "resident (project)", RESIDENT: "resident (project)"}


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
            f"| {row['algorithm']} | {row['variant']} | {_VARIANT_LABEL[row['variant']]} | {row['batch_size']} | "
            f"{row['samples_per_round']:.0f} | {row['samples_per_s']:.1f} | {row['round_time_s']:.3f} | "
            f"{row['speedup_vs_naive']:.2f} | {row['foreign_cpu_cores_median']} |"
        )
    lines += [
        "",
        "Ratios of the medians (in brackets: median of the within-repetition ratios).",
        "",
        "| Algorithm | resident vs naive | data-path gain (bs 10) | batch-size gain | repetitions discarded (contended) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["ratios"].items():
        lines.append(
            f"| {name} | {r['resident_vs_naive']:.2f} ({r['resident_vs_naive_paired']:.2f}) | "
            f"{r['data_path_gain_at_bs10']:.2f} ({r['data_path_gain_at_bs10_paired']:.2f}) | "
            f"{r['batch_size_gain']:.2f} ({r['batch_size_gain_paired']:.2f}) | "
            f"{len(report.get('discarded_repetitions', {}).get(name, []))} |"
        )
    return "\n".join(lines) + "\n"


def print_table(report: Mapping[str, Any]) -> None:
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
            f"{len(report['discarded_repetitions'].get(name, []))} contended repetitions discarded"
        )


def write_report(report: Mapping[str, Any], output: Path) -> Path:
    """Write the JSON to ``output`` and the markdown beside it (same stem, ``.md``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md = output.with_suffix(".md")
    md.write_text(to_markdown(report), encoding="utf-8")
    return md


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
        "--params-file", default=str(DEFAULT_PARAMS_FILE),
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
        settings = resolve_settings(params_file, _parse_overrides(args.param))
        log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.wait_load is not None:
            wait_for_load(args.wait_load, args.wait_timeout, log)
        if log is not None:
            log(f"defaults: {settings.source}; load average (1 min) {_load1()}")
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
