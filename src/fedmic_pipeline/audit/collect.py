"""Evidence for the audit report of one training run, and a re-hash of the data it used.

The report follows the structure of the technical documentation in Annex IV of the EU AI
Act and cross-references the FDA/Health Canada/MHRA Good Machine Learning Practice
principles, so that someone who did not run the pipeline can check what was trained, on
which data, with which code and parameters, how it was validated, and whether the data on
disk is still the data the run used.

Two design rules:

* An audit runs long after training, possibly on another machine, so every section
  degrades to an explicit "missing"/"unavailable"/"not used" instead of raising. A report
  that stops at the first gap hides every other finding.
* Integrity is checked against references recorded *at run time*: the MLflow run's tags
  (`partition.manifest_sha256`, `dataset.md5`, `dvc.<stage>:<path>`), the partition
  manifest's per-array sha256, dataset_info's md5, and dvc.lock. A changed file is a FAIL
  with expected and actual hashes; raising on it is left to a separate node that runs
  after the report is saved (`pipelines/audit/nodes.enforce_integrity`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from kedro.io.core import AbstractDataset, DatasetError

from fedmic_pipeline.tracking.lineage import UNKNOWN, content_hash, git_state

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PASS, FAIL, WARN, MISSING, SKIPPED, NOT_USED = "PASS", "FAIL", "WARN", "MISSING", "SKIPPED", "NOT USED"

# Versions an auditor asks for first; the rest of the environment is in requirements.lock.
KEY_PACKAGES = (
    "torch", "torchvision", "numpy", "medmnist", "kedro", "kedro-datasets", "kedro-mlflow", "mlflow",
    "dvc", "great-expectations", "scikit-learn", "flwr", "pandas",
)  # fmt: skip

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


# ---- an optional input ---------------------------------------------------------------------

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


# ---- small helpers --------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_md5(path: Path) -> tuple[str, dict[str, str]]:
    """DVC 3's hash of a directory output (md5 of its sorted JSON listing, + '.dir') and the listing."""
    listing = {
        file.relative_to(path).as_posix(): file_digest(file)
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }
    entries = [{"md5": md5, "relpath": rel} for rel, md5 in sorted(listing.items())]
    digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
    return f"{digest}.dir", listing


def npz_member_hashes(path: Path) -> tuple[dict[str, str], str | None]:
    """sha256 of each array's .npy bytes inside an .npz (what the manifests record), or the read error."""
    hashes: dict[str, str] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
                try:
                    hashes[name] = hashlib.sha256(archive.read(info)).hexdigest()
                except Exception as error:  # noqa: BLE001 - a corrupt member is evidence, not a crash
                    hashes[name] = f"unreadable ({type(error).__name__}: {error})"
    except Exception as error:  # noqa: BLE001
        return hashes, f"{type(error).__name__}: {error}"
    return hashes, None


