"""Federated partition stage: Dirichlet label skew, imaging devices, data gate, reports."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
