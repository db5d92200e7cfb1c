"""`evaluation`: trained models -> metrics with intervals per site, device and class."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
