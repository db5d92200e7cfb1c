"""Kedro datasets of the project: deterministic, atomically written files."""

from .npz_dataset import NpzDataset, npy_bytes
from .optional_partitioned_dataset import OptionalPartitionedDataset
from .torch_model_dataset import TorchModelDataset

__all__ = ["NpzDataset", "OptionalPartitionedDataset", "npy_bytes", "TorchModelDataset"]
