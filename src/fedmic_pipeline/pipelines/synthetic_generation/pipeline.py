"""`synthetic_generation`: partition -> federated generator -> plan -> gated synthetic sets.

Order matters for the data gate, as in data_partition: the sampled sets stay in memory
(`synthetic_candidate_sets`, no catalog entry) until the gate has checked them; the node
that writes `synthetic_client_sets` takes `synthetic_gate_passed` as an input, so Kedro
cannot schedule it earlier. Quality metrics and the sample grid are evaluation-only
branches: no other node reads their outputs.
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.train_synthetic_generator,
                inputs=["client_partitions", "partition_manifest", "params:synthetic"],
                outputs=["synthetic_generator", "synthetic_generator_training"],
                name="train_synthetic_generator",
            ),
            node(
                nodes.compute_synthesis_plan,
                inputs=["client_partitions", "partition_manifest", "params:synthetic"],
                outputs="synthesis_plan",
                name="compute_synthesis_plan",
            ),
            node(
                nodes.sample_synthetic_sets,
                inputs=["synthetic_generator", "synthesis_plan", "partition_manifest", "params:synthetic"],
                outputs="synthetic_candidate_sets",
                name="sample_synthetic_sets",
            ),
            node(
                nodes.validate_synthetic_sets,
                inputs=[
                    "synthetic_candidate_sets",
                    "synthesis_plan",
                    "client_partitions",
                    "global_test_set",
                    "partition_manifest",
                    "params:synthetic",
                ],
                outputs="synthetic_validation_report",
                name="validate_synthetic_sets",
            ),
            node(
                nodes.enforce_synthetic_gate,
                inputs="synthetic_validation_report",
                outputs="synthetic_gate_passed",
                name="enforce_synthetic_gate",
            ),
            node(
                nodes.publish_synthetic_sets,
                inputs=[
                    "synthetic_candidate_sets",
                    "synthetic_generator",
                    "synthesis_plan",
                    "synthetic_validation_report",
                    "params:synthetic",
                    "synthetic_gate_passed",
                ],
                outputs=["synthetic_client_sets", "synthetic_manifest"],
                name="publish_synthetic_sets",
            ),
            node(
                nodes.evaluate_synthetic_quality,
                inputs=["synthetic_generator", "client_partitions", "global_test_set", "partition_manifest", "params:synthetic"],
                outputs=["synthetic_quality", "synthetic_quality_table", "synthetic_quality_summary"],
                name="evaluate_synthetic_quality",
            ),
            node(
                nodes.plot_synthetic_grid,
                inputs=["synthetic_generator", "global_test_set", "partition_manifest", "params:synthetic"],
                outputs="synthetic_sample_grid",
                name="plot_synthetic_grid",
            ),
        ],
        tags="synthetic_generation",
    )
