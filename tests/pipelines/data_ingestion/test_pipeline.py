"""The data_ingestion pipeline: any 2D MedMNIST flag, clear errors for missing or altered files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_medmnist import PROJECT_ROOT, kedro_env, make_project_copy, make_release, md5_of, run_kedro

from fedmic_pipeline.ingestion import (
    RawDataChecksumError,
    RawDataMissingError,
    UnsupportedDatasetError,
    dataset_spec,
    ensure_raw_file,
)
from fedmic_pipeline.pipelines.data_ingestion.nodes import load_raw_dataset

VALIDATED_KEYS = {
    f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels", "source_index")
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project copy as working directory, so nothing lands in the repository's data/."""
    copy = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(copy)
    return copy


@pytest.mark.parametrize(
    ("flag", "size", "message_parts"),
    [
        ("notamnist", 28, ["Unknown MedMNIST dataset 'notamnist'", "pneumoniamnist", "bloodmnist", "dataset.name"]),
        ("organmnist3d", 28, ["3D MedMNIST dataset", "pneumoniamnist", "dataset.name"]),
        ("chestmnist", 28, ["multi-label", "single-label", "dataset.name"]),
        ("pneumoniamnist", 32, ["Image size 32", "[28, 64, 128, 224]", "dataset.size"]),
    ],
)
def test_unsupported_dataset_is_named_with_the_fix(flag: str, size: int, message_parts: list[str]) -> None:
    with pytest.raises(UnsupportedDatasetError) as caught:
        dataset_spec(flag, size)
    for part in message_parts:
        assert part in str(caught.value)


def test_size_above_28_uses_medmnist_names_and_md5() -> None:
    spec = dataset_spec("BloodMNIST", 64)
    assert spec.filename == "bloodmnist_64.npz"
    assert spec.md5 == "2b94928a2ae4916078ca51e05b6b800b"
    assert spec.url.endswith("bloodmnist_64.npz?download=1")
    assert (spec.n_channels, spec.n_classes) == (3, 8)


def test_missing_file_offline_download_fails_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmnist

    # A refused local port stands in for "no internet", whether or not this machine has it.
    unreachable = "http://127.0.0.1:9/bloodmnist.npz"
    monkeypatch.setitem(medmnist.INFO["bloodmnist"], "url", unreachable)
    spec = dataset_spec("bloodmnist", 28)
    with pytest.raises(RawDataMissingError) as caught:
        ensure_raw_file(tmp_path / "raw", spec, download=True)
    message = str(caught.value)
    for part in [
        str((tmp_path / "raw" / "bloodmnist.npz").resolve()),
        unreachable,
        "zenodo.org/records/10519652",
        "7053d0359d879ad8a5505303e11de1dc",
        "download failed",
        "make run",
        "kedro run --pipelines data_ingestion",
    ]:
        assert part in message
    assert list((tmp_path / "raw").iterdir()) == [], "a failed download must not leave a file behind"


def test_md5_mismatch_names_the_file_both_md5s_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmnist

    path, _ = make_release(monkeypatch, tmp_path, "pneumoniamnist")
    actual = md5_of(path)
    monkeypatch.setitem(medmnist.INFO["pneumoniamnist"], "MD5", "0" * 32)
    params = {"name": "pneumoniamnist", "size": 28, "raw_dir": str(tmp_path), "download": False}
    with pytest.raises(RawDataChecksumError) as caught:
        load_raw_dataset(params, {"verify_md5": True})
    message = str(caught.value)
    for part in [str(path), actual, "0" * 32, "download it again", "ingestion.verify_md5", "make run"]:
        assert part in message
    arrays, info = load_raw_dataset(params, {"verify_md5": False})
    assert info["md5"] == actual and info["md5_verified"] is False
    assert arrays["train_labels"].dtype == np.int64


def test_kedro_run_without_raw_file_exits_nonzero_and_writes_nothing(project: Path, tmp_path: Path) -> None:
    empty_raw = tmp_path / "no_raw_here"
    empty_raw.mkdir()
    kedro = Path(sys.executable).with_name("kedro")
    completed = subprocess.run(
        [str(kedro), "run", "--pipelines", "data_ingestion", "--params", f"dataset.raw_dir={empty_raw},dataset.download=false"],
        cwd=project,
        env=kedro_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-3000:]
    assert "RawDataMissingError" in output, output[-3000:]
    assert "pneumoniamnist.npz" in output
    assert not (project / "data" / "03_primary" / "dataset.npz").exists()
    assert not (project / "data" / "08_reporting" / "data_gate" / "raw_validation.json").exists()


