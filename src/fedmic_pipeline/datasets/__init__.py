"""Kedro datasets of the project: deterministic, atomically written files and folders."""

from .atomic_file_datasets import AtomicCSVDataset, AtomicJSONDataset
from .atomic_partitioned_dataset import AtomicPartitionedDataset
from .npz_dataset import NpzDataset, npy_bytes
from .optional_partitioned_dataset import OptionalPartitionedDataset
from .torch_model_dataset import TorchModelDataset

__all__ = [
    "AtomicCSVDataset",
    "AtomicJSONDataset",
    "AtomicPartitionedDataset",
    "NpzDataset",
    "OptionalPartitionedDataset",
    "TorchModelDataset",
    "npy_bytes",
]
