"""A Kedro dataset for trained torch models, stored as architecture + weights.

Only the state dict and the recipe to rebuild the module (architecture name, data spec,
keyword arguments) are written, never a pickled module, so a file can be loaded by a
newer version of the code and audited without executing arbitrary pickles.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path

from .atomic import write_bytes_atomically
from .corrupt import corrupt_file


class TorchModelDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """Saves/loads `{"architecture": str, "spec": dict, "kwargs": dict, "state_dict": ...}`."""

    REQUIRED_KEYS = ("architecture", "spec", "state_dict")

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        protocol, path = get_protocol_and_path(filepath)
        if protocol not in ("file", ""):
            raise DatasetError(f"TorchModelDataset writes local files only, got '{protocol}' in {filepath}.")
        self._filepath = PurePosixPath(path)
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        import pickle

        import torch

        path = get_filepath_str(self._filepath, "file")
        fix = "Re-run `kedro run --pipelines federated_training`"
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
            raise corrupt_file(path, "model record (torch.save of architecture + weights)", error, fix) from error
        missing = [key for key in self.REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise corrupt_file(path, "model record", KeyError(f"no {missing}"), fix)
        return record

    def save(self, data: dict[str, Any]) -> None:
        import torch

        missing = [key for key in self.REQUIRED_KEYS if key not in data]
        if missing:
            raise DatasetError(f"A model record needs keys {self.REQUIRED_KEYS}; missing {missing}.")
        buffer = io.BytesIO()  # torch.save names the archive after its file: save to memory for stable bytes
        torch.save(data, buffer)
        write_bytes_atomically(Path(get_filepath_str(self._filepath, "file")), buffer.getvalue())

    def _exists(self) -> bool:
        return Path(get_filepath_str(self._filepath, "file")).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
