"""`federated_training`: client partitions -> a federated run of the chosen method."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
