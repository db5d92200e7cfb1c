"""`audit`: latest run's evidence -> audit_report.json -> audit_report.html -> integrity gate.

Not part of `__default__`: run it after training and evaluation (`kedro run --pipelines
audit`). Its optional inputs (`audit_*` catalog entries in catalog_audit.yml) are read-only
views of files other pipelines write, so run it on its own, not in the same `kedro run`
as the pipelines that produce them.
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.build_audit_report,
                inputs={
                    "training_tracking": "training_tracking",
                    "training_summary": "training_summary",
                    "training_history": "training_history",
                    "evaluation_report": "evaluation_report",
                    "evaluation_metrics": "evaluation_metrics",
                    "dataset_info": "dataset_info",
                    "partition_manifest": "partition_manifest",
                    "raw_validation_report": "audit_raw_validation_report",
                    "duplicate_report": "audit_duplicate_report",
                    "partition_validation_report": "audit_partition_validation_report",
                    "synthetic_manifest": "audit_synthetic_manifest",
                    "synthetic_validation_report": "audit_synthetic_validation_report",
                    "synthetic_quality": "audit_synthetic_quality",
                    "promotion_decision": "audit_promotion_decision",
                    "parameters": "parameters",
                    "audit": "params:audit",
                },
                outputs="audit_report",
                name="build_audit_report",
            ),
            node(nodes.render_audit_html, "audit_report", "audit_report_html", name="render_audit_html"),
            node(
                nodes.enforce_integrity,
                ["audit_report", "audit_report_html", "params:audit"],
                "audit_integrity_ok",
                name="enforce_integrity",
            ),
        ]
    )
