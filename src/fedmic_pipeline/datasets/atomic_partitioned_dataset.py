"""A PartitionedDataset whose folder is replaced as a whole: old complete set or new complete set.

Kedro's `PartitionedDataset(overwrite=True)` deletes the folder, then writes the partitions
one by one. A run killed in between leaves a subset (say 6 of 10 hospitals) that looks
like a valid partition: training would run on fewer hospitals and evaluation score fewer
models, without a word. This dataset writes every partition into a staging folder beside
the target (`.<name>.staging-*`, same filesystem), flushes it, then swaps it in:

* Linux: one `renameat2(RENAME_EXCHANGE)`, which exchanges the two folders atomically; the
  staging name then holds the old set, which is deleted;
* elsewhere (or a filesystem without exchange): the target is renamed to `.<name>.previous`
  and the staging folder to the target. A crash between the two renames leaves no target
  and a complete `.previous`, which the next load or save of this dataset moves back.

A staging folder left by a killed run is deleted by the next save. Loading is Kedro's, so
its loaders are lazy and open files by path: a reader that lists the folder, and loads its
partitions only after another process swapped in a new set, reads the new files. Within
one Kedro run a dataset is never read while it is saved.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError
from kedro_datasets.partitions import PartitionedDataset

from .atomic import fsync_path
from .atomic_file_datasets import require_local_protocol

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _rename_exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def staging_folders(target: Path) -> list[Path]:
    """Staging folders of `target` (a save in progress, or left behind by a killed one)."""
    return sorted(target.parent.glob(f".{target.name}.staging-*"))


def previous_folder(target: Path) -> Path:
    """Where the two-rename swap parks the old set for the instant between its renames."""
    return target.with_name(f".{target.name}.previous")


def swap_folder_into_place(staging: Path, target: Path) -> None:
    """Make `staging` the folder at `target`, replacing what was there in one step."""
    if not target.exists():
        os.rename(staging, target)
    elif _rename_exchange(staging, target):
        shutil.rmtree(staging)  # after the exchange it holds the old set
    else:
        previous = previous_folder(target)
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(target, previous)
        os.rename(staging, target)
        shutil.rmtree(previous)
    fsync_path(target.parent)


def restore_interrupted_swap(target: Path) -> None:
    """Put back the old set when a two-rename swap was cut between its renames."""
    previous = previous_folder(target)
    if previous.is_dir() and not target.exists():
        os.rename(previous, target)
        logger.warning("Restored %s from %s: the save that replaced it was interrupted", target, previous.name)


class AtomicPartitionedDataset(PartitionedDataset):
    """`partitions.PartitionedDataset` (same catalog arguments) whose save replaces the whole
    folder atomically; `overwrite` is implied, since the new set always replaces the old."""

    def __init__(self, *, path: str, dataset: Any, overwrite: bool = True, **kwargs: Any) -> None:
        super().__init__(path=path, dataset=dataset, overwrite=True, **kwargs)
        require_local_protocol(self._protocol, "AtomicPartitionedDataset", path, "partitions.PartitionedDataset")
        if overwrite is not True:
            raise DatasetError(
                f"AtomicPartitionedDataset at '{path}' always replaces the whole set of partitions (that is what "
                "makes it atomic), so `overwrite: false` cannot be honoured. Remove `overwrite` from the catalog "
                "entry, or use partitions.PartitionedDataset to add partitions to an existing folder."
            )
        self._target = Path(self._filesystem._strip_protocol(self._normalized_path).rstrip(self._sep))

    def _list_partitions(self) -> list[str]:
        if self._cached_partitions is None:
            restore_interrupted_swap(self._target)
        return super()._list_partitions()

    def save(self, data: dict[str, Any]) -> None:
        target = self._target
        target.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_swap(target)
        for stale in staging_folders(target):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            self._writer_into(staging).save(data)
            for path in sorted(staging.rglob("*"), reverse=True):  # files before the folders that hold them
                fsync_path(path)
            fsync_path(staging)
            swap_folder_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            restore_interrupted_swap(target)
            raise
        finally:
            self._invalidate_caches()

    def _writer_into(self, folder: Path) -> PartitionedDataset:
        """Kedro's own PartitionedDataset, writing the same partitions into `folder`."""
        return PartitionedDataset(
            path=str(folder),
            dataset={"type": self._dataset_type, **self._dataset_config},
            filepath_arg=self._filepath_arg,
            filename_suffix=self._filename_suffix,
            save_lazily=self._save_lazily,
        )
