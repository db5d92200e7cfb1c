"""The Great Expectations gates catch planted bad data, and a failed gate stops the DAG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_medmnist import fake_arrays, make_project_copy, make_release, run_kedro

from fedmic_pipeline.ingestion import pixel_sha1
from fedmic_pipeline.pipelines.data_ingestion.nodes import (
    build_image_manifest,
    enforce_data_gate,
    load_raw_dataset,
    validate_raw_data,
)
from fedmic_pipeline.validation import DataGateError, enforce_gate, validate_partition, validate_table

GATE_DIR = Path("data") / "08_reporting" / "data_gate"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(copy)
    return copy


def _failed(report: dict) -> dict[tuple[str, str | None], dict]:
    return {(r["type"], r["kwargs"].get("column")): r for r in report["results"] if not r["success"]}


# ---- raw-data gate -------------------------------------------------------------------


def test_label_out_of_range_stops_the_run_before_the_validated_dataset(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_arrays("pneumoniamnist")
    arrays["train_labels"][3, 0] = 7  # PneumoniaMNIST has classes 0 and 1
    make_release(monkeypatch, project / "data" / "01_raw", "pneumoniamnist", arrays)

    with pytest.raises(DataGateError) as caught:
        run_kedro(project)
    message = str(caught.value)
    assert "labels are class ids of pneumoniamnist (0..1)" in message
    assert "'label': 7" in message and "'split': 'train'" in message and "'index': 3" in message

    report = json.loads((project / GATE_DIR / "raw_validation.json").read_text())
    assert report["success"] is False
    failed = _failed(report)
    assert list(failed) == [("expect_column_values_to_be_in_set", "label")]
    assert failed[("expect_column_values_to_be_in_set", "label")]["partial_unexpected_index_list"] == [
        {"label": 7, "split": "train", "index": 3}
    ]
    assert not (project / "data" / "03_primary" / "dataset.npz").exists()
    assert not (project / GATE_DIR / "test_train_duplicates.json").exists()
    assert (project / "data" / "08_reporting" / "data_docs" / "raw_data" / "index.html").is_file()


def test_test_image_copied_into_training_is_counted_and_removed(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_arrays("bloodmnist")
    arrays["train_images"][5] = arrays["test_images"][2]
    arrays["train_images"][9] = arrays["test_images"][2]
    arrays["val_images"][1] = arrays["test_images"][0]
    make_release(monkeypatch, project / "data" / "01_raw", "bloodmnist", arrays)

    run_kedro(project, params={"dataset": {"name": "bloodmnist"}})

    duplicates = json.loads((project / GATE_DIR / "test_train_duplicates.json").read_text())
    assert duplicates["removed"] == {"train": 2, "val": 1}
    assert duplicates["removed_source_index"] == {"train": [5, 9], "val": [1]}
    assert duplicates["test_images_with_copies_in_train_or_val"] == 2
    with np.load(project / "data" / "03_primary" / "dataset.npz") as npz:
        assert npz["train_source_index"].tolist() == [i for i in range(24) if i not in (5, 9)]
        assert npz["val_source_index"].tolist() == [i for i in range(8) if i != 1]
        np.testing.assert_array_equal(npz["test_images"], arrays["test_images"])  # test is never touched
        np.testing.assert_array_equal(npz["train_images"], np.delete(arrays["train_images"], [5, 9], axis=0))
        test_hashes = set(pixel_sha1(npz["test_images"]))
        assert not test_hashes & (set(pixel_sha1(npz["train_images"])) | set(pixel_sha1(npz["val_images"])))


def _raw_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arrays: dict, pixel_range=(0, 255), **release) -> dict:
    make_release(monkeypatch, tmp_path, "pneumoniamnist", arrays)
    if release:
        import medmnist

        for key, value in release.items():
            monkeypatch.setitem(medmnist.INFO["pneumoniamnist"], key, value)
    raw, info = load_raw_dataset(
        {"name": "pneumoniamnist", "size": 28, "raw_dir": str(tmp_path), "download": False}, {"verify_md5": True}
    )
    return validate_raw_data(build_image_manifest(raw), info, {"pixel_range": list(pixel_range), "data_docs_dir": None})


def test_wrong_channel_count_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _raw_report(tmp_path, monkeypatch, fake_arrays("pneumoniamnist", n_channels=3))  # RGB in a grayscale set
    assert list(_failed(report)) == [("expect_column_values_to_be_in_set", "channels")]
    with pytest.raises(DataGateError, match=r"images have 1 channel\(s\), as medmnist.INFO says for pneumoniamnist"):
        enforce_data_gate(report)


def test_split_sizes_and_pixel_range_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _raw_report(
        tmp_path,
        monkeypatch,
        fake_arrays("pneumoniamnist"),
        pixel_range=(10, 200),
        n_samples={"train": 25, "val": 8, "test": 8},
    )
    failed = _failed(report)
    assert set(failed) == {
        ("expect_column_values_to_be_between", "pixel_min"),
        ("expect_column_values_to_be_between", "pixel_max"),
        ("expect_column_pair_values_to_be_equal", None),
    }
    assert failed[("expect_column_pair_values_to_be_equal", None)]["partial_unexpected_index_list"] == [
        {"n_images": 24, "n_official": 25, "split": "train"}
    ]


# ---- the GX runner -------------------------------------------------------------------


def test_validate_table_report_is_plain_deterministic_json_with_data_docs(tmp_path: Path) -> None:
    df = pd.DataFrame({"x": [1, 2, 3, 40], "name": ["a", "b", "c", "d"]})
    expectations = [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "x", "max_value": 10}, "description": "x is small"},
        {"type": "expect_table_row_count_to_equal", "kwargs": {"value": 4}, "description": "four rows"},
    ]
    first = validate_table(df, "toy", expectations, docs_dir=tmp_path / "docs", index_columns=["name"])
    second = validate_table(df, "toy", expectations, docs_dir=tmp_path / "docs", index_columns=["name"])
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["success"] is False
    assert first["statistics"]["unsuccessful_expectations"] == 1
    assert [r["description"] for r in first["results"]] == ["x is small", "four rows"]
    assert (tmp_path / "docs" / "toy" / "index.html").is_file()
    assert (tmp_path / "docs" / "index.html").is_file()
    assert len(list((tmp_path / "docs" / "toy" / "validations").rglob("*.html"))) == 1  # the latest run only
    with pytest.raises(DataGateError) as caught:
        enforce_gate(first)
    assert "x is small -> 1 of 4 rows unexpected, e.g. [{'x': 40, 'name': 'd'}]" in str(caught.value)


# ---- partition gate ------------------------------------------------------------------

POOL = 60
MIN_PER_CLIENT = 15


def _placement() -> tuple[pd.DataFrame, list[str]]:
    """A valid placement of 60 pooled samples over 3 clients, and 10 global test hashes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(POOL + 10, 28, 28), dtype=np.uint8)
    hashes = pixel_sha1(images)
    origin = np.arange(POOL)
    placement = pd.DataFrame(
        {
            "origin": origin,
            "client": origin % 3,
            "local_split": np.where(origin % 5 == 0, "test", np.where(origin % 5 == 1, "val", "train")),
            "label": origin % 2,
            "device": origin % 3,
            "pixel_sha1": hashes[:POOL],
        }
    )
    return placement, hashes[POOL:]


