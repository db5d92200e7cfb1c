"""Kedro datasets of the project: deterministic, atomically written files."""

from .npz_dataset import NpzDataset

__all__ = ["NpzDataset"]
