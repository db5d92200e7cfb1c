"""`data_partition`: validated dataset -> gated, device-rendered client files and reports.

Order matters for the data gate: the plan and its placement table are checked, and the
gate must pass, before the node that renders and writes any client array runs (it takes
`partition_gate_passed` as an input, so Kedro cannot schedule it earlier).
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.build_partition_plan,
                inputs=["validated_dataset", "dataset_info", "params:partition", "params:devices"],
                outputs="partition_plan",
                name="build_partition_plan",
            ),
            node(
                nodes.build_placement_table,
                inputs=["validated_dataset", "partition_plan", "params:devices"],
                outputs=["partition_placement", "global_test_hashes"],
                name="build_placement_table",
            ),
            node(
                nodes.validate_partition_placement,
                inputs=["partition_placement", "partition_plan", "global_test_hashes", "params:partition", "params:partition_gate"],
                outputs="partition_validation_report",
                name="validate_partition",
            ),
            node(
                nodes.enforce_partition_gate,
                inputs="partition_validation_report",
                outputs="partition_gate_passed",
                name="enforce_partition_gate",
            ),
            node(
                nodes.materialise_partition,
                inputs=[
                    "validated_dataset",
                    "dataset_info",
                    "partition_plan",
                    "params:partition",
                    "params:devices",
                    "partition_gate_passed",
                ],
                outputs=["client_partitions", "global_test_set", "partition_manifest", "partition_counts"],
                name="materialise_partition",
            ),
            node(
                nodes.plot_class_by_client,
                inputs=["partition_counts", "dataset_info", "params:partition"],
                outputs="class_client_bubble_plot",
                name="plot_class_by_client",
            ),
            node(
                nodes.plot_device_by_client,
                inputs=["partition_counts", "params:partition", "params:devices"],
                outputs="device_client_plot",
                name="plot_device_by_client",
            ),
            node(
                nodes.plot_device_examples,
                inputs=["global_test_set", "dataset_info", "params:devices"],
                outputs="device_examples_plot",
                name="plot_device_examples",
            ),
        ],
        tags="data_partition",
    )
