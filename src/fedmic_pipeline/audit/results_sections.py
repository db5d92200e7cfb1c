"""Report sections on what the model achieved and where it went (EU AI Act Annex IV 2(g), 3, 4).

Validation and test results as evaluation measured them, the registry version and its
promotion decision, the model card built from both, and the figures the page embeds
(hashed, since an embedded image is evidence too).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from fedmic_pipeline.hashing import file_digest
from fedmic_pipeline.audit.report_values import format_number


def _metric_block(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not metrics:
        return None
    keys = ("n", "accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece", "top_class_share", "constant_predictor")
    block = {k: metrics.get(k) for k in keys}
    block["ci"] = metrics.get("ci") or {}
    return block


def validation_and_test(evaluation_report: Mapping[str, Any], evaluation_metrics: Mapping[str, Any], training_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Results as evaluation measured them: global (with 95% CIs), per site, class, device."""
    g = evaluation_report.get("global")
    names = evaluation_report.get("class_names") or []
    held_out = evaluation_report.get("held_out_device")
    sites = evaluation_report.get("sites") or []
    summary = evaluation_report.get("site_summary") or {}
    per_class = []
    for k, name in enumerate(names):
        recalls = [s["per_class_recall"][k] for s in sites if s.get("per_class_recall") and s["per_class_recall"][k] is not None
                   and not (isinstance(s["per_class_recall"][k], float) and math.isnan(s["per_class_recall"][k]))]  # fmt: skip
        per_class.append(
            {
                "class": name,
                "global_recall": g["per_class_recall"][k] if g else None,
                "global_recall_ci": (g.get("per_class_recall_ci") or [None] * len(names))[k] if g else None,
                "personalized_mean_recall": sum(recalls) / len(recalls) if recalls else None,
                "personalized_worst_recall": min(recalls) if recalls else None,
            }
        )
    devices = [
        {"device": name, "held_out": name == held_out, **_metric_block(m)}
        for name, m in sorted((evaluation_report.get("global_by_device") or {}).items())
    ]
    unseen_summary = evaluation_report.get("personalized_on_unseen_device_summary")
    totals = training_summary.get("totals") or {}
    return {
        "n_bootstrap": (g or (sites[0] if sites else {})).get("n_bootstrap"),
        "ci_level": (g or (sites[0] if sites else {})).get("ci_level", 0.95),
        "ci_method": "percentile bootstrap over test images",
        "global_model": None if g is None else {**_metric_block(g), "confusion_matrix": g.get("confusion_matrix")},
        "per_class": per_class,
        "per_site": {
            "model": "each hospital's personalized model on its own local test split",
            "summary": summary or None,
            "sites": [{"client_id": s.get("client_id"), "device_id": s.get("device_id"), **_metric_block(s)} for s in sites],
        },
        "per_device": {"model": "global model on the global test set as each device renders it", "held_out_device": held_out, "devices": devices},
        "unseen_device": {
            "device": held_out,
            "global_model": next((d for d in devices if d["held_out"]), None),
            "personalized_summary": unseen_summary,
        },
        "calibration": {
            "metric": "expected calibration error (ECE), 15 equal-width confidence bins; lower is better",
            "global": None if g is None else {"ece": g.get("ece"), "ci": (g.get("ci") or {}).get("ece")},
            "personalized_mean": (summary.get("mean") or {}).get("ece") if summary else None,
            "personalized_worst": (summary.get("worst") or {}).get("ece") if summary else None,
            "per_device": {d["device"]: d["ece"] for d in devices},
        },
        "communication": {
            "bytes_up_total": totals.get("bytes_up_total"),
            "bytes_down_total": totals.get("bytes_down_total"),
            "bytes_dense_total": totals.get("bytes_dense_total"),
            "compression_ratio": totals.get("compression_ratio"),
            "mb_up_per_client_per_round": training_summary.get("mb_up_per_client_per_round"),
            "mb_down_per_client_per_round": training_summary.get("mb_down_per_client_per_round"),
        },
        "headline_metrics": dict(evaluation_metrics),
    }


def model_registry(mlflow_view: Mapping[str, Any], training_tracking: Mapping[str, Any], promotion_decision: Mapping[str, Any] | None) -> dict[str, Any]:
    registered = training_tracking.get("registered") or {}
    registry = (mlflow_view.get("registry") or {}) if mlflow_view.get("available") else {}
    tags = registry.get("version_tags") or {}
    decision = promotion_decision if promotion_decision and str(promotion_decision.get("version")) == str(registered.get("version")) \
        and promotion_decision.get("registered_model") == registered.get("registered_model") else None  # fmt: skip
    alias = ((promotion_decision or {}).get("rule") or {}).get("alias", "champion")
    return {
        "registered_model": registered.get("registered_model"),
        "version": None if registered.get("version") is None else str(registered.get("version")),
        "model_uri": registered.get("model_uri"),
        "registry_available": bool(registry),
        "aliases_of_this_version": registry.get("aliases_of_this_version"),
        "aliases_of_model": registry.get("aliases_of_model"),
        "is_champion": None if not registry else alias in (registry.get("aliases_of_this_version") or []),
        "promotion_tags": {k: v for k, v in tags.items() if k.startswith(("promotion.", "data."))},
        "promotion_decision": decision,
        "promotion_decision_note": None if decision else (
            "no promotion decision recorded for this version (promotion_decision.json is missing or belongs to another run)"
        ),
    }


