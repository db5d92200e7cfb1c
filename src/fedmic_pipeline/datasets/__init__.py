"""Kedro datasets of the project: deterministic, atomically written files."""

from .npz_dataset import NpzDataset, npy_bytes
from .torch_model_dataset import TorchModelDataset

__all__ = ["NpzDataset", "npy_bytes", "TorchModelDataset"]
