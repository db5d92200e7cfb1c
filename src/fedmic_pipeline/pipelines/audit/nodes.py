"""Nodes of `audit`: collect the evidence, render it, then (and only then) enforce integrity.

Writing and enforcing are separate nodes on purpose: a run whose data was tampered with
must still leave a complete report behind (that is the evidence), and only afterwards fail
the pipeline so that CI or `dvc repro` notices. Kedro saves a node's outputs as soon as it
finishes, and `enforce_integrity` takes both reports as inputs, so it runs after both are
on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from fedmic_pipeline.audit import collect, render

logger = logging.getLogger(__name__)


class AuditIntegrityError(RuntimeError):
    """A file the audited run used has changed since the run (or is missing, if so configured)."""


def build_audit_report(
    training_tracking: dict[str, Any],
    training_summary: dict[str, Any],
    training_history: pd.DataFrame,
    evaluation_report: dict[str, Any],
    evaluation_metrics: dict[str, Any],
    dataset_info: dict[str, Any],
    partition_manifest: dict[str, Any],
    raw_validation_report: dict[str, Any] | None,
    duplicate_report: dict[str, Any] | None,
    partition_validation_report: dict[str, Any] | None,
    synthetic_manifest: dict[str, Any] | None,
    synthetic_validation_report: dict[str, Any] | None,
    synthetic_quality: dict[str, Any] | None,
    promotion_decision: dict[str, Any] | None,
    parameters: dict[str, Any],
    audit: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report of the run in mlflow_run.json; never raises on a failed check."""
    return collect.build_report(
        training_tracking=training_tracking,
        training_summary=training_summary,
        training_history=training_history,
        evaluation_report=evaluation_report,
        evaluation_metrics=evaluation_metrics,
        dataset_info=dataset_info,
        partition_manifest=partition_manifest,
        raw_validation_report=raw_validation_report,
        duplicate_report=duplicate_report,
        partition_validation_report=partition_validation_report,
        synthetic_manifest=synthetic_manifest,
        synthetic_validation_report=synthetic_validation_report,
        synthetic_quality=synthetic_quality,
        promotion_decision=promotion_decision,
        parameters=parameters,
        audit=audit,
        project_root=Path.cwd(),  # kedro runs from the project root, as the catalog's relative paths assume
    )


def render_audit_html(audit_report: dict[str, Any]) -> str:
    """The same report as one self-contained HTML page (figures embedded)."""
    return render.render_html(audit_report, project_root=Path.cwd())


def enforce_integrity(audit_report: dict[str, Any], audit_report_html: str, audit: dict[str, Any]) -> bool:
    """Fail the run when an input of the audited run changed (`audit.fail_on_tamper`, default
    true) or went missing (`audit.fail_on_missing`), naming the files; the reports are
    already saved when this runs."""
    del audit_report_html  # an ordering dependency: the HTML is on disk before this node runs
    integrity = audit_report["integrity"]
    failures = integrity["failures"]
    missing = integrity["missing_files"]
    problems = []
    if failures and audit.get("fail_on_tamper", True):
        lines = [f"  - {c['subject']}: {c['detail']} (reference: {c['reference']}; expected {c['expected']}, actual {c['actual']})" for c in failures]
        problems.append(f"{len(integrity['changed_files'])} file(s) the run used changed since the run:\n" + "\n".join(lines))
    if missing and audit.get("fail_on_missing", False):
        problems.append(f"{len(missing)} file(s) the run used are missing: {', '.join(missing)}")
    if problems:
        raise AuditIntegrityError(
            f"Audit of run {audit_report['general'].get('mlflow_run_id')} FAILED.\n" + "\n".join(problems) + "\n"
            "The full report is saved (data/08_reporting/audit/audit_report.html and .json). Restore the data "
            "(`dvc checkout`, or `dvc pull`) and run `kedro run --pipelines audit` again; if the change was intended, "
            "train and evaluate again so that a new run records it. To report without failing, set "
            "audit.fail_on_tamper: false (conf/base/parameters_audit.yml)."
        )
    if failures or missing:
        logger.warning("Audit integrity %s (not enforced by configuration): %s", integrity["status"], integrity["changed_files"] + missing)
    else:
        logger.info("Audit integrity %s: every input of the run is unchanged", integrity["status"])
    return True