def model_card(card: Mapping[str, Any], dataset_info: Mapping[str, Any], partition_manifest: Mapping[str, Any],
               training_summary: Mapping[str, Any], registry: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    g = results.get("global_model") or {}
    site = (results.get("per_site") or {}).get("summary") or {}
    unseen = (results.get("unseen_device") or {}).get("global_model") or {}
    facts = [
        (
            f"{training_summary.get('num_clients')} simulated hospitals; Dirichlet label skew "
            f"lambda={((partition_manifest.get('parameters') or {}).get('partition') or {}).get('dirichlet_lambda')}"
        ),
        (
            f"imaging devices (simulated): {', '.join(partition_manifest.get('devices') or [])}; "
            f"held out from training: {partition_manifest.get('held_out_device')}"
        ),
    ]
    performance = []
    if g:
        ci = (g.get("ci") or {}).get("accuracy") or [None, None]
        performance.append(_fmt_line("global model balanced accuracy", g.get("balanced_accuracy"), (g.get("ci") or {}).get("balanced_accuracy")))
        performance.append(_fmt_line("global model macro AUC", g.get("macro_auc"), (g.get("ci") or {}).get("macro_auc")))
        performance.append(_fmt_line("global model accuracy", g.get("accuracy"), ci))
        performance.append(_fmt_line("global model ECE", g.get("ece"), (g.get("ci") or {}).get("ece")))
        if g.get("constant_predictor"):
            performance.append(f"CONSTANT PREDICTOR: one class for {format_number(g.get('top_class_share'))} of the global test set")
    if site:
        performance.append(
            f"personalized models ({site.get('num_sites')} sites, {site.get('num_constant_sites', 0)} constant): mean balanced "
            f"accuracy {format_number(site['mean'].get('balanced_accuracy'))}, worst site {format_number(site['worst'].get('balanced_accuracy'))} "
            f"(client {site.get('worst_site', {}).get('balanced_accuracy')})"
        )
    if unseen:
        performance.append(_fmt_line(f"global model on the unseen device ({unseen.get('device')})", unseen.get("accuracy"), (unseen.get("ci") or {}).get("accuracy")))
    return {
        "model_details": {
            "name": registry.get("registered_model"),
            "version": registry.get("version"),
            "algorithm": training_summary.get("algorithm"),
            "architecture": (training_summary.get("algorithm_config") or {}).get("model"),
            "input": f"{dataset_info.get('size', 28)}x{dataset_info.get('size', 28)} images, {dataset_info.get('n_channels')} channel(s), uint8",
            "output": f"probabilities over {dataset_info.get('n_classes')} classes: "
                      + ", ".join(f"{k} = {v}" for k, v in sorted((dataset_info.get("label_names") or {}).items())),
            "training_data": f"{dataset_info.get('flag')} (MedMNIST v2), official train+val split partitioned over simulated hospitals",
            "federation": facts,
            "licence_of_data": dataset_info.get("license") or "CC BY 4.0",
        },
        "intended_use": card.get("intended_use"),
        "out_of_scope": card.get("out_of_scope"),
        "not_for_clinical_use": True,
        "performance_summary": performance,
        "limitations": list(card.get("limitations") or []),
        "ethical_considerations": list(card.get("ethical_considerations") or []),
        "caveats": list(card.get("caveats") or []),
    }


def _fmt_line(label: str, value: Any, ci: Sequence[Any] | None) -> str:
    ci = ci or [None, None]
    return f"{label}: {format_number(value)} (95% CI {format_number(ci[0])}-{format_number(ci[1])})"


def figures(plots: Mapping[str, Sequence[str]], project_root: Path) -> dict[str, list[dict[str, Any]]]:
    """The PNGs to embed, per report section, with their hashes (an embedded image is evidence too)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for section, patterns in (plots or {}).items():
        entries = []
        for pattern in patterns or []:
            matches = sorted(glob.glob(str(project_root / pattern)))
            if not matches:
                entries.append({"path": pattern, "present": False})
            for match in matches:
                path = Path(match)
                entries.append({
                    "path": PurePosixPath(path.relative_to(project_root)).as_posix() if path.is_relative_to(project_root) else match,
                    "present": True, "bytes": path.stat().st_size, "sha256": file_digest(path, "sha256"),
                    "modified": datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds"),
                })  # fmt: skip
        out[section] = entries
    return out
