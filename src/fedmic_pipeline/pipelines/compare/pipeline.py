"""`compare`: every chosen method on the same partitions for each lambda, join ratio and seed.

Run it with `kedro run --pipelines compare` (parameters in conf/base/parameters_compare.yml,
e.g. `--params "compare.lambdas=0.1,compare.seeds=0 1 2"`). It reads the validated
dataset from the ingestion stage and partitions in memory, so it leaves the default
partition untouched.
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.run_comparison,
                inputs=[
                    "validated_dataset",
                    "dataset_info",
                    "params:partition",
                    "params:devices",
                    "params:training",
                    "params:algorithm_params",
                    "params:evaluation",
                    "params:compare",
                ],
                outputs=["comparison_runs", "comparison_curves"],
                name="run_comparison",
            ),
            node(nodes.comparison_table, "comparison_runs", ["comparison_summary", "comparison_markdown"], name="comparison_table"),
            node(
                nodes.comparison_findings,
                "comparison_runs",
                ["comparison_differences", "comparison_findings"],
                name="comparison_findings",
            ),
            node(nodes.plot_accuracy_per_round, "comparison_curves", "comparison_rounds_plot", name="plot_accuracy_per_round"),
            node(
                nodes.plot_accuracy_vs_communication,
                "comparison_runs",
                "comparison_communication_plot",
                name="plot_accuracy_vs_communication",
            ),
        ]
    )