@contextlib.contextmanager
def _bounded_mlflow_requests(timeout_s: float) -> Iterator[None]:
    """No retries and a short timeout, so an unreachable server costs seconds, not minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(timeout_s)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as kedro-mlflow logs them (`a.b.c`, lists kept whole)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty block logs nothing, as in kedro-mlflow
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---- MLflow: the run and its registered model ----------------------------------------------

def read_mlflow(training_tracking: Mapping[str, Any], timeout_s: float = 10) -> dict[str, Any]:
    """The run (params, tags, final metrics) and its registered version, or why they are unavailable."""
    run_id = training_tracking.get("mlflow_run_id")
    if not run_id:
        return {"available": False, "error": "mlflow_run.json holds no run id: the training run was not tracked"}
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = training_tracking.get("tracking_uri") or mlflow.get_tracking_uri()
    try:
        with _bounded_mlflow_requests(timeout_s):
            client = MlflowClient(uri)
            run = client.get_run(run_id)
            experiment = client.get_experiment(run.info.experiment_id)
            out: dict[str, Any] = {
                "available": True,
                "tracking_uri": uri,
                "run": {
                    "run_id": run_id,
                    "run_name": run.info.run_name,
                    "experiment": experiment.name if experiment else run.info.experiment_id,
                    "status": run.info.status,
                    "user": run.info.user_id,
                    "start_time": _ms_to_iso(run.info.start_time),
                    "end_time": _ms_to_iso(run.info.end_time),
                    "artifact_uri": run.info.artifact_uri,
                },
                "params": dict(sorted(run.data.params.items())),
                "tags": dict(sorted(run.data.tags.items())),
                "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("final.", "total."))},
                "registry": None,
            }
            registered = training_tracking.get("registered") or {}
            name, version = registered.get("registered_model"), registered.get("version")
            if name and version not in (None, ""):
                model = client.get_registered_model(name)
                model_version = client.get_model_version(name, str(version))
                out["registry"] = {
                    "name": name,
                    "version": str(model_version.version),
                    "status": model_version.status,
                    "run_id": model_version.run_id,
                    "source": model_version.source,
                    "created": _ms_to_iso(model_version.creation_timestamp),
                    "aliases_of_this_version": sorted(model_version.aliases or []),
                    "aliases_of_model": {str(k): str(v) for k, v in sorted((model.aliases or {}).items())},
                    "version_tags": dict(sorted((model_version.tags or {}).items())),
                }
            return out
    except Exception as error:  # noqa: BLE001 - an unreachable server is a finding, not a crash
        logger.warning("MLflow run %s is unavailable at %s: %s", run_id, uri, error)
        return {"available": False, "tracking_uri": uri, "error": f"{type(error).__name__}: {str(error)[:400]}"}


def _ms_to_iso(ms: int | None) -> str | None:
    return None if not ms else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


# ---- code, data versions, parameters, environment --------------------------------------------

def code_version(run_tags: Mapping[str, str], project_root: Path) -> dict[str, Any]:
    """The commit the run recorded (the one that matters) beside the checkout audited now."""
    current = git_state(project_root)
    run_commit = run_tags.get("git_commit", UNKNOWN)
    run_dirty = run_tags.get("git_dirty", UNKNOWN)
    findings = []
    if str(run_dirty) == "True":
        findings.append("the run was made from a checkout with uncommitted changes: its exact code is not recoverable from git")
    if run_commit == UNKNOWN:
        findings.append("the run recorded no git commit")
    elif current["git_commit"] not in (UNKNOWN, run_commit):
        findings.append(f"the checkout has moved on since the run (run {run_commit[:12]}, now {str(current['git_commit'])[:12]})")
    status = PASS if not findings else WARN
    return {
        "status": status,
        "run": {"git_commit": run_commit, "git_dirty": run_dirty},
        "current_checkout": current,
        "same_commit": run_commit == current["git_commit"],
        "findings": findings,
    }


def read_dvc_lock(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _category(path: str) -> str:
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
    """dvc.lock's hashes per kind of data, and what the lock recorded when the run trained."""
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
            groups[_category(out["path"])].append(
                {"stage": stage, "role": "output", "path": out["path"], "md5": out["md5"], "size": out.get("size"), "nfiles": out.get("nfiles")}
            )
    at_run = {key[len("dvc."):]: value for key, value in run_tags.items() if key.startswith("dvc.")}
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
    }


