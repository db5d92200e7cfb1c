"""fedmic-pipeline: federated medical image classification (FedMIC, FedSSG) as a Kedro project."""

__version__ = "0.1.0"
