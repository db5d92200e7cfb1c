"""`ablation`: FedSSG synthetic data vs none vs classical augmentation."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
