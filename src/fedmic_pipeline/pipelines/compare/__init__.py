"""`compare`: methods x Dirichlet lambda x seeds, side by side."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
