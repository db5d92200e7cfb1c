"""AtomicPartitionedDataset: a reader finds the old complete set or the new complete set.

Real files in a temp folder; the failure midway is a partition dataset whose save raises
for one partition (what a full disk or a bad array does), the interrupted swap is the
folder layout a crash between the fallback's two renames leaves.
"""

from __future__ import annotations

import numpy as np
import pytest
from kedro.io import DatasetError

from fedmic_pipeline.datasets import AtomicPartitionedDataset, NpzDataset, OptionalPartitionedDataset
from fedmic_pipeline.datasets import atomic_partitioned_dataset as atomic

NPZ = "fedmic_pipeline.datasets.NpzDataset"


def _dataset(folder, dataset=NPZ, **kwargs) -> AtomicPartitionedDataset:
    return AtomicPartitionedDataset(path=str(folder), dataset=dataset, filename_suffix=".npz", **kwargs)


def _set(n: int, offset: int = 0) -> dict[str, dict[str, np.ndarray]]:
    return {f"client_{k:02d}": {"labels": np.arange(5, dtype=np.int64) + offset + k} for k in range(n)}


def _contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _leftovers(folder) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name.startswith(f".{folder.name}."))


def test_a_save_replaces_the_whole_set_and_leaves_nothing_beside_it(tmp_path):
    folder = tmp_path / "clients"
    dataset = _dataset(folder)
    dataset.save(_set(4))
    first_inode = folder.stat().st_ino
    dataset.save(_set(2, offset=100))  # fewer hospitals: the old client_02, client_03 must go
    assert sorted(dataset.load()) == ["client_00", "client_01"]
    assert dataset.load()["client_01"]()["labels"].tolist() == list(range(101, 106))
    assert folder.stat().st_ino != first_inode  # a new folder swapped in, not the old one rewritten
    assert _leftovers(folder) == []


class FailsOnClient02(NpzDataset):
    """The real npz dataset, except that one partition's save raises."""

    def save(self, data):
        if str(self._filepath).endswith("client_02.npz"):
            raise OSError(28, "No space left on device")
        super().save(data)


def test_a_save_that_raises_midway_leaves_the_old_set_intact(tmp_path):
    folder = tmp_path / "clients"
    _dataset(folder).save(_set(4))
    before = _contents(folder)
    with pytest.raises(DatasetError, match="No space left on device"):
        _dataset(folder, dataset={"type": FailsOnClient02}).save(_set(4, offset=100))  # client_00, 01 written first
    assert _contents(folder) == before
    assert _leftovers(folder) == []


def test_a_first_save_that_raises_leaves_no_folder(tmp_path):
    folder = tmp_path / "clients"
    with pytest.raises(DatasetError):
        _dataset(folder, dataset={"type": FailsOnClient02}).save(_set(4))
    assert not folder.exists() and _leftovers(folder) == []


def test_a_staging_folder_left_by_a_killed_save_is_never_read_and_is_cleared(tmp_path):
    folder = tmp_path / "clients"
    dataset = _dataset(folder)
    dataset.save(_set(3))
    killed = tmp_path / ".clients.staging-killed"
    killed.mkdir()
    NpzDataset(filepath=str(killed / "client_00.npz")).save({"labels": np.zeros(1)})
    assert sorted(dataset.load()) == ["client_00", "client_01", "client_02"]
    dataset.save(_set(3, offset=7))
    assert _leftovers(folder) == []


def test_without_an_atomic_exchange_the_two_rename_swap_is_used(tmp_path, monkeypatch):
    """Filesystems without RENAME_EXCHANGE (or non-Linux systems) take the fallback path."""
    monkeypatch.setattr(atomic, "_rename_exchange", lambda first, second: False)
    folder = tmp_path / "clients"
    dataset = _dataset(folder)
    dataset.save(_set(3))
    dataset.save(_set(2, offset=50))
    assert sorted(dataset.load()) == ["client_00", "client_01"] and _leftovers(folder) == []


def test_a_swap_cut_between_its_two_renames_is_restored_on_load(tmp_path):
    folder = tmp_path / "clients"
    dataset = _dataset(folder)
    dataset.save(_set(3))
    before = _contents(folder)
    folder.rename(atomic.previous_folder(folder))  # killed after the first rename of the fallback
    (tmp_path / ".clients.staging-killed").mkdir()
    assert sorted(_dataset(folder).load()) == ["client_00", "client_01", "client_02"]
    assert _contents(folder) == before


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "from_a").touch()
    if not atomic._rename_exchange(first, second):
        pytest.skip("this filesystem has no RENAME_EXCHANGE; the fallback test covers it")
    assert [p.name for p in second.iterdir()] == ["from_a"] and list(first.iterdir()) == []


def test_what_it_cannot_guarantee_is_refused_with_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"always replaces the whole set.*Remove `overwrite`"):
        _dataset(tmp_path / "clients", overwrite=False)
    with pytest.raises(DatasetError, match=r"local paths only: got protocol 'memory' for memory://clients.*PartitionedDataset"):
        AtomicPartitionedDataset(path="memory://clients", dataset=NPZ)


def test_the_optional_sets_are_written_atomically_and_may_be_absent(tmp_path):
    folder = tmp_path / "synthetic"
    optional = OptionalPartitionedDataset(path=str(folder), dataset=NPZ, filename_suffix=".npz")
    assert optional.load() == {}
    optional.save(_set(2))
    with pytest.raises(DatasetError):
        OptionalPartitionedDataset(path=str(folder), dataset={"type": FailsOnClient02}, filename_suffix=".npz").save(_set(3))
    assert sorted(optional.load()) == ["client_00", "client_01"]
