"""`federated_training`: partitions -> models, per-round curves, bytes, MLflow run.

`discard_checkpoint` runs only after Kedro has saved the models and the summary, so a run
that fails while saving keeps its checkpoint and can be resumed.
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.train_federated,
                inputs=[
                    "client_partitions",
                    "partition_manifest",
                    "dataset_info",
                    "params:training",
                    "params:algorithm_params",
                    "synthetic_client_sets",
                ],
                outputs=["trained_models", "training_history", "communication_log", "training_summary"],
                name="train_federated",
            ),
            node(
                nodes.discard_checkpoint,
                inputs=["trained_models", "training_summary", "params:training"],
                outputs=None,
                name="discard_checkpoint",
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
