"""A small dataset gets a partition it can hold: the README's BreastMNIST command works as written.

BreastMNIST's pool has 623 images: 10 hospitals of at least 40 (the default floor) cannot be
drawn at lambda 0.3. `min_samples_per_client_by_dataset` (conf/base/parameters_data_partition.yml)
gives it 20, picked by `dataset.name`, while PneumoniaMNIST keeps 40.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from kedro.config import OmegaConfigLoader

from fixtures_medmnist import kedro_env
from fixtures_pipelines import PROJECT_ROOT, copy_project

KEDRO = Path(sys.executable).with_name("kedro")
README_COMMAND_PARAMS = "dataset.name=breastmnist"


def _partition_params(**runtime_params: dict) -> dict:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="base", runtime_params=runtime_params)
    return loader["parameters"]["partition"]


def test_the_floor_follows_the_dataset_and_the_command_line_still_wins() -> None:
    assert _partition_params()["min_samples_per_client"] == 40
    assert _partition_params(dataset={"name": "breastmnist"})["min_samples_per_client"] == 20
    explicit = _partition_params(dataset={"name": "breastmnist"}, partition={"min_samples_per_client": 7})
    assert explicit["min_samples_per_client"] == 7


def test_readme_breastmnist_command_partitions_the_bundled_file(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    raw = project / "data/01_raw"
    raw.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "data/01_raw/breastmnist.npz", raw / "breastmnist.npz")

    def kedro_run(pipeline: str) -> None:
        run = subprocess.run(
            [str(KEDRO), "run", "--pipelines", pipeline, "--params", README_COMMAND_PARAMS],
            cwd=project, env=kedro_env(), capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert run.returncode == 0, f"{pipeline}: {run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    kedro_run("data_ingestion")
    kedro_run("data_partition")

    manifest = json.loads((project / "data/05_model_input/partition_manifest.json").read_text())
    assert manifest["dataset"]["flag"] == "breastmnist"
    assert manifest["parameters"]["partition"]["min_samples_per_client"] == 20
    sizes = [sizes["total"] for sizes in manifest["split_sizes"].values()]
    assert len(sizes) == 10 and min(sizes) >= 20 and sum(sizes) == manifest["dataset"]["pool_size"]
    for name in manifest["split_sizes"]:
        with np.load(project / f"data/05_model_input/clients/{name}.npz") as arrays:
            assert arrays["train_labels"].size >= 1
