"""Tiny MedMNIST releases and throw-away Kedro projects for tests.

A fake release is a real `.npz` named the way medmnist names it, with random uint8
images; `register_release` patches `medmnist.INFO[flag]` (official split sizes and md5)
for the test's duration, so the pipeline checks the tiny file exactly as it checks the
official one. Kedro runs happen in a copy of the project under a temp directory (conf/,
pyproject.toml, empty data folders), never in the repository's data/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 24, "val": 8, "test": 8}
DATA_FOLDERS = (
    "01_raw",
    "02_intermediate",
    "03_primary",
    "04_feature",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
)


def fake_arrays(
    flag: str,
    *,
    split_sizes: Mapping[str, int] | None = None,
    size: int = 28,
    n_channels: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random uint8 images (all distinct) and labels cycling through the flag's classes, as (N, 1)."""
    import medmnist  # noqa: PLC0415

    info = medmnist.INFO[flag]
    channels = int(info["n_channels"]) if n_channels is None else n_channels
    n_classes = len(info["label"])
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        n = (split_sizes or DEFAULT_SPLIT_SIZES)[split]
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).astype(np.uint8).reshape(n, 1)
    return arrays


def release_name(flag: str, size: int = 28) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def write_release(raw_dir: Path, flag: str, arrays: Mapping[str, np.ndarray], size: int = 28) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / release_name(flag, size)
    np.savez_compressed(path, **arrays)
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def register_release(
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    path: Path,
    arrays: Mapping[str, np.ndarray],
    *,
    size: int = 28,
    md5: str | None = None,
    official_split_sizes: Mapping[str, int] | None = None,
) -> None:
    """Make medmnist.INFO describe this fake release (sizes, md5) until the test ends."""
    import medmnist  # noqa: PLC0415

    suffix = "" if size == 28 else f"_{size}"
    sizes = dict(official_split_sizes or {s: int(len(arrays[f"{s}_labels"])) for s in SPLITS})
    monkeypatch.setitem(medmnist.INFO[flag], "n_samples", sizes)
    monkeypatch.setitem(medmnist.INFO[flag], f"MD5{suffix}", md5 or md5_of(path))


def make_release(
    monkeypatch: pytest.MonkeyPatch, raw_dir: Path, flag: str, arrays: Mapping[str, np.ndarray] | None = None, **kwargs: Any
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write and register a fake release; `kwargs` go to `fake_arrays` when no arrays are given."""
    data = dict(arrays) if arrays is not None else fake_arrays(flag, **kwargs)
    path = write_release(raw_dir, flag, data)
    register_release(monkeypatch, flag, path, data)
    return path, data


def make_project_copy(dest: Path, raw_files: Iterable[Path] = ()) -> Path:
    """A runnable copy of the Kedro project: conf/ and pyproject.toml, empty data/, an empty src/.

    `src/` stays empty: Kedro only needs it to exist, and the package itself is imported
    from the installed (editable) project.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf" / "base", dest / "conf" / "base")
    (dest / "conf" / "local").mkdir(parents=True, exist_ok=True)
    (dest / "src").mkdir(exist_ok=True)
    for folder in DATA_FOLDERS:
        (dest / "data" / folder).mkdir(parents=True, exist_ok=True)
    for raw in raw_files:
        shutil.copy2(raw, dest / "data" / "01_raw" / Path(raw).name)
    return dest


def run_kedro(project: Path, pipeline: str = "data_ingestion", params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one pipeline in-process in `project` (the caller chdirs there: parameters hold relative paths)."""
    from kedro.framework.session import KedroSession  # noqa: PLC0415
    from kedro.framework.startup import bootstrap_project  # noqa: PLC0415

    assert Path.cwd().resolve() == project.resolve(), "chdir into the project copy first (monkeypatch.chdir)"
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=dict(params or {})) as session:
        return session.run(pipeline_names=[pipeline])


def kedro_env() -> dict[str, str]:
    """Environment for a `kedro` subprocess: no telemetry, wide rich output (no wrapped messages)."""
    env = dict(os.environ)
    env.update(
        {
            "KEDRO_DISABLE_TELEMETRY": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1",
            "COLUMNS": "400",
        }
    )
    return env
