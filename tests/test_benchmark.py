"""The throughput benchmark command: runs end to end and writes a well-formed report.

Only the shape of the report is checked (fields present, numbers positive): timings on a
shared 2-core machine are figures, never assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmic_pipeline.benchmarks.throughput import (
    NAIVE,
    RESIDENT,
    RESIDENT_BS10,
    NaiveImageDataset,
    _parse_overrides,
    resolve_settings,
)
from fedmic_pipeline.core.protocol import ConfigurationError

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
    assert [(r["algorithm"], r["variant"]) for r in rows] == [(a, v) for a in ("fedavg", "fedmic") for v in VARIANTS]
    for row in rows:
        assert row["batch_size"] == (32 if row["variant"] == RESIDENT else 10)
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
    settings = resolve_settings(params, _parse_overrides(["fedmic.teacher_width=0.5"]))
    assert settings.join_ratio == 0.5 and settings.seed == 7
    assert settings.algorithm_params["fedavg"] == {"lr": 0.05, "batch_size": 32}
    assert settings.algorithm_params["fedmic"] == {"lr": 0.02, "batch_size": 32, "teacher_width": 0.5}
    assert settings.ignored_keys == {"fedmic": ["not_a_field"]}
    assert settings.source.startswith(str(params))

    missing = resolve_settings(tmp_path / "absent.yml")
    assert missing.join_ratio == 1.0 and missing.algorithm_params == {}
    assert "does not exist" in missing.source
    with pytest.raises(ConfigurationError):
        _parse_overrides(["teacher_width=0.5"])
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
