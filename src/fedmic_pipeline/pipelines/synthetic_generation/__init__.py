"""`synthetic_generation`: FedSSG's federated generator, synthesis plan, gated synthetic sets, quality."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
