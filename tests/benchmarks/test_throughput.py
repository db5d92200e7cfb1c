"""The throughput benchmark command: runs end to end and writes a well-formed report.

Only the shape of the report is checked (fields present, numbers positive): timings on a
shared 2-core machine are figures, never assertions. What is asserted exactly is that the
naive variant runs the algorithm it measures: its uploads are the resident variant's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmic_pipeline.benchmarks.naive import NaiveFedAvg, NaiveFedMIC
from fedmic_pipeline.benchmarks.settings import parse_overrides
from fedmic_pipeline.benchmarks.throughput import (
    NAIVE,
    RESIDENT,
    RESIDENT_BS10,
    NaiveImageDataset,
    load_partition,
    resolve_settings,
)
from fedmic_pipeline.benchmarks.variants import VECTORIZED, build_variant, simulate
from fedmic_pipeline.core.algorithms.fedavg import FedAvg
from fedmic_pipeline.core.algorithms.fedmic import FedMIC
from fedmic_pipeline.core.protocol import ConfigurationError, payload_nbytes

VARIANTS = (NAIVE, RESIDENT_BS10, RESIDENT)


def _write_client(path: Path, n_train: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.int64)
    np.savez(path, **arrays)


@pytest.fixture
def tiny_partition(tmp_path: Path) -> Path:
    clients = tmp_path / "partition" / "clients"
    clients.mkdir(parents=True)
    _write_client(clients / "client_00.npz", 23, seed=0)
    _write_client(clients / "client_01.npz", 14, seed=1)
    return tmp_path / "partition"


def test_command_writes_report_with_positive_figures(tiny_partition: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "benchmark.json"
    cmd = [
        sys.executable, "-m", "fedmic_pipeline.benchmarks.throughput",
        "--algorithms", "fedavg", "fedmic",
        "--rounds", "1", "--repeats", "1", "--threads", "1",
        "--partition-dir", str(tiny_partition), "--output", str(output),
        "--params-file", "none",
        # a thin teacher and student keep the test quick; the real run uses the conf
        "--param", "fedmic.teacher_width=0.25",
        "--param", "fedavg.model_options={widths: [8, 16, 32], feature_dim: 32}",
        "--param", "fedmic.model_options={widths: [8, 16, 32], feature_dim: 32}",
        "--param", "simulation.join_ratio=1.0",
        "--max-foreign-cores", "-1",  # keep every repetition however busy the machine is
        "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Client-training throughput" in proc.stdout

    report = json.loads(output.read_text())
    assert report["schema"] == "fedmic-throughput/1"
    for key in ("torch", "torch_threads", "device", "load_avg_1m_start", "load_avg_1m_end", "cpu_count"):
        assert key in report["host"]
    assert report["host"]["torch_threads"] == 1
    setting = report["setting"]
    assert setting["num_clients"] == 2
    assert setting["clients_per_round"] == 2
    assert setting["rounds"] == 1 and setting["repeats"] == 1
    assert setting["naive_batch_size"] == 10 and setting["max_foreign_cpu_cores"] is None
    assert report["discarded_repetitions"] == {"fedavg": [], "fedmic": []}
    assert "core defaults" in setting["defaults_source"]
    assert set(setting["algorithms"]) == {"fedavg", "fedmic"}

    rows = report["results"]
    # FedMIC's teacher (a ResNet) does not stack, so only FedAvg has the clients-together variant
    expected = [("fedavg", v) for v in (*VARIANTS, VECTORIZED)] + [("fedmic", v) for v in VARIANTS]
    assert [(r["algorithm"], r["variant"]) for r in rows] == expected
    for row in rows:
        assert row["batch_size"] == (32 if row["variant"] in (RESIDENT, VECTORIZED) else 10)
        for key in ("samples_per_s", "round_time_s", "samples_per_round", "speedup_vs_naive", "speedup_vs_naive_paired"):
            assert isinstance(row[key], float) and row[key] > 0, (row["algorithm"], row["variant"], key)
        assert len(row["runs"]) == 1
        assert {"samples", "seconds", "load_avg_1m", "foreign_cpu_cores"} <= set(row["runs"][0])
        assert row["runs"][0]["samples"] >= 23 + 14 - 2  # a trailing batch of one may be dropped
    naive_rows = [r for r in rows if r["variant"] == NAIVE]
    assert all(r["speedup_vs_naive"] == 1.0 for r in naive_rows)
    for name in ("fedavg", "fedmic"):
        ratios = report["ratios"][name]
        gains = {"resident_vs_naive", "data_path_gain_at_bs10", "batch_size_gain"}
        gains |= {"vectorized_vs_resident"} if name == "fedavg" else set()
        assert set(ratios) == gains | {f"{g}_paired" for g in gains}
        assert all(v > 0 for v in ratios.values())

    markdown = output.with_suffix(".md").read_text()
    assert "| Algorithm | Variant |" in markdown and "fedmic" in markdown


def test_settings_follow_the_project_parameters_layout(tmp_path: Path) -> None:
    params = tmp_path / "parameters_federated_training.yml"
    params.write_text(
        "training:\n  algorithm: fedmic\n  seed: 7\n  join_ratio: 0.5\n  num_rounds: 10\n"
        "algorithm_params:\n  common:\n    lr: 0.05\n    batch_size: 32\n"
        "  fedavg: {}\n  fedmic:\n    teacher_width: 0.25\n    lr: 0.02\n    not_a_field: 1\n"
    )
    settings = resolve_settings(params, parse_overrides(["fedmic.teacher_width=0.5"]))
    assert settings.join_ratio == 0.5 and settings.seed == 7
    assert settings.algorithm_params["fedavg"] == {"lr": 0.05, "batch_size": 32}
    assert settings.algorithm_params["fedmic"] == {"lr": 0.02, "batch_size": 32, "teacher_width": 0.5}
    assert settings.ignored_keys == {"fedmic": ["not_a_field"]}
    assert settings.source.startswith(str(params))

    missing = resolve_settings(tmp_path / "absent.yml")
    assert missing.join_ratio == 1.0 and missing.algorithm_params == {}
    assert "does not exist" in missing.source
    with pytest.raises(ConfigurationError):
        parse_overrides(["teacher_width=0.5"])
    with pytest.raises(ConfigurationError):
        resolve_settings(None, {"no_such_method": {"lr": 1}})


def test_naive_dataset_converts_each_item_like_to_tensor() -> None:
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    ds = NaiveImageDataset(images, np.array([[1]]))
    x, y = ds[0]
    assert len(ds) == 1 and y == 1
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 2, 2)
    assert torch.allclose(x[0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    rgb = NaiveImageDataset(np.zeros((2, 4, 4, 3), dtype=np.uint8), np.zeros(2))
    assert tuple(rgb[1][0].shape) == (3, 4, 4)


#: Thin models; energy 0.01 keeps rank 1 for every factored matrix, so FedMIC's upload
#: sizes do not depend on the trained values and two data paths must upload alike.
_TINY = {"model_options": {"widths": [8, 16, 32], "feature_dim": 32}}
_TINY_FEDMIC = {
    **_TINY, "teacher_width": 0.25, "energy_start": 0.01, "energy_end": 0.01, "error_feedback": True, "fp16_factors": True,
}  # fmt: skip


@pytest.mark.parametrize(("name", "params", "naive_class", "base_class"), [
    ("fedavg", _TINY, NaiveFedAvg, FedAvg),
    ("fedmic", _TINY_FEDMIC, NaiveFedMIC, FedMIC),
])  # fmt: skip
def test_naive_variant_uploads_what_the_algorithm_uploads(
    tiny_partition: Path, name: str, params: dict, naive_class: type, base_class: type
) -> None:
    """The naive variant replaces only local training: the same clients are sampled and
    their uploads (through the algorithm's own client_update, codec and error feedback)
    hold the same tensors with the same bytes as the resident variant's."""
    clients, spec, raw = load_partition(tiny_partition)
    settings = resolve_settings(None, {"simulation": {"join_ratio": 0.5}, name: params})
    uploads: dict[str, list[list[tuple[list[str], int]]]] = {}
    histories = {}
    for variant in (NAIVE, RESIDENT_BS10):
        algorithm = build_variant(variant, name, settings.algorithm_params[name], spec, clients, raw, 10, settings.seed)
        assert isinstance(algorithm, naive_class) == (variant == NAIVE) and isinstance(algorithm, base_class)
        seen = uploads.setdefault(variant, [])
        aggregate = algorithm.aggregate

        def recording(server_state, round_uploads, ctx, aggregate=aggregate, seen=seen):  # type: ignore[no-untyped-def]
            seen.append([(sorted(p), payload_nbytes(p)) for p, _ in round_uploads])
            return aggregate(server_state, round_uploads, ctx)

        algorithm.aggregate = recording  # type: ignore[method-assign]
        histories[variant] = simulate(algorithm, clients, spec, settings, torch.device("cpu"), rounds=2)
    naive, resident = histories[NAIVE], histories[RESIDENT_BS10]
    assert [r["sampled"] for r in naive] == [r["sampled"] for r in resident]
    assert all(len(r["sampled"]) == 1 for r in naive)
    assert uploads[NAIVE] == uploads[RESIDENT_BS10] and len(uploads[NAIVE]) == 2
    assert [r["bytes_up"] for r in naive] == [[b for _, b in rnd] for rnd in uploads[NAIVE]]
    assert [r["bytes_up"] for r in naive] == [r["bytes_up"] for r in resident]
    assert [r["bytes_down"] for r in naive] == [r["bytes_down"] for r in resident]
    for record in naive:
        (metrics,) = record["client_metrics"]
        assert metrics["num_samples"] == raw[metrics["client_id"]]["train_labels"].shape[0]
        if name == "fedmic":  # the upload went through FedMIC.client_update's codec, factored
            assert metrics["codec/bytes_encoded"] == record["bytes_up"][0]
            assert metrics["codec/layers_factored"] > 0 and metrics["codec/mean_rank"] == 1.0
            assert "codec/residual_norm" in metrics


def test_fedmic_round_profile_accounts_for_the_whole_round(tiny_partition: Path, tmp_path: Path) -> None:
    from fedmic_pipeline.benchmarks import fedmic_round
    from fedmic_pipeline.core.algorithms import fedmic as fedmic_module

    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    tiny_partition.rename(root / "data/05_model_input")
    original = fedmic_module.encode_update
    overrides = {"fedmic": {"teacher_width": 0.25, "model_options": {"widths": [8, 16, 32], "feature_dim": 32}}}
    report = fedmic_round.profile_rounds(root, rounds=2, join_ratio=1.0, overrides=overrides)

    assert fedmic_module.encode_update is original  # the timers are gone afterwards
    shares = {name: c["share"] for name, c in report["components"].items()}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(v >= 0 for v in shares.values())
    assert shares["teacher (forward, backward, step)"] > 0 and shares["SVD encode (uplink on clients, downlink on the server)"] > 0
    assert report["clients_per_round"] == 2 and report["samples_per_s"] > 0
    assert "| Component | s per round | share |" in fedmic_round.to_markdown(report)
