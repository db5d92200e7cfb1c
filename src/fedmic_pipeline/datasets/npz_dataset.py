"""A Kedro dataset for dicts of numpy arrays, written byte-identically and atomically.

`numpy.savez` stamps each zip member with the current time, so two identical partitions
would hash differently and `dvc repro` could never reproduce them byte for byte. This
dataset writes members in sorted order with a fixed timestamp, and writes to a temporary
file that replaces the target only when complete, so a crash never leaves a valid-looking
half file.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path

from .corrupt import corrupt_file

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def npy_bytes(array: np.ndarray) -> bytes:
    """The exact bytes of `array` as an .npy member (what the manifest hashes name)."""
    array = np.asarray(array, order="C")
    if array.dtype == object:
        raise DatasetError("Arrays of dtype object cannot be saved; use numeric or fixed-width string arrays.")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def save_npz_deterministic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` as an .npz whose bytes depend only on the arrays."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, npy_bytes(arrays[key]))
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


#: What to run to rewrite an .npz, by the folder it lives in (the DVC stage that writes it).
_WRITERS = (
    ("01_raw", "Place the official MedMNIST file again"),
    ("03_primary", "Re-run `kedro run --pipelines data_ingestion`"),
    ("05_model_input/synthetic", "Re-run `kedro run --pipelines synthetic_generation`"),
    ("05_model_input", "Re-run `kedro run --pipelines data_partition`"),
)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz; a damaged file is a ``CorruptFileError`` naming it and the fix."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as error:
        where = Path(path).as_posix()
        fix = next((hint for folder, hint in _WRITERS if f"/{folder}/" in f"/{where}"), "Re-run the stage that writes it")
        raise corrupt_file(path, ".npz of arrays", error, fix) from error


class NpzDataset(AbstractDataset[dict[str, np.ndarray], dict[str, np.ndarray]]):
    """Loads and saves a dict of arrays as one `.npz` file (local filesystem)."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath)
        if protocol not in ("file", ""):
            raise DatasetError(f"NpzDataset writes local files only, got protocol '{protocol}' in {filepath}.")
        self._filepath = PurePosixPath(path)
        self.metadata = metadata

    def load(self) -> dict[str, np.ndarray]:
        return load_npz(get_filepath_str(self._filepath, "file"))

    def save(self, data: dict[str, np.ndarray]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"NpzDataset saves a dict of arrays, got {type(data).__name__}.")
        save_npz_deterministic(get_filepath_str(self._filepath, "file"), data)

    def _exists(self) -> bool:
        return Path(get_filepath_str(self._filepath, "file")).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
