"""Project pipelines: one per stage, and `__default__` chaining them in data-flow order."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DEFAULT_CHAIN = ("data_ingestion", "data_partition", "synthetic_generation", "federated_training", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    # `kedro run --pipeline X` may load only X; the default chain exists when all its parts do.
    if all(name in pipelines for name in DEFAULT_CHAIN):
        pipelines["__default__"] = sum((pipelines[name] for name in DEFAULT_CHAIN), Pipeline([]))
    return pipelines