def parameters_section(
    mlflow_view: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    partition_manifest: Mapping[str, Any],
    current_parameters: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Every parameter of the run (MLflow's copy when reachable) and drift from today's config."""
    config = dict(training_summary.get("algorithm_config") or {})
    interpretation = {k.removeprefix("interpretation."): v for k, v in config.items() if k.startswith("interpretation.")}
    resolved = {k: v for k, v in config.items() if not k.startswith("interpretation.")}
    run_params = dict(mlflow_view.get("params") or {}) if mlflow_view.get("available") else {}
    drift: dict[str, Any] = {"checked": False, "changed": [], "not_in_current_config": [], "added_since_run": []}
    if run_params and current_parameters is not None:
        now = flatten(current_parameters)
        tops = {key.split(".", 1)[0] for key in now}
        run_tops = {key.split(".", 1)[0] for key in run_params}
        drift["added_since_run"] = [
            {"key": key, "now": str(value)} for key, value in sorted(now.items())
            if key.split(".", 1)[0] in run_tops and key not in run_params
        ]
        for key, value in sorted(run_params.items()):
            if key.split(".", 1)[0] not in tops:
                continue  # resolved.*, or a block the current config does not have at all
            if key not in now:
                drift["not_in_current_config"].append({"key": key, "run": value})
            elif str(now[key]) != str(value):
                drift["changed"].append({"key": key, "run": value, "now": str(now[key])})
        drift["checked"] = True
    return {
        "source": "MLflow run params (as logged by kedro-mlflow at run time)" if run_params else
                  "training_summary.json and partition_manifest.json (MLflow run unavailable)",
        "run_params": run_params,
        "resolved_algorithm_config": resolved,
        "interpretation_choices": interpretation,
        "simulation": dict(training_summary.get("simulation") or {}),
        "partition": dict(partition_manifest.get("parameters") or {}),
        "config_drift": drift,
        "status": WARN if drift["changed"] or drift["not_in_current_config"] or drift["added_since_run"] else PASS,
    }  # fmt: skip


def _lock_pins(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pins[_normal(match.group(1))] = match.group(2)
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment(requirements_lock: Path, training_summary: Mapping[str, Any], run_tags: Mapping[str, str]) -> dict[str, Any]:
    """Software and hardware the audit ran on, beside what the run itself recorded."""
    pins = _lock_pins(requirements_lock)
    packages = {}
    for name in KEY_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        locked = pins.get(_normal(name))
        packages[name] = {
            "installed": version,
            "locked": locked,
            "matches_lock": None if locked is None or version is None else version.split("+")[0] == locked.split("+")[0],
        }
    hardware: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or None}
    try:
        import torch

        cuda = torch.cuda.is_available()
        hardware.update(
            {
                "cuda_available": cuda,
                "torch_cuda_build": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None,
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            }
        )
    except Exception as error:  # noqa: BLE001
        hardware["torch_error"] = str(error)
    simulation = training_summary.get("simulation") or {}
    mismatched = [n for n, p in packages.items() if p["matches_lock"] is False]
    return {
        "status": WARN if mismatched else PASS,
        "scope": "the machine that ran this audit; the training run's own records are under `run_recorded`",
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": packages,
        "packages_differing_from_lock": mismatched,
        "requirements_lock": str(requirements_lock) if pins else "absent",
        "hardware": hardware,
        "run_recorded": {
            "requested_device": simulation.get("device"),
            "mixed_precision": simulation.get("amp"),
            "torch_threads": simulation.get("num_threads"),
            "kedro_version": run_tags.get("kedro_version"),
            "kedro_command": run_tags.get("kedro_command"),
            "mlflow_source": run_tags.get("mlflow.source.name"),
            "project_path": run_tags.get("project_path"),
        },
    }


# ---- data -------------------------------------------------------------------------------------

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
    text = value if isinstance(value, (int, float, bool)) or value is None else json.dumps(_clean(value), default=str)
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


# ---- training, results, synthetic data, registry, model card -----------------------------------

def training_process(
    training_summary: Mapping[str, Any],
    training_history: Any,
    partition_manifest: Mapping[str, Any],
    run_params: Mapping[str, str],
    synthetic_manifest: Mapping[str, Any] | None,
) -> dict[str, Any]:
    simulation = training_summary.get("simulation") or {}
    totals = training_summary.get("totals") or {}
    config = training_summary.get("algorithm_config") or {}
    participation: dict[str, int] = {f"client_{int(k.split('_')[-1]):02d}": 0 for k in (training_summary.get("train_samples") or {})}
    rounds = []
    if training_history is not None and len(training_history):
        for row in training_history.to_dict("records"):
            sampled = [int(s) for s in str(row.get("sampled", "")).split() if s.strip().lstrip("-").isdigit()]
            for client in sampled:
                key = f"client_{client:02d}"
                participation[key] = participation.get(key, 0) + 1
            rounds.append({k: _clean(row.get(k)) for k in (
                "round", "num_sampled", "train_loss", "train_accuracy", "global_val_balanced_accuracy",
                "personalized_val_balanced_accuracy", "bytes_up_total", "bytes_down_total")})  # fmt: skip
    per_round = [r["num_sampled"] for r in rounds if r.get("num_sampled") is not None]
    seeds = {
        "training": simulation.get("seed"),
        "partition": (partition_manifest.get("seeds") or {}).get("partition_seed"),
        "devices": (partition_manifest.get("seeds") or {}).get("device_seed"),
        "partition_streams": (partition_manifest.get("seeds") or {}).get("streams"),
        "evaluation_bootstrap": run_params.get("evaluation.seed"),
        "synthetic": (synthetic_manifest or {}).get("seed") if (training_summary.get("extra_training_data", "none") == "synthetic") else None,
    }
    return {
        "algorithm": training_summary.get("algorithm"),
        "shared_model": config.get("model"),
        "personalized_model": config.get("interpretation.personalized_model", "the global model (no personalization)"),
        "hyperparameters": {k: v for k, v in config.items() if not k.startswith("interpretation.")},
        "interpretation_choices": {k.removeprefix("interpretation."): v for k, v in config.items() if k.startswith("interpretation.")},
        "rounds_planned": simulation.get("num_rounds"),
        "rounds_completed": totals.get("rounds"),
        "participation": {
            "join_ratio": simulation.get("join_ratio"),
            "num_clients": training_summary.get("num_clients"),
            "clients_per_round": {"min": min(per_round), "max": max(per_round), "mean": sum(per_round) / len(per_round)} if per_round else None,
            "rounds_per_client": participation,
            "never_sampled": sorted(k for k, v in participation.items() if v == 0),
        },
        "seeds": seeds,
        "device": {"requested": simulation.get("device"), "amp": simulation.get("amp"), "num_threads": simulation.get("num_threads")},
        "train_samples_per_client": training_summary.get("train_samples"),
        "use_synthetic": bool((training_summary.get("extra_training_data", "none") == "synthetic")),
        "wall_time_s": totals.get("wall_time_s"),
        "rounds": rounds,
    }


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


def synthetic_data(
    training_summary: Mapping[str, Any],
    manifest: Mapping[str, Any] | None,
    validation: Mapping[str, Any] | None,
    quality: Mapping[str, Any] | None,
) -> dict[str, Any]:
    used = bool((training_summary.get("extra_training_data", "none") == "synthetic"))
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
        "statement": "used: synthetic images were appended to each client's training split" if used
                     else "synthetic sets exist but this run did not use them (training.extra_training_data is not 'synthetic')",
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
        f"{training_summary.get('num_clients')} simulated hospitals; Dirichlet label skew "
        f"lambda={((partition_manifest.get('parameters') or {}).get('partition') or {}).get('dirichlet_lambda')}",
        f"imaging devices (simulated): {', '.join(partition_manifest.get('devices') or [])}; "
        f"held out from training: {partition_manifest.get('held_out_device')}",
    ]
    performance = []
    if g:
        ci = (g.get("ci") or {}).get("accuracy") or [None, None]
        performance.append(_fmt_line("global model balanced accuracy", g.get("balanced_accuracy"), (g.get("ci") or {}).get("balanced_accuracy")))
        performance.append(_fmt_line("global model macro AUC", g.get("macro_auc"), (g.get("ci") or {}).get("macro_auc")))
        performance.append(_fmt_line("global model accuracy", g.get("accuracy"), ci))
        performance.append(_fmt_line("global model ECE", g.get("ece"), (g.get("ci") or {}).get("ece")))
        if g.get("constant_predictor"):
            performance.append(f"CONSTANT PREDICTOR: one class for {_f(g.get('top_class_share'))} of the global test set")
    if site:
        performance.append(
            f"personalized models ({site.get('num_sites')} sites, {site.get('num_constant_sites', 0)} constant): mean balanced "
            f"accuracy {_f(site['mean'].get('balanced_accuracy'))}, worst site {_f(site['worst'].get('balanced_accuracy'))} "
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


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _fmt_line(label: str, value: Any, ci: Sequence[Any] | None) -> str:
    ci = ci or [None, None]
    return f"{label}: {_f(value)} (95% CI {_f(ci[0])}-{_f(ci[1])})"


# ---- integrity: re-hash what the run used -----------------------------------------------------

INPUT, OUTPUT, UNUSED = "input", "output", "not used"
_RUN_OUTPUT_PREFIXES = ("data/06_", "data/07_", "data/08_reporting/evaluation", "data/08_reporting/audit", "data/08_reporting/compare")


def _check(category: str, subject: str, reference: str, expected: Any, actual: Any, status: str,
           detail: str = "", role: str = INPUT) -> dict[str, Any]:  # fmt: skip
    """One integrity check. `role`: input (data or evidence the run depended on: a change is
    tampering), output (what the run or a later stage produced: a change is a warning, e.g.
    regenerated without `dvc repro`), not used (e.g. synthetic sets of a real-only run)."""
    return {"category": category, "subject": subject, "reference": reference, "expected": expected, "actual": actual,
            "status": status, "detail": detail, "role": role, "used_by_run": role != UNUSED}  # fmt: skip


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _npz_checks(
    category: str, directory: Path, expected: Mapping[str, Mapping[str, str]], reference: str, role: str,
    root: Path, flag_extra: bool = True,
) -> list[dict[str, Any]]:
    """Each .npz file's arrays against a manifest's sha256; files the manifest lacks are flagged too."""
    bad_status = FAIL if role == INPUT else WARN
    checks = []
    for client, members in sorted(expected.items()):
        path = directory / f"{client}.npz"
        subject = _rel(path, root)
        if not path.is_file():
            checks.append(_check(category, subject, reference, "present", "missing", MISSING, "file is gone", role))
            continue
        actual, error = npz_member_hashes(path)
        if error:
            checks.append(_check(category, subject, reference, f"readable .npz with {len(members)} arrays", f"unreadable: {error}",
                                 bad_status, "the file is not a valid .npz any more", role))  # fmt: skip
            continue
        bad = [(name, sha, actual.get(name, "missing")) for name, sha in sorted(members.items()) if actual.get(name) != sha]
        bad += [(name, "absent", actual[name]) for name in sorted(set(actual) - set(members))]
        for name, want, got in bad:
            shown = f"{name}.npy {got}" if str(got).startswith(("unreadable", "missing")) else f"{name}.npy sha256 {got}"
            checks.append(_check(category, subject, reference, f"{name}.npy sha256 {want}", shown, bad_status,
                                 f"array '{name}' differs from the manifest", role))  # fmt: skip
        if not bad:
            checks.append(_check(category, subject, reference, f"{len(members)} arrays as recorded", "identical", PASS, "", role))
    if flag_extra and directory.is_dir():
        for extra in sorted(p for p in directory.glob("*.npz") if p.stem not in expected):
            checks.append(_check(category, _rel(extra, root), reference, "no such file", "present", bad_status,
                                 "a file the manifest does not list: training would load it as one more client", role))  # fmt: skip
    return checks


def _output_stages(stages: Mapping[str, Any]) -> set[str]:
    """Stages that train or consume the run (their outputs may legitimately be newer than a lock).

    A stage writing models, model outputs or evaluation/audit/compare reports, and every
    stage that depends on one of those; the rest (ingest, partition, synthesize) made the
    run's inputs.
    """
    def outs(stage: str) -> list[str]:
        return [str(o.get("path", "")) for o in (stages[stage].get("outs") or [])]

    downstream = {s for s in stages if any(p.startswith(_RUN_OUTPUT_PREFIXES) for p in outs(s))}
    changed = True
    while changed:
        produced = {p for s in downstream for p in outs(s)}
        more = {s for s in stages if s not in downstream and any(str(d.get("path")) in produced for d in (stages[s].get("deps") or []))}
        downstream |= more
        changed = bool(more)
    return downstream


def _role(path: str, stage: str, output_stages: set[str], synthetic_used: bool) -> str:
    if _category(path) == "synthetic_sets" and not synthetic_used:
        return UNUSED
    return OUTPUT if stage in output_stages else INPUT


def _dvc_checks(lock: Mapping[str, Any] | None, project_root: Path, dvc_cache: Path, synthetic_used: bool) -> list[dict[str, Any]]:
    """Every dvc.lock output on disk against its recorded md5 (directories file by file when the
    DVC cache still has the directory's listing)."""
    stages = (lock or {}).get("stages") or {}
    output_stages = _output_stages(stages)
    checks = []
    for stage, record in stages.items():
        for out in record.get("outs", []) or []:
            if "md5" not in out:
                continue
            rel, want = out["path"], out["md5"]
            path = project_root / rel
            role = _role(rel, stage, output_stages, synthetic_used)
            bad_status = FAIL if role == INPUT else WARN
            reference = f"dvc.lock ({stage} stage)"
            why = ("differs from the version dvc.lock records: modified after the stage ran, or regenerated without "
                   "`dvc repro`/`dvc commit`")  # fmt: skip
            if not path.exists():
                checks.append(_check("dvc", rel, reference, want, "missing", MISSING,
                                     "recorded by dvc.lock but absent (`dvc checkout` restores cached outputs)", role))  # fmt: skip
                continue
            if str(want).endswith(".dir"):
                got, listing = dvc_dir_md5(path)
                if got == want:
                    checks.append(_check("dvc", rel, reference, want, got, PASS, f"{len(listing)} files", role))
                    continue
                recorded = _dvc_dir_listing(dvc_cache, want)
                if recorded is None:
                    checks.append(_check("dvc", rel, reference, want, got, bad_status,
                                         f"directory {why} (the DVC cache has no listing that would name the files)", role))  # fmt: skip
                    continue
                for name in sorted(set(recorded) | set(listing)):
                    if recorded.get(name) != listing.get(name):
                        checks.append(_check("dvc", f"{rel}/{name}", reference, recorded.get(name, "absent"),
                                             listing.get(name, "missing"), bad_status, f"file {why}", role))  # fmt: skip
            else:
                got = file_digest(path)
                ok = got == want
                checks.append(_check("dvc", rel, reference, want, got, PASS if ok else bad_status, "" if ok else f"file {why}", role))
    # the lock itself against the copy the run recorded in its tags (inputs only: a stage's
    # own outputs are always one version behind in the tags of the run that produced them)
    return checks


def _dvc_dir_listing(cache: Path, dir_md5: str) -> dict[str, str] | None:
    """relpath -> md5 of a directory output, from the `.dir` object DVC keeps in its cache."""
    digest = dir_md5.removesuffix(".dir")
    for candidate in (cache / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir", cache / digest[:2] / f"{digest[2:]}.dir"):
        if candidate.is_file():
            with contextlib.suppress(Exception):
                return {entry["relpath"]: entry["md5"] for entry in json.loads(candidate.read_text())}
    return None


def _lock_since_run(lock: Mapping[str, Any] | None, run_tags: Mapping[str, str], synthetic_used: bool) -> list[dict[str, Any]]:
    stages = (lock or {}).get("stages") or {}
    output_stages = _output_stages(stages)
    current = {f"{s}:{o['path']}": o["md5"] for s, r in stages.items() for o in (r.get("outs") or []) if "md5" in o}
    checks, same = [], 0
    for key, value in sorted(run_tags.items()):
        if not key.startswith("dvc.") or ":" not in key:
            continue
        stage, out_path = key[len("dvc."):].split(":", 1)
        role = _role(out_path, stage, output_stages, synthetic_used)
        if role == OUTPUT:
            continue
        now = current.get(f"{stage}:{out_path}", "absent from dvc.lock")
        if now == value:
            same += 1
            continue
        checks.append(_check("dvc", out_path, f"dvc.lock when the run trained (run tag {key})", value, now,
                             FAIL if role == INPUT else WARN,
                             "dvc.lock now records another version of this input than when the run trained: "
                             "the data was regenerated or edited since", role))  # fmt: skip
    if same:
        checks.append(_check("dvc", "dvc.lock", "the run's dvc.* tags (dvc.lock when the run trained)",
                             f"{same + len(checks)} input entries as recorded", f"{same} identical", PASS if not checks else FAIL,
                             "" if not checks else "see the rows above"))  # fmt: skip
    return checks


def verify_integrity(
    *,
    project_root: Path,
    paths: Mapping[str, str],
    dataset_info: Mapping[str, Any],
    partition_manifest: Mapping[str, Any],
    synthetic_manifest: Mapping[str, Any] | None,
    synthetic_used: bool,
    run_tags: Mapping[str, str],
    run_tags_source: str,
    local_run_tags: Mapping[str, str],
    lock: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Re-hash the data the run used against what was recorded when it ran."""
    checks: list[dict[str, Any]] = []
    # 1. the local run record (mlflow_run.json) against the tracking store's copy
    if run_tags_source == "mlflow":
        differing = sorted(k for k in local_run_tags if run_tags.get(k) != local_run_tags[k])
        checks.append(_check("run record", "mlflow_run.json (tags)", "MLflow run tags", "same as the tracking store",
                             "identical" if not differing else f"differs in {differing}", FAIL if differing else PASS,
                             "" if not differing else "the local run record was edited after the run"))  # fmt: skip
    # 2. the partition manifest against the hash the run recorded
    manifest_path = paths.get("partition_manifest", "data/05_model_input/partition_manifest.json")
    want = run_tags.get("partition.manifest_sha256")
    got = content_hash(partition_manifest)
    checks.append(_check("partition", manifest_path, f"run tag partition.manifest_sha256 ({run_tags_source})", want or "not recorded", got,
                         SKIPPED if not want else (PASS if want == got else FAIL),
                         "" if not want or want == got else "the partition manifest is not the one the run trained on"))  # fmt: skip
    # 3. the raw file: dataset_info's md5 against the run's tag, and the file against it
    want = run_tags.get("dataset.md5")
    checks.append(_check("raw", "dataset_info.json (md5 field)", f"run tag dataset.md5 ({run_tags_source})", want or "not recorded",
                         dataset_info.get("md5"), SKIPPED if not want else (PASS if want == dataset_info.get("md5") else FAIL)))  # fmt: skip
    raw_file = dataset_info.get("file")
    if raw_file:
        raw_path = project_root / raw_file
        if raw_path.is_file():
            got = file_digest(raw_path)
            ok = got == dataset_info.get("md5")
            checks.append(_check("raw", raw_file, "dataset_info.json md5 (verified against medmnist.INFO at ingestion)",
                                 dataset_info.get("md5"), got, PASS if ok else FAIL, "" if ok else "the raw file changed since ingestion"))  # fmt: skip
        else:
            checks.append(_check("raw", raw_file, "dataset_info.json md5", dataset_info.get("md5"), "missing", MISSING, "raw file is gone"))
    # 4. every client partition file, array by array, against the manifest
    clients_dir = project_root / paths.get("clients", "data/05_model_input/clients")
    checks += _npz_checks("partition", clients_dir, partition_manifest.get("sha256") or {}, "partition_manifest.json sha256", INPUT, project_root)
    # 5. the global test set
    test_path = project_root / paths.get("global_test", "data/05_model_input/global_test.npz")
    checks += _npz_checks("partition", test_path.parent, {test_path.stem: partition_manifest.get("global_test_sha256") or {}},
                          "partition_manifest.json global_test_sha256", INPUT, project_root, flag_extra=False)  # fmt: skip
    # 6. synthetic sets, when a manifest exists (tampering matters only when the run used them)
    if synthetic_manifest is not None:
        synthetic_dir = project_root / paths.get("synthetic_clients", "data/05_model_input/synthetic")
        checks += _npz_checks("synthetic", synthetic_dir, synthetic_manifest.get("sha256") or {}, "synthetic_manifest.json sha256",
                              INPUT if synthetic_used else UNUSED, project_root)  # fmt: skip
    # 7. everything dvc.lock versions, and whether the lock moved since the run
    checks += _dvc_checks(lock, project_root, project_root / paths.get("dvc_cache", ".dvc/cache"), synthetic_used)
    checks += _lock_since_run(lock, run_tags, synthetic_used)
    return summarise_checks(checks)


def summarise_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """FAIL when an input of the run changed; WARN when something is missing or an output differs."""
    failed = [c for c in checks if c["status"] == FAIL]
    missing = [c for c in checks if c["status"] == MISSING and c["used_by_run"]]
    warned = [c for c in checks if c["status"] == WARN]
    unbound = [c for c in checks if c["status"] == SKIPPED and c["role"] == INPUT]
    status = FAIL if failed else (WARN if missing or warned or unbound else PASS)
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    return {
        "status": status,
        "changed_files": sorted({c["subject"] for c in failed}),
        "missing_files": sorted({c["subject"] for c in missing}),
        "changed_outputs_or_unused": sorted({c["subject"] for c in warned}),
        "failures": failed,
        "warnings": warned,
        "unverifiable": unbound,
        "counts": counts,
        "checks": checks,
    }


# ---- figures, standards, verdict ---------------------------------------------------------------

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


def model_files(directory: Path, root: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        return []
    return [{"path": _rel(p, root), "bytes": p.stat().st_size, "sha256": file_digest(p, "sha256")} for p in sorted(directory.glob("*.pt"))]


GMLP_PRINCIPLES = (
    (1, "Multi-disciplinary expertise is leveraged throughout the total product life cycle", "out of scope",
     "Organisational; not evidenced by an automated report.", []),
    (2, "Good software engineering and security practices are implemented", "partly addressed",
     "Code version (git), data versioning (DVC), re-hash of every input, data gates, tests in the repository.",
     ["code_version", "data_versioning", "integrity", "data_gates"]),
    (3, "Clinical study participants and data sets are representative of the intended patient population", "partly addressed",
     "Per-site and per-device results, including the worst site; hospitals and devices are simulated, no demographics exist.",
     ["validation_and_test", "model_card"]),
    (4, "Training data sets are independent of test sets", "addressed",
     "The global test set is the untouched official test split; gate checks show no test image in training.",
     ["train_test_independence"]),
    (5, "Selected reference datasets are based upon best available methods", "partly addressed",
     "Labels are MedMNIST's, derived from the published source datasets; md5 verified against the official release.",
     ["data_provenance"]),
    (6, "Model design is tailored to the available data and reflects the intended use of the device", "addressed",
     "Algorithm, parameters and interpretation choices of the run; intended use in the model card.",
     ["training_process", "parameters", "model_card"]),
    (7, "Focus is placed on the performance of the human-AI team", "out of scope",
     "Research system without a human-in-the-loop study.", []),
    (8, "Testing demonstrates device performance during clinically relevant conditions", "partly addressed",
     "Global and per-device results with 95% intervals, a device never seen in training, calibration (ECE).",
     ["validation_and_test"]),
    (9, "Users are provided clear, essential information", "addressed",
     "Model card: intended use (research only, not for clinical use), limitations, caveats.", ["model_card"]),
    (10, "Deployed models are monitored for performance and re-training risks are managed", "partly addressed",
     "Not deployed. Registry promotion only on the same data version and with a margin; re-audit detects changed data.",
     ["model_registry", "integrity"]),
)  # fmt: skip

ANNEX_IV = (
    ("1", "General description of the AI system", ["general", "model_card", "environment"]),
    ("2(a)", "Methods and steps of development", ["training_process"]),
    ("2(b)", "Design specifications, key choices and parameters", ["parameters", "training_process"]),
    ("2(c)", "System architecture and computational resources", ["environment"]),
    ("2(d)", "Data requirements: provenance, selection, cleaning, versioning", ["data_provenance", "data_versioning", "data_gates", "train_test_independence", "synthetic_data"]),
    ("2(e)", "Human oversight measures", ["model_card"]),
    ("2(g)", "Validation and testing procedures, metrics and results", ["validation_and_test", "integrity"]),
    ("3", "Monitoring, functioning and control: capabilities, limitations, results per group", ["validation_and_test", "model_card"]),
    ("4", "Appropriateness of the performance metrics", ["validation_and_test"]),
    ("5", "Risk management system (Article 9)", []),
    ("6", "Changes through the life cycle", ["code_version", "data_versioning", "model_registry"]),
    ("7", "Standards and specifications applied", ["gmlp"]),
    ("8", "EU declaration of conformity", []),
    ("9", "Post-market monitoring plan", []),
)  # fmt: skip


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
                                        f"balanced accuracy {_f(g.get('balanced_accuracy'))} despite accuracy {_f(g.get('accuracy'))}"})  # fmt: skip
    if g and g.get("constant_predictor"):
        findings.append({"severity": FAIL, "section": "validation_and_test",
                         "message": f"the global model is a constant predictor: {_f(g.get('top_class_share'))} of the global "
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


# ---- the report -----------------------------------------------------------------------------

def build_report(
    *,
    training_tracking: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    training_history: Any,
    evaluation_report: Mapping[str, Any],
    evaluation_metrics: Mapping[str, Any],
    dataset_info: Mapping[str, Any],
    partition_manifest: Mapping[str, Any],
    raw_validation_report: Mapping[str, Any] | None,
    duplicate_report: Mapping[str, Any] | None,
    partition_validation_report: Mapping[str, Any] | None,
    synthetic_manifest: Mapping[str, Any] | None,
    synthetic_validation_report: Mapping[str, Any] | None,
    synthetic_quality: Mapping[str, Any] | None,
    promotion_decision: Mapping[str, Any] | None,
    parameters: Mapping[str, Any] | None,
    audit: Mapping[str, Any],
    project_root: Path | None = None,
) -> dict[str, Any]:
    """The whole report as one JSON-ready dict, sections in Annex IV order."""
    root = (project_root or Path.cwd()).resolve()
    paths = dict(audit.get("paths") or {})
    mlflow_view = read_mlflow(training_tracking, float(audit.get("mlflow_timeout_s", 10)))
    local_tags = {str(k): str(v) for k, v in (training_tracking.get("tags") or {}).items()}
    run_tags = {**local_tags, **(mlflow_view.get("tags") or {})} if mlflow_view.get("available") else local_tags
    synthetic_used = bool((training_summary.get("extra_training_data", "none") == "synthetic"))
    lock = read_dvc_lock(root / paths.get("dvc_lock", "dvc.lock"))

    sections: dict[str, Any] = {}
    sections["code_version"] = code_version(run_tags, root)
    sections["data_versioning"] = data_versioning(lock, run_tags)
    sections["parameters"] = parameters_section(mlflow_view, training_summary, partition_manifest, parameters)
    sections["environment"] = environment(root / paths.get("requirements_lock", "requirements.lock"), training_summary, run_tags)
    sections["data_provenance"] = data_provenance(dataset_info, duplicate_report, root)
    sections["data_gates"] = data_gates(raw_validation_report, partition_validation_report, synthetic_validation_report, synthetic_used)
    sections["training_process"] = training_process(training_summary, training_history, partition_manifest,
                                                    sections["parameters"]["run_params"], synthetic_manifest)  # fmt: skip
    sections["train_test_independence"] = train_test_independence(
        dataset_info, partition_manifest, sections["data_gates"], sections["data_provenance"]["duplicates_removed"],
        synthetic_manifest, synthetic_used,
    )  # fmt: skip
    sections["validation_and_test"] = validation_and_test(evaluation_report, evaluation_metrics, training_summary)
    sections["synthetic_data"] = synthetic_data(training_summary, synthetic_manifest, synthetic_validation_report, synthetic_quality)
    sections["model_registry"] = model_registry(mlflow_view, training_tracking, promotion_decision)
    sections["model_card"] = model_card(audit.get("model_card") or {}, dataset_info, partition_manifest, training_summary,
                                        sections["model_registry"], sections["validation_and_test"])  # fmt: skip
    sections["integrity"] = verify_integrity(
        project_root=root, paths=paths, dataset_info=dataset_info, partition_manifest=partition_manifest,
        synthetic_manifest=synthetic_manifest, synthetic_used=synthetic_used, run_tags=run_tags,
        run_tags_source="mlflow" if mlflow_view.get("available") else "mlflow_run.json", local_run_tags=local_tags, lock=lock,
    )  # fmt: skip
    sections["integrity"]["model_files"] = model_files(root / paths.get("models", "data/06_models"), root)
    general = {
        "mlflow": {k: v for k, v in mlflow_view.items() if k not in ("params", "tags", "metrics", "registry")},
        "mlflow_run_id": training_tracking.get("mlflow_run_id"),
        "dataset": dataset_info.get("flag"),
        "algorithm": training_summary.get("algorithm"),
        "registered_model": sections["model_registry"]["registered_model"],
        "model_version": sections["model_registry"]["version"],
        "purpose": (audit.get("model_card") or {}).get("intended_use"),
        "run_tags": {k: v for k, v in run_tags.items() if not k.startswith("dvc.")},
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "report": {
            "title": f"Technical documentation and audit: {dataset_info.get('flag')} / {training_summary.get('algorithm')} "
                     f"run {training_tracking.get('mlflow_run_id')}",
            "generated_at": _now(),
            "generator": "fedmic_pipeline.audit (kedro run --pipelines audit)",
            "project_root": str(root),
            "structure": "EU AI Act Annex IV (technical documentation), cross-referenced to the FDA/Health Canada/MHRA "
                         "Good Machine Learning Practice guiding principles (2021)",
            "disclaimer": "An automated research report organised after Annex IV; it is not a conformity assessment, "
                          "and the system is not a medical device.",
        },  # fmt: skip
        "verdict": verdict(sections, mlflow_view),
        "annex_iv": [{"item": i, "title": t, "sections": s} for i, t, s in ANNEX_IV],
        "general": general,
        **sections,
        "gmlp": [{"principle": n, "title": t, "status": s, "evidence": e, "sections": refs} for n, t, s, e, refs in GMLP_PRINCIPLES],
        "figures": figures(audit.get("plots") or {}, root),
    }
    report = _clean(report)
    logger.info(
        "Audit of run %s: %s (integrity %s, %d checks, %d findings)",
        training_tracking.get("mlflow_run_id"), report["verdict"]["status"], report["integrity"]["status"],
        len(report["integrity"]["checks"]), len(report["verdict"]["findings"]),
    )  # fmt: skip
    return report
