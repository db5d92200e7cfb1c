"""`ablation`: `kedro run --pipelines ablation` (parameters in parameters_ablation.yml)."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.run_ablation,
                inputs=[
                    "validated_dataset",
                    "dataset_info",
                    "params:partition",
                    "params:devices",
                    "params:synthetic",
                    "params:training",
                    "params:algorithm_params",
                    "params:evaluation",
                    "params:ablation",
                ],
                outputs="ablation_runs",
                name="run_ablation",
            ),
            node(
                nodes.ablation_table,
                "ablation_runs",
                ["ablation_summary", "ablation_markdown", "ablation_differences"],
                name="ablation_table",
            ),
            node(nodes.plot_ablation, "ablation_runs", "ablation_plot", name="plot_ablation"),
        ]
    )
