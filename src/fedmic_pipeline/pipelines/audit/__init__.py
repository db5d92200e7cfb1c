"""`audit`: the technical-documentation report of the latest run, and its data integrity."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