@pytest.mark.parametrize(
    ("flag", "image_shape", "n_channels"),
    [("bloodmnist", (28, 28, 3), 3), ("pneumoniamnist", (28, 28), 1)],
    ids=["rgb", "grayscale"],
)
def test_kedro_session_ingests_rgb_and_grayscale(
    project: Path, monkeypatch: pytest.MonkeyPatch, flag: str, image_shape: tuple[int, ...], n_channels: int
) -> None:
    raw_dir = project / "data" / "01_raw"
    _, arrays = make_release(monkeypatch, raw_dir, flag)
    run_kedro(project, params={"dataset": {"name": flag, "raw_dir": "data/01_raw"}})

    with np.load(project / "data" / "03_primary" / "dataset.npz") as npz:
        validated = {key: npz[key] for key in npz.files}
    assert set(validated) == VALIDATED_KEYS
    for split in ("train", "val", "test"):
        n = len(arrays[f"{split}_labels"])
        assert validated[f"{split}_images"].shape == (n, *image_shape)
        assert validated[f"{split}_images"].dtype == np.uint8
        assert validated[f"{split}_labels"].dtype == np.int64 and validated[f"{split}_labels"].shape == (n,)
        np.testing.assert_array_equal(validated[f"{split}_labels"], arrays[f"{split}_labels"][:, 0])
        np.testing.assert_array_equal(validated[f"{split}_images"], arrays[f"{split}_images"])
        np.testing.assert_array_equal(validated[f"{split}_source_index"], np.arange(n))

    info = json.loads((project / "data" / "03_primary" / "dataset_info.json").read_text())
    assert info["flag"] == flag and info["n_channels"] == n_channels and info["size"] == 28
    assert info["official_split_sizes"] == {s: len(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert info["md5_verified"] is True and info["md5"] == info["md5_expected"]

    manifest = pd.read_parquet(project / "data" / "02_intermediate" / "image_manifest.parquet")
    assert len(manifest) == sum(len(arrays[f"{s}_labels"]) for s in ("train", "val", "test"))
    assert set(manifest["channels"]) == {n_channels}
    first = arrays["train_images"][0].astype(np.float64)
    row = manifest[(manifest["split"] == "train") & (manifest["index"] == 0)].iloc[0]
    assert row["pixel_mean"] == pytest.approx(first.mean()) and row["pixel_std"] == pytest.approx(first.std())
    assert (row["pixel_min"], row["pixel_max"]) == (first.min(), first.max())

    report = json.loads((project / "data" / "08_reporting" / "data_gate" / "raw_validation.json").read_text())
    assert report["success"] is True
    assert (project / "data" / "08_reporting" / "data_docs" / "raw_data" / "index.html").is_file()
    duplicates = json.loads((project / "data" / "08_reporting" / "data_gate" / "test_train_duplicates.json").read_text())
    assert duplicates["removed_total"] == 0


# Duplicates measured on the bundled official files: BreastMNIST's train image 115 is an
# exact copy of a test image; PneumoniaMNIST has none across test and train/val.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "sizes_after", "removed"),
    [
        ("pneumoniamnist", {"train": 4708, "val": 524, "test": 624}, {"train": [], "val": []}),
        ("breastmnist", {"train": 545, "val": 78, "test": 156}, {"train": [115], "val": []}),
    ],
)
def test_real_release_through_kedro_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, sizes_after: dict[str, int], removed: dict[str, list[int]]
) -> None:
    project = make_project_copy(tmp_path / "project", raw_files=[PROJECT_ROOT / "data" / "01_raw" / f"{flag}.npz"])
    monkeypatch.chdir(project)
    run_kedro(project, params={"dataset": {"name": flag, "download": False}})

    report = json.loads((project / "data" / "08_reporting" / "data_gate" / "raw_validation.json").read_text())
    assert report["success"] is True, report
    duplicates = json.loads((project / "data" / "08_reporting" / "data_gate" / "test_train_duplicates.json").read_text())
    assert duplicates["removed_source_index"] == removed
    assert duplicates["split_sizes_after"] == sizes_after
    with np.load(project / "data" / "03_primary" / "dataset.npz") as npz:
        assert {s: len(npz[f"{s}_labels"]) for s in ("train", "val", "test")} == sizes_after
        assert not set(removed["train"]) & set(npz["train_source_index"].tolist())
