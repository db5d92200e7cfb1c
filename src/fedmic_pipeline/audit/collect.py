"""The audit report of one training run, assembled from the evidence in Annex IV order.

The report follows the structure of the technical documentation in Annex IV of the EU AI
Act and cross-references the FDA/Health Canada/MHRA Good Machine Learning Practice
principles, so that someone who did not run the pipeline can check what was trained, on
which data, with which code and parameters, how it was validated, and whether the data on
disk is still the data the run used.

Two design rules:

* An audit runs long after training, possibly on another machine, so every section
  degrades to an explicit "missing"/"unavailable"/"not used" instead of raising. A report
  that stops at the first gap hides every other finding. `OptionalJSONDataset`, the
  catalog's type for evidence that may be absent, is the first step of that.
* Integrity is checked against references recorded *at run time* (see `integrity`). A
  changed file is a FAIL with expected and actual hashes; raising on it is left to a
  separate node that runs after the report is saved (`pipelines/audit/nodes.enforce_integrity`).

This module resolves the run once (`AuditContext`) and puts the sections together; they are
built in `development_sections`, `data_sections`, `results_sections`, `integrity` and
`verdict`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from fedmic_pipeline.audit import standards
from fedmic_pipeline.audit.data_sections import (
    data_gates,
    data_provenance,
    data_versioning,
    read_dvc_lock,
    synthetic_data,
    train_test_independence,
    used_synthetic_data,
)
from fedmic_pipeline.audit.development_sections import (
    code_version,
    environment,
    parameters_section,
    training_process,
)
from fedmic_pipeline.audit.inputs import AuditContext, AuditInputs
from fedmic_pipeline.audit.integrity import model_files, verify_integrity
from fedmic_pipeline.audit.mlflow_view import read_mlflow
from fedmic_pipeline.audit.report_values import json_safe
from fedmic_pipeline.audit.results_sections import (
    figures,
    model_card,
    model_registry,
    validation_and_test,
)
from fedmic_pipeline.audit.verdict import verdict

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class OptionalJSONDataset(AbstractDataset[None, Any]):
    """A read-only JSON file that may be absent: loads as None instead of failing.

    The audit reads evidence that can legitimately be missing (no synthetic data, a gate
    report deleted by hand); the report then says so, rather than the run stopping.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        if not self._filepath.is_file():
            logger.info("Optional audit input %s is absent", self._filepath)
            return None
        return json.loads(self._filepath.read_text())

    def save(self, data: Any) -> None:
        raise DatasetError(
            f"{self._filepath} is a read-only audit view; write it through the catalog entry of the pipeline that produces it."
        )

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "optional": True}


def resolve_context(inputs: AuditInputs, project_root: Path | None = None) -> AuditContext:
    """The run as MLflow holds it (or only its local record), its tags and dvc.lock, read once."""
    root = (project_root or Path.cwd()).resolve()
    paths = dict(inputs.audit.get("paths") or {})
    mlflow_view = read_mlflow(inputs.training_tracking, float(inputs.audit.get("mlflow_timeout_s", 10)))
    local_tags = {str(k): str(v) for k, v in (inputs.training_tracking.get("tags") or {}).items()}
    run_tags = {**local_tags, **(mlflow_view.get("tags") or {})} if mlflow_view.get("available") else local_tags
    return AuditContext(
        project_root=root,
        paths=paths,
        mlflow_view=mlflow_view,
        local_tags=local_tags,
        run_tags=run_tags,
        synthetic_used=used_synthetic_data(inputs.training_summary),
        lock=read_dvc_lock(root / paths.get("dvc_lock", "dvc.lock")),
    )


