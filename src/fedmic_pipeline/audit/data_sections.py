"""Report sections on the data (EU AI Act Annex IV 2(d)): provenance, versions, gates, independence.

Each function turns the evidence one stage left behind (dataset_info, the duplicate and
data-gate reports, dvc.lock, the partition and synthetic manifests) into one JSON-ready
section with a status; absent evidence gives MISSING or NOT USED, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedmic_pipeline.audit.report_values import (
    FAIL,
    MISSING,
    NOT_USED,
    PASS,
    WARN,
    json_safe,
)
from fedmic_pipeline.datasets.corrupt import corrupt_file

MEDMNIST_CITATION = (
    'Yang, J. et al. "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image '
    'classification", Scientific Data 10, 41 (2023)'
)
ORIGINAL_SOURCES = {
    "pneumoniamnist": "Kermany, D. S. et al., Cell 172(5), 2018 (paediatric chest X-rays, Guangzhou)",
    "breastmnist": "Al-Dhabyani, W. et al., Data in Brief 28, 2020 (breast ultrasound)",
    "bloodmnist": "Acevedo, A. et al., Data in Brief 30, 2020 (blood cell microscopy)",
    "dermamnist": "Tschandl, P. et al., Scientific Data 5, 2018 (HAM10000 dermatoscopy)",
    "pathmnist": "Kather, J. N. et al., PLOS Medicine 16(1), 2019 (colorectal histology)",
    "octmnist": "Kermany, D. S. et al., Cell 172(5), 2018 (retinal OCT)",
}


def used_synthetic_data(training_summary: Mapping[str, Any]) -> bool:
    """Synthetic images reached the model: in the hospitals' training splits, or in the
    server's pretraining before round 1."""
    return training_summary.get("extra_training_data", "none") == "synthetic" or bool(training_summary.get("pretraining"))


def _synthetic_statement(training_summary: Mapping[str, Any]) -> str:
    in_training = training_summary.get("extra_training_data", "none") == "synthetic"
    pretraining = training_summary.get("pretraining")
    parts = ["synthetic images were appended to each client's training split"] if in_training else []
    if pretraining:
        parts.append(
            f"the server pretrained the shared model on {pretraining.get('samples')} synthetic images for "
            f"{pretraining.get('epochs')} epoch(s) before round 1 (initial model sha256 "
            f"{str(pretraining.get('initial_digest', '?'))[:12]} -> {str(pretraining.get('pretrained_digest', '?'))[:12]})"
        )
    return "used: " + "; ".join(parts)


_MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


def read_dvc_lock(path: Path) -> dict[str, Any] | None:
    """dvc.lock, or None without one; a damaged lock (unparseable, truncated mid-entry, a hash
    that is not one) is a ``CorruptFileError``: the audit cannot vouch for data it cannot read."""
    if not path.is_file():
        return None
    fix = "Restore it with `git checkout dvc.lock`, or rebuild it with `dvc repro`"
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise corrupt_file(path, "dvc.lock (YAML)", error, fix) from error
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise corrupt_file(path, "dvc.lock", ValueError("no 'stages' mapping"), fix)
    for stage, record in stages.items():
        entries = [*(record.get("deps") or []), *(record.get("outs") or [])] if isinstance(record, dict) else None
        if entries is None or "cmd" not in record:
            raise corrupt_file(path, "dvc.lock", ValueError(f"stage '{stage}' has no cmd"), fix)
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not _MD5.match(str(entry.get("md5", ""))):
                raise corrupt_file(path, "dvc.lock", ValueError(f"stage '{stage}': entry {entry!r} lacks a path or an md5"), fix)
    return lock


def data_category(path: str) -> str:
    p = path.lower()
    if "synthe" in p:
        return "synthetic_sets"
    if p.startswith(("data/01_raw", "data/02_", "data/03_")):
        return "raw_and_validated_data"
    if p.startswith("data/05_model_input"):
        return "partitions"
    if p.startswith("data/06_models"):
        return "models"
    return "reports"


