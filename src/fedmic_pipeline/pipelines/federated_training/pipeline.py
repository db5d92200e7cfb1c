"""`federated_training`: partitions -> models, per-round curves, bytes, MLflow run."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.train_federated,
                inputs=[
                    "client_partitions",
                    "dataset_info",
                    "params:training",
                    "params:algorithm_params",
                    "synthetic_client_sets",
                ],
                outputs=["trained_models", "training_history", "communication_log", "training_summary"],
                name="train_federated",
            ),
            node(
                nodes.track_training,
                inputs=[
                    "training_history",
                    "training_summary",
                    "trained_models",
                    "dataset_info",
                    "partition_manifest",
                    "params:training",
                ],
                outputs="training_tracking",
                name="track_training",
            ),
        ]
    )
