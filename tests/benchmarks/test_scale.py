"""The scale benchmark (the speed issue's GPU figure) runs both training paths on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedmic_pipeline.benchmarks import scale


def test_synthetic_clients_are_seeded_and_sized_around_the_mean() -> None:
    a = scale.synthetic_clients(20, 40, torch.device("cpu"), seed=3)
    b = scale.synthetic_clients(20, 40, torch.device("cpu"), seed=3)
    sizes = [c.num_train for c in a]
    assert sizes == [c.num_train for c in b] and all(torch.equal(x.train_x, y.train_x) for x, y in zip(a, b, strict=True))
    assert min(sizes) >= 20 and max(sizes) <= 60 and len(set(sizes)) > 1


def test_command_measures_both_paths_and_writes_the_ratio(tmp_path: Path) -> None:
    assert scale.main(["--clients", "3", "--samples-per-client", "12", "--rounds", "1", "--root", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "data/08_reporting/scale.json").read_text())
    assert [(r["clients"], r["amp"], r["mode"]) for r in rows] == [(3, "off", "never"), (3, "off", "always")]  # no AMP on a CPU
    assert all(r["client_samples_per_s"] > 0 for r in rows)
    assert "| 3 | off |" in (tmp_path / "data/08_reporting/scale.md").read_text()