def data_versioning(lock: Mapping[str, Any] | None, run_tags: Mapping[str, str]) -> dict[str, Any]:
    """dvc.lock's hashes per kind of data, what the lock recorded when the run trained (a run
    made by `dvc repro` only), and the md5 of every file the run read (its own record)."""
    groups: dict[str, list[dict[str, Any]]] = {k: [] for k in ("raw_and_validated_data", "partitions", "synthetic_sets", "models", "reports")}
    current: dict[str, str] = {}
    stages = (lock or {}).get("stages") or {}
    for stage, record in stages.items():
        for dep in record.get("deps", []) or []:
            if str(dep.get("path", "")).startswith("data/01_raw") and "md5" in dep:
                groups["raw_and_validated_data"].append(
                    {"stage": stage, "role": "dependency", "path": dep["path"], "md5": dep["md5"], "size": dep.get("size"), "nfiles": dep.get("nfiles")}
                )
        for out in record.get("outs", []) or []:
            if "md5" not in out:
                continue
            current[f"{stage}:{out['path']}"] = out["md5"]
            groups[data_category(out["path"])].append(
                {"stage": stage, "role": "output", "path": out["path"], "md5": out["md5"], "size": out.get("size"), "nfiles": out.get("nfiles")}
            )
    at_run = {key[len("dvc."):]: value for key, value in run_tags.items() if key.startswith("dvc.") and ":" in key}
    changed = [
        {"output": key, "at_run": value, "now": current.get(key, "absent from dvc.lock")}
        for key, value in sorted(at_run.items())
        if current.get(key) != value
    ]
    return {
        "dvc_lock_present": lock is not None,
        "stages": sorted(stages),
        **groups,
        "recorded_at_run": at_run,
        "lock_changed_since_run": changed,
        "made_by": "dvc repro" if run_tags.get("dvc.stage", "none") not in ("", "none") else "kedro run",
        "run_inputs": {key[len("data.md5:"):]: value for key, value in sorted(run_tags.items()) if key.startswith("data.md5:")},
    }


def data_provenance(dataset_info: Mapping[str, Any], duplicate_report: Mapping[str, Any] | None, project_root: Path) -> dict[str, Any]:
    """Where the images come from, that the file is the official one, and what cleaning removed."""
    flag = str(dataset_info.get("flag"))
    raw_file = dataset_info.get("file")
    provenance_md = project_root / "data/01_raw/PROVENANCE.md"
    duplicates: dict[str, Any] = {"present": duplicate_report is not None}
    if duplicate_report is not None:
        duplicates.update(
            {
                "policy": duplicate_report.get("policy"),
                "removed": duplicate_report.get("removed"),
                "removed_total": duplicate_report.get("removed_total"),
                "test_images_with_copies_in_train_or_val": duplicate_report.get("test_images_with_copies_in_train_or_val"),
                "split_sizes_before": duplicate_report.get("split_sizes_before"),
                "split_sizes_after": duplicate_report.get("split_sizes_after"),
                "informational_not_removed": duplicate_report.get("informational_not_removed"),
            }
        )
    verified = dataset_info.get("md5_verified") is True and dataset_info.get("md5") == dataset_info.get("md5_expected")
    return {
        "status": PASS if verified and duplicate_report is not None else (FAIL if not verified else WARN),
        "source": "MedMNIST v2",
        "citation": MEDMNIST_CITATION,
        "original_source": ORIGINAL_SOURCES.get(flag, "see the MedMNIST v2 paper for this dataset's original source"),
        "dataset": flag,
        "python_class": dataset_info.get("python_class"),
        "task": dataset_info.get("task"),
        "url": dataset_info.get("url"),
        "file": raw_file,
        "medmnist_version": dataset_info.get("medmnist_version"),
        "md5": dataset_info.get("md5"),
        "md5_expected": dataset_info.get("md5_expected"),
        "md5_verified": dataset_info.get("md5_verified"),
        "license": dataset_info.get("license") or "CC BY 4.0",
        "label_names": dataset_info.get("label_names"),
        "image_shape": dataset_info.get("image_shape"),
        "size": dataset_info.get("size"),
        "n_channels": dataset_info.get("n_channels"),
        "official_split_sizes": dataset_info.get("official_split_sizes"),
        "split_sizes_used": dataset_info.get("split_sizes"),
        "duplicates_removed": duplicates,
        "provenance_note": provenance_md.read_text() if provenance_md.is_file() else None,
    }


