"""`data_ingestion`: raw MedMNIST file -> image manifest -> raw-data gate -> validated dataset.

The gate is a node of its own (`enforce_data_gate`) whose output the dedup node needs, so
a failed gate leaves its JSON report on disk and stops the run before `validated_dataset`.
"""

from kedro.pipeline import Pipeline, node

from .nodes import (
    build_image_manifest,
    enforce_data_gate,
    load_raw_dataset,
    remove_test_duplicates,
    validate_raw_data,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                load_raw_dataset,
                inputs=["params:dataset", "params:ingestion"],
                outputs=["raw_dataset", "dataset_info"],
                name="load_raw_dataset",
            ),
            node(build_image_manifest, inputs="raw_dataset", outputs="image_manifest", name="build_image_manifest"),
            node(
                validate_raw_data,
                inputs=["image_manifest", "dataset_info", "params:ingestion"],
                outputs="raw_validation_report",
                name="validate_raw_data",
            ),
            node(enforce_data_gate, inputs="raw_validation_report", outputs="raw_gate_passed", name="enforce_data_gate"),
            node(
                remove_test_duplicates,
                inputs=["raw_dataset", "image_manifest", "raw_gate_passed"],
                outputs=["validated_dataset", "duplicate_report"],
                name="remove_test_duplicates",
            ),
        ]
    )