def test_valid_partition_passes(tmp_path: Path) -> None:
    placement, test_hashes = _placement()
    report = validate_partition(placement, POOL, set(test_hashes), MIN_PER_CLIENT, tmp_path / "docs", num_clients=3)
    assert report["success"] is True, report
    enforce_gate(report)
    assert (tmp_path / "docs" / "partition" / "index.html").is_file()


def _placed_twice(p: pd.DataFrame, _: list[str]) -> pd.DataFrame:
    return pd.concat([p, p.iloc[[7]].assign(client=1)], ignore_index=True)


def _missing(p: pd.DataFrame, _: list[str]) -> pd.DataFrame:
    return p.drop(index=11).reset_index(drop=True)


def _client_below_min(p: pd.DataFrame, _: list[str]) -> pd.DataFrame:
    return p.assign(client=np.where(p["client"] == 2, np.where(p["origin"] < 30, 2, 0), p["client"]))


def _test_image_in_training(p: pd.DataFrame, test_hashes: list[str]) -> pd.DataFrame:
    out = p.copy()
    out.loc[2, "pixel_sha1"] = test_hashes[4]  # origin 2 is a local training sample
    return out


@pytest.mark.parametrize(
    ("corrupt", "expected_failures", "message_part"),
    [
        (
            _placed_twice,
            {("expect_column_values_to_be_unique", "origin"), ("expect_table_row_count_to_equal", None)},
            "no sample is placed twice",
        ),
        (_missing, {("expect_table_row_count_to_equal", None)}, "none missing) -> observed 59"),
        (_client_below_min, {("expect_column_values_to_be_between", "n_samples")}, "'client': 2"),
        (
            _test_image_in_training,
            {("expect_column_values_to_not_be_in_set", "pixel_sha1")},
            "exact copy of a global test image -> 1 of 60 rows unexpected",
        ),
    ],
    ids=["placed_twice", "missing_sample", "client_below_min", "test_image_in_training"],
)
def test_partition_gate_catches(corrupt, expected_failures: set, message_part: str) -> None:
    placement, test_hashes = _placement()
    report = validate_partition(corrupt(placement, test_hashes), POOL, test_hashes, MIN_PER_CLIENT, None)
    assert set(_failed(report)) == expected_failures
    with pytest.raises(DataGateError) as caught:
        enforce_gate(report)
    assert message_part in str(caught.value)


def test_partition_gate_counts_an_empty_client_when_told_how_many() -> None:
    placement, test_hashes = _placement()
    report = validate_partition(placement, POOL, test_hashes, MIN_PER_CLIENT, None, num_clients=4)
    failed = _failed(report)
    assert failed[("expect_column_values_to_be_between", "n_samples")]["partial_unexpected_index_list"] == [
        {"n_samples": 0, "client": 3}
    ]
