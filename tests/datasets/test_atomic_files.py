"""AtomicJSONDataset / AtomicCSVDataset: Kedro's bytes, written so that a failed or killed
save leaves the previous file whole."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset

from fedmic_pipeline.datasets import AtomicCSVDataset, AtomicJSONDataset


def test_the_bytes_are_kedros(tmp_path):
    document = {"global.accuracy": 0.865, "sites": [{"id": 3, "auc": None}], "név": "ü"}
    JSONDataset(filepath=str(tmp_path / "kedro.json"), save_args={"indent": 2, "sort_keys": True}).save(document)
    AtomicJSONDataset(filepath=str(tmp_path / "atomic.json"), save_args={"indent": 2, "sort_keys": True}).save(document)
    assert (tmp_path / "atomic.json").read_bytes() == (tmp_path / "kedro.json").read_bytes()
    table = pd.DataFrame({"client": ["client_00", "a,b"], "accuracy": [0.123456789, np.nan]})
    CSVDataset(filepath=str(tmp_path / "kedro.csv"), save_args={"index": False, "float_format": "%.6g"}).save(table)
    AtomicCSVDataset(filepath=str(tmp_path / "atomic.csv"), save_args={"index": False, "float_format": "%.6g"}).save(table)
    assert (tmp_path / "atomic.csv").read_bytes() == (tmp_path / "kedro.csv").read_bytes()
    pd.testing.assert_frame_equal(AtomicCSVDataset(filepath=str(tmp_path / "atomic.csv")).load(), table)


class NotSerialisable:
    """A value json.dump meets only after it has written most of the document."""


@pytest.mark.parametrize("dataset_type", [JSONDataset, AtomicJSONDataset])
def test_a_save_that_fails_midway_leaves_the_previous_file_only_when_atomic(tmp_path, dataset_type):
    path = tmp_path / "metrics.json"
    dataset = dataset_type(filepath=str(path))
    dataset.save({"global.accuracy": 0.8})
    with pytest.raises(DatasetError, match="not JSON serializable"):
        dataset.save({"a": list(range(2000)), "z": NotSerialisable()})
    if dataset_type is AtomicJSONDataset:
        assert json.loads(path.read_text()) == {"global.accuracy": 0.8}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left
    else:  # what the catalog used before: a truncated file, which is why the project does not use it
        with pytest.raises(json.JSONDecodeError):
            json.loads(path.read_text())


def test_the_file_is_replaced_not_rewritten_in_place(tmp_path):
    path = tmp_path / "site_metrics.csv"
    dataset = AtomicCSVDataset(filepath=str(path))
    dataset.save(pd.DataFrame({"x": [1]}))
    inode = path.stat().st_ino
    dataset.save(pd.DataFrame({"x": [2]}))
    assert path.stat().st_ino != inode and dataset.load()["x"].tolist() == [2]


def test_remote_and_versioned_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"writes local paths only: got protocol 'memory'.*plain Kedro dataset"):
        AtomicJSONDataset(filepath="memory://metrics.json")
    from kedro.io import Version

    with pytest.raises(DatasetError, match=r"unversioned.*Remove `versioned: true`"):
        AtomicCSVDataset(filepath=str(tmp_path / "t.csv"), version=Version(None, None))
