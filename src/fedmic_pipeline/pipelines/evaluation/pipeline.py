"""`evaluation`: models -> report, headline metrics (DVC metrics), tables, plots, MLflow.

`evaluate_federation` and `promote_champion` take the training summary and the partition
manifest: models edited since training, or trained on another partition, are refused.
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.evaluate_federation,
                inputs=[
                    "trained_models",
                    "training_summary",
                    "client_partitions",
                    "global_test_set",
                    "dataset_info",
                    "partition_manifest",
                    "params:evaluation",
                ],
                outputs="evaluation_report",
                name="evaluate_federation",
            ),
            node(nodes.summarize_metrics, ["evaluation_report", "training_summary"], "evaluation_metrics", name="summarize_metrics"),
            node(nodes.site_table, "evaluation_report", "site_metrics", name="site_table"),
            node(nodes.device_table, "evaluation_report", "device_metrics", name="device_table"),
            node(nodes.class_table, "evaluation_report", "class_metrics", name="class_table"),
            node(
                nodes.plot_training_curves,
                ["training_history", "training_summary"],
                "training_curves_plot",
                name="plot_training_curves",
            ),
            node(
                nodes.plot_site_metrics,
                ["site_metrics", "device_metrics", "training_summary"],
                "site_metrics_plot",
                name="plot_site_metrics",
            ),
            node(nodes.plot_confusion_matrix, "evaluation_report", "confusion_matrix_plot", name="plot_confusion_matrix"),
            node(nodes.plot_reliability, "evaluation_report", "reliability_plot", name="plot_reliability"),
            node(
                nodes.track_evaluation,
                [
                    "evaluation_metrics",
                    "evaluation_report",
                    "training_tracking",
                    "training_history",
                    "site_metrics",
                    "device_metrics",
                    "training_summary",
                ],
                "evaluation_tracking",
                name="track_evaluation",
            ),
            node(
                nodes.promote_champion,
                [
                    "evaluation_metrics",
                    "training_tracking",
                    "evaluation_tracking",
                    "training_summary",
                    "partition_manifest",
                    "params:promotion",
                ],
                "promotion_decision",
                name="promote_champion",
            ),
        ]
    )
