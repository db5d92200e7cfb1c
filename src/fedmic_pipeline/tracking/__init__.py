"""Lineage and MLflow tracking: what links a model to its data, code and parameters."""
