"""Kedro's JSON and CSV datasets, written atomically (`metrics.json`, summaries, tables).

Kedro's own datasets open the target and write into it: a run killed mid-write leaves a
truncated file: a JSON file that no longer parses, a CSV that loads as fewer rows. These
subclasses keep every argument and every byte of the parent's output, and only make the
file appear in one step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import DatasetError, get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset

from .atomic import fsync_path
from .corrupt import corrupt_file


def require_local_protocol(protocol: str, dataset: str, location: str, alternative: str) -> None:
    """Atomic replacement is a rename, which exists only within one local filesystem."""
    if protocol != "file":
        raise DatasetError(
            f"{dataset} replaces its output by a rename, so it writes local paths only: got protocol '{protocol}' "
            f"for {location}. Use {alternative} for remote storage."
        )


class _ReplaceOnSave:
    """Mixin for Kedro's fsspec file datasets: the parent's own `save` writes a temp file,
    which then replaces the target.

    The parent writes the bytes (so they are exactly what `json.JSONDataset` or
    `pandas.CSVDataset` would write in place); this class only redirects its save path for
    the duration of one save. Local, unversioned files only: a rename is atomic only within
    one filesystem, and a versioned dataset never overwrites a file anyway.
    """

    _staged_path: PurePosixPath | None = None

    def _refuse_unsupported(self, version: Any) -> None:
        require_local_protocol(self._protocol, type(self).__name__, str(self._filepath), "the plain Kedro dataset")
        if version is not None:
            raise DatasetError(
                f"{type(self).__name__} is unversioned ({self._filepath}): a versioned dataset writes a new file per "
                "run and needs no atomic replacement. Remove `versioned: true` or use the plain Kedro dataset."
            )

    def _get_save_path(self) -> PurePosixPath:
        return self._staged_path if self._staged_path is not None else super()._get_save_path()

    def save(self, data: Any) -> None:
        target = Path(get_filepath_str(super()._get_save_path(), self._protocol))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._staged_path = PurePosixPath(tmp)
        try:
            super().save(data)
            fsync_path(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._staged_path = None
            self._invalidate_cache()


class AtomicJSONDataset(_ReplaceOnSave, JSONDataset):
    """`json.JSONDataset` (same arguments, same bytes) whose file is replaced atomically; a
    damaged file is a ``CorruptFileError`` naming it."""

    def __init__(self, *, filepath: str, version: Any = None, **kwargs: Any) -> None:
        super().__init__(filepath=filepath, version=version, **kwargs)
        self._refuse_unsupported(version)

    def load(self) -> Any:
        try:
            return super().load()
        except DatasetError as error:
            cause = error.__cause__ or error
            if isinstance(cause, (json.JSONDecodeError, UnicodeDecodeError)):
                raise corrupt_file(self._filepath, "JSON document", cause, "Re-run the stage that writes it") from cause
            raise


class AtomicCSVDataset(_ReplaceOnSave, CSVDataset):
    """`pandas.CSVDataset` (same arguments, same bytes) whose file is replaced atomically."""

    def __init__(self, *, filepath: str, version: Any = None, **kwargs: Any) -> None:
        super().__init__(filepath=filepath, version=version, **kwargs)
        self._refuse_unsupported(version)
