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

from fedmic_pipeline.audit import collect, render
from fedmic_pipeline.audit.inputs import AuditInputs

logger = logging.getLogger(__name__)


class AuditIntegrityError(RuntimeError):
    """A file the audited run used has changed since the run (or is missing, if so configured)."""


def build_audit_report(**inputs: Any) -> dict[str, Any]:
    """The JSON report of the run in mlflow_run.json; never raises on a failed check.

    `inputs` are the fields of `AuditInputs`, named in the pipeline's input mapping.
    """
    # kedro runs from the project root, as the catalog's relative paths assume
    return collect.build_report(AuditInputs(**inputs), project_root=Path.cwd())


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
