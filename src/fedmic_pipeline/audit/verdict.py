"""One status for the whole audit, and the findings behind it, most severe first.

Read by someone deciding whether the results can be trusted: every FAIL or WARN any
section raised is restated here as one sentence naming its section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmic_pipeline.audit.report_values import FAIL, MISSING, PASS, WARN, format_number


def verdict(sections: Mapping[str, Mapping[str, Any]], mlflow_view: Mapping[str, Any]) -> dict[str, Any]:
    """One status for the report and the findings behind it, most severe first."""
    findings: list[dict[str, str]] = []
    integrity = sections["integrity"]
    for check in integrity["failures"]:
        findings.append({"severity": FAIL, "section": "integrity",
                         "message": f"{check['subject']} changed since the run ({check['reference']}): expected {check['expected']}, actual {check['actual']}"})  # fmt: skip
    for check in integrity["unverifiable"]:
        findings.append({"severity": WARN, "section": "integrity",
                         "message": f"{check['subject']} cannot be tied to the run: the run recorded no {check['reference'].split(' (')[0].removeprefix('run tag ')}"})  # fmt: skip
    for subject in integrity["missing_files"]:
        findings.append({"severity": WARN, "section": "integrity", "message": f"{subject} is missing: it cannot be re-hashed"})
    for check in integrity["warnings"]:
        findings.append({"severity": WARN, "section": "integrity",
                         "message": f"{check['subject']} ({check['role']}) {check['detail'] or 'differs'}: expected {check['expected']}, actual {check['actual']}"})  # fmt: skip
    for name in ("raw_data", "partition", "synthetic"):
        gate = sections["data_gates"][name]
        if gate["status"] == FAIL:
            findings.append({"severity": FAIL, "section": "data_gates", "message": f"the {gate['name']} data gate failed"})
        elif gate["status"] == MISSING:
            findings.append({"severity": WARN, "section": "data_gates", "message": f"the {gate['name']} data gate report is missing"})
    for check in sections["train_test_independence"]["checks"]:
        if check["status"] in (FAIL, MISSING):
            findings.append({"severity": FAIL if check["status"] == FAIL else WARN, "section": "train_test_independence",
                             "message": f"{check['check']}: {check['evidence']}"})  # fmt: skip
    if sections["data_provenance"]["status"] == FAIL:
        findings.append({"severity": FAIL, "section": "data_provenance", "message": "the raw file's md5 was not verified against the official release"})
    for message in sections["code_version"]["findings"]:
        findings.append({"severity": WARN, "section": "code_version", "message": message})
    drift = sections["parameters"]["config_drift"]
    if drift["changed"]:
        keys = ", ".join(d["key"] for d in drift["changed"][:8]) + (" ..." if len(drift["changed"]) > 8 else "")
        findings.append({"severity": WARN, "section": "parameters",
                         "message": f"{len(drift['changed'])} parameter(s) in conf/ differ from the run's: {keys} (re-running now would not reproduce it)"})  # fmt: skip
    if drift["added_since_run"]:
        keys = ", ".join(d["key"] for d in drift["added_since_run"][:8]) + (" ..." if len(drift["added_since_run"]) > 8 else "")
        findings.append({"severity": WARN, "section": "parameters",
                         "message": f"{len(drift['added_since_run'])} parameter(s) were added to conf/ since the run: {keys}"})  # fmt: skip
    g = sections["validation_and_test"].get("global_model")
    for row in sections["validation_and_test"]["per_class"]:
        if g and row.get("global_recall") == 0:
            findings.append({"severity": WARN, "section": "validation_and_test",
                             "message": f"the global model never predicts class '{row['class']}' (recall 0 on the global test set): "
                                        f"balanced accuracy {format_number(g.get('balanced_accuracy'))} despite accuracy {format_number(g.get('accuracy'))}"})  # fmt: skip
    if g and g.get("constant_predictor"):
        findings.append({"severity": FAIL, "section": "validation_and_test",
                         "message": f"the global model is a constant predictor: {format_number(g.get('top_class_share'))} of the global "
                                    "test set gets one class; it must not be deployed"})  # fmt: skip
    site_summary = (sections["validation_and_test"].get("per_site") or {}).get("summary") or {}
    if site_summary.get("num_constant_sites"):
        findings.append({"severity": WARN, "section": "validation_and_test",
                         "message": f"{site_summary['num_constant_sites']} of {site_summary.get('num_sites')} personalized "
                                    "models predict one class for at least 95 % of their local test split"})  # fmt: skip
    if not mlflow_view.get("available"):
        findings.append({"severity": WARN, "section": "general", "message": f"MLflow run unavailable ({mlflow_view.get('error')}): parameters and registry taken from local files"})
    if sections["environment"]["packages_differing_from_lock"]:
        findings.append({"severity": WARN, "section": "environment",
                         "message": f"installed versions differ from requirements.lock: {sections['environment']['packages_differing_from_lock']}"})  # fmt: skip
    if sections["synthetic_data"]["status"] in (FAIL, MISSING):
        findings.append({"severity": FAIL if sections["synthetic_data"]["status"] == FAIL else WARN, "section": "synthetic_data",
                         "message": sections["synthetic_data"].get("statement", "synthetic data gate failed")})  # fmt: skip
    order = {FAIL: 0, WARN: 1}
    findings.sort(key=lambda f: order.get(f["severity"], 2))
    status = FAIL if any(f["severity"] == FAIL for f in findings) else (WARN if findings else PASS)
    return {
        "status": status,
        "integrity_status": integrity["status"],
        "tampered_files": integrity["changed_files"],
        "missing_files": integrity["missing_files"],
        "summary": {
            PASS: "Every file the run used is unchanged, every data gate passed and the evidence is complete.",
            WARN: "No file the run used has changed, but some evidence is missing or differs from today's setup (see findings).",
            FAIL: "A file the run used has changed since the run, or a data gate or independence check failed: "
                  "the results below cannot be attributed to the data on disk.",
        }[status],
        "findings": findings,
    }