def build_report(inputs: AuditInputs, *, project_root: Path | None = None) -> dict[str, Any]:
    """The whole report as one JSON-ready dict, sections in Annex IV order."""
    context = resolve_context(inputs, project_root)
    root, paths, mlflow_view, run_tags = context.project_root, context.paths, context.mlflow_view, context.run_tags
    tracking, summary, audit = inputs.training_tracking, inputs.training_summary, inputs.audit
    dataset_info, partition_manifest, synthetic_manifest = inputs.dataset_info, inputs.partition_manifest, inputs.synthetic_manifest

    sections: dict[str, Any] = {}
    sections["code_version"] = code_version(run_tags, root)
    sections["data_versioning"] = data_versioning(context.lock, run_tags)
    sections["parameters"] = parameters_section(mlflow_view, summary, partition_manifest, inputs.parameters)
    sections["environment"] = environment(root / paths.get("requirements_lock", "requirements.lock"), summary, run_tags)
    sections["data_provenance"] = data_provenance(dataset_info, inputs.duplicate_report, root)
    sections["data_gates"] = data_gates(inputs.raw_validation_report, inputs.partition_validation_report,
                                        inputs.synthetic_validation_report, context.synthetic_used)  # fmt: skip
    sections["training_process"] = training_process(summary, inputs.training_history, partition_manifest,
                                                    sections["parameters"]["run_params"], synthetic_manifest)  # fmt: skip
    sections["train_test_independence"] = train_test_independence(
        dataset_info, partition_manifest, sections["data_gates"], sections["data_provenance"]["duplicates_removed"],
        synthetic_manifest, context.synthetic_used,
    )  # fmt: skip
    sections["validation_and_test"] = validation_and_test(inputs.evaluation_report, inputs.evaluation_metrics, summary)
    sections["synthetic_data"] = synthetic_data(summary, synthetic_manifest, inputs.synthetic_validation_report, inputs.synthetic_quality)
    sections["model_registry"] = model_registry(mlflow_view, tracking, inputs.promotion_decision)
    sections["model_card"] = model_card(audit.get("model_card") or {}, dataset_info, partition_manifest, summary,
                                        sections["model_registry"], sections["validation_and_test"])  # fmt: skip
    sections["integrity"] = verify_integrity(inputs, context)
    sections["integrity"]["model_files"] = model_files(root / paths.get("models", "data/06_models"), root)
    general = {
        "mlflow": {k: v for k, v in mlflow_view.items() if k not in ("params", "tags", "metrics", "registry")},
        "mlflow_run_id": tracking.get("mlflow_run_id"),
        "dataset": dataset_info.get("flag"),
        "algorithm": summary.get("algorithm"),
        "registered_model": sections["model_registry"]["registered_model"],
        "model_version": sections["model_registry"]["version"],
        "purpose": (audit.get("model_card") or {}).get("intended_use"),
        "run_tags": {k: v for k, v in run_tags.items() if not k.startswith("dvc.")},
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "report": {
            "title": f"Technical documentation and audit: {dataset_info.get('flag')} / {summary.get('algorithm')} "
                     f"run {tracking.get('mlflow_run_id')}",
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "generator": "fedmic_pipeline.audit (kedro run --pipelines audit)",
            "project_root": str(root),
            "structure": "EU AI Act Annex IV (technical documentation), cross-referenced to the FDA/Health Canada/MHRA "
                         "Good Machine Learning Practice guiding principles (2021)",
            "disclaimer": "An automated research report organised after Annex IV; it is not a conformity assessment, "
                          "and the system is not a medical device.",
        },
        "verdict": verdict(sections, mlflow_view),
        "annex_iv": standards.annex_iv_index(),
        "general": general,
        **sections,
        "gmlp": standards.gmlp_crosswalk(),
        "figures": figures(audit.get("plots") or {}, root),
    }
    report = json_safe(report)
    logger.info(
        "Audit of run %s: %s (integrity %s, %d checks, %d findings)",
        tracking.get("mlflow_run_id"), report["verdict"]["status"], report["integrity"]["status"],
        len(report["integrity"]["checks"]), len(report["verdict"]["findings"]),
    )  # fmt: skip
    return report