def _gate(report: Mapping[str, Any] | None, name: str, required: bool) -> dict[str, Any]:
    if report is None:
        return {"name": name, "present": False, "status": MISSING if required else NOT_USED, "expectations": []}
    expectations = []
    for result in report.get("results", []) or []:
        kwargs = result.get("kwargs") or {}
        observed = result.get("observed_value")
        if observed is None and result.get("unexpected_count") is not None:
            observed = f"{result.get('unexpected_count')} unexpected of {result.get('element_count', '?')}"
        expectations.append(
            {
                "suite": result.get("suite"),
                "expectation": result.get("type"),
                "description": result.get("description") or result.get("type"),
                "column": kwargs.get("column") or kwargs.get("column_A"),
                "observed": _short(observed),
                "success": bool(result.get("success")),
            }
        )
    return {
        "name": name,
        "present": True,
        "status": PASS if report.get("success") else FAIL,
        "suite": report.get("suite"),
        "success": bool(report.get("success")),
        "statistics": report.get("statistics"),
        "great_expectations_version": report.get("great_expectations_version"),
        "data_docs": report.get("data_docs"),
        "expectations": expectations,
    }


def _short(value: Any, limit: int = 160) -> Any:
    text = value if isinstance(value, (int, float, bool)) or value is None else json.dumps(json_safe(value), default=str)
    if isinstance(text, str) and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def data_gates(raw: Mapping | None, partition: Mapping | None, synthetic: Mapping | None, synthetic_used: bool) -> dict[str, Any]:
    gates = {
        "raw_data": _gate(raw, "raw data (ingestion)", required=True),
        "partition": _gate(partition, "partition placement", required=True),
        "synthetic": _gate(synthetic, "synthetic sets (FedSSG)", required=synthetic_used),
    }
    statuses = [g["status"] for g in gates.values()]
    status = FAIL if FAIL in statuses else (WARN if MISSING in statuses else PASS)
    return {"status": status, **gates}


def _find_expectation(gate: Mapping[str, Any], *needles: str) -> dict[str, Any] | None:
    for expectation in gate.get("expectations", []):
        text = f"{expectation['description']} {expectation['expectation']}".lower()
        if all(n in text for n in needles):
            return expectation
    return None


def train_test_independence(
    dataset_info: Mapping[str, Any],
    partition_manifest: Mapping[str, Any],
    gates: Mapping[str, Any],
    duplicates: Mapping[str, Any],
    synthetic_manifest: Mapping[str, Any] | None,
    synthetic_used: bool,
) -> dict[str, Any]:
    """Evidence that no test image influenced training (GMLP principle 4)."""
    ds = partition_manifest.get("dataset") or {}
    used = dataset_info.get("split_sizes") or {}
    official = dataset_info.get("official_split_sizes") or {}
    split_sizes = partition_manifest.get("split_sizes") or {}
    placed = sum(int(s.get("total", 0)) for s in split_sizes.values())
    checks = []

    def add(check: str, ok: bool | None, evidence: str) -> None:
        checks.append({"check": check, "status": MISSING if ok is None else (PASS if ok else FAIL), "evidence": evidence})

    test_size = ds.get("global_test_size")
    add(
        "the global test set is the official test split, whole and never partitioned",
        test_size is not None and test_size == used.get("test") == official.get("test"),
        f"global test size {test_size}; official test split {official.get('test')}; after ingestion {used.get('test')}; "
        f"partition pool: {ds.get('pool', 'not recorded')}",
    )
    pool = ds.get("pool_size")
    add(
        "the partition pool is the official train + val splits only",
        pool is not None and pool == int(used.get("train", -1)) + int(used.get("val", -1)),
        f"pool size {pool} = train {used.get('train')} + val {used.get('val')} (after duplicate removal)",
    )
    add(
        "every pooled image is placed in exactly one client split (train/val/test)",
        placed == pool,
        f"{placed} images placed over {len(split_sizes)} clients; pool {pool}",
    )
    gate = gates.get("partition") or {}
    unique = _find_expectation(gate, "placed twice")
    add(
        "no image is placed twice (partition data gate)",
        None if unique is None else unique["success"],
        unique["description"] if unique else "partition gate report missing",
    )
    leak = _find_expectation(gate, "global test image")
    add(
        "no training-pool image is an exact copy of a global test image (partition data gate)",
        None if leak is None else leak["success"],
        f"{leak['description']}: {leak['observed']}" if leak else "partition gate report missing",
    )
    if duplicates.get("present"):
        add(
            "test images duplicated in train/val were removed at ingestion",
            True,
            f"removed {duplicates.get('removed_total')} train/val images ({duplicates.get('removed')}); "
            f"{duplicates.get('test_images_with_copies_in_train_or_val')} test images had copies; the test split is never changed",
        )
    else:
        add("test images duplicated in train/val were removed at ingestion", None, "duplicate report missing")
    if synthetic_used:
        usage = str((synthetic_manifest or {}).get("use", ""))
        add(
            "synthetic images are added to training splits only",
            "train" in usage.lower() and "never" in usage.lower(),
            usage or "synthetic manifest missing",
        )
    statuses = [c["status"] for c in checks]
    return {
        "status": FAIL if FAIL in statuses else (WARN if MISSING in statuses else PASS),
        "checks": checks,
        "counts": {
            "official_split_sizes": official,
            "after_duplicate_removal": used,
            "partition_pool": pool,
            "global_test": test_size,
            "placed_in_clients": placed,
            "per_client": split_sizes,
        },
    }


def synthetic_data(
    training_summary: Mapping[str, Any],
    manifest: Mapping[str, Any] | None,
    validation: Mapping[str, Any] | None,
    quality: Mapping[str, Any] | None,
) -> dict[str, Any]:
    used = used_synthetic_data(training_summary)
    per_client = training_summary.get("synthetic_train_samples") or {}
    if manifest is None:
        return {
            "status": MISSING if used else NOT_USED,
            "used_by_run": used,
            "manifest_present": False,
            "statement": "the run used synthetic data but its manifest is missing" if used else "not used: the run trained on real images only",
        }
    return {
        "status": NOT_USED if not used else (PASS if (validation or {}).get("success", (manifest.get("gate") or {}).get("success")) else FAIL),
        "used_by_run": used,
        "manifest_present": True,
        "statement": _synthetic_statement(training_summary) if used
                     else "synthetic sets exist but this run did not use them (training.extra_training_data is not "
                          "'synthetic' and the server did not pretrain)",
        "pretraining": training_summary.get("pretraining"),
        "enabled": manifest.get("enabled"),
        "use": manifest.get("use"),
        "total_images": manifest.get("total"),
        "per_client_in_manifest": manifest.get("totals"),
        "per_client_used_in_training": per_client,
        "counts_by_class_and_device": manifest.get("counts"),
        "generator": {k: v for k, v in (manifest.get("generator") or {}).items() if k != "spec"},
        "seed": manifest.get("seed"),
        "sampling": manifest.get("sampling"),
        "plan_params": manifest.get("plan_params"),
        "gate": manifest.get("gate"),
        "quality": quality,
    }  # fmt: skip
