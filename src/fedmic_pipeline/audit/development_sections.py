"""Report sections on how the model was developed (EU AI Act Annex IV 2(a)-(c)).

The code version, every parameter and its drift from today's conf/, the software and
hardware environment, and the federated training process (rounds, participation, seeds),
each from what the run recorded, set beside what the audit finds now.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmic_pipeline.audit.data_sections import used_synthetic_data
from fedmic_pipeline.audit.mlflow_view import flatten
from fedmic_pipeline.audit.report_values import PASS, WARN, json_safe
from fedmic_pipeline.tracking.lineage import UNKNOWN, git_state
from fedmic_pipeline.tracking.mlflow_logging import privacy_from_summary

# Versions an auditor asks for first; the rest of the environment is in requirements.lock.
KEY_PACKAGES = (
    "torch", "torchvision", "numpy", "medmnist", "kedro", "kedro-datasets", "kedro-mlflow", "mlflow",
    "dvc", "great-expectations", "scikit-learn", "flwr", "pandas",
)  # fmt: skip


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
            rounds.append({k: json_safe(row.get(k)) for k in (
                "round", "num_sampled", "train_loss", "train_accuracy", "global_val_balanced_accuracy",
                "personalized_val_balanced_accuracy", "bytes_up_total", "bytes_down_total")})  # fmt: skip
    per_round = [r["num_sampled"] for r in rounds if r.get("num_sampled") is not None]
    seeds = {
        "training": simulation.get("seed"),
        "partition": (partition_manifest.get("seeds") or {}).get("partition_seed"),
        "devices": (partition_manifest.get("seeds") or {}).get("device_seed"),
        "partition_streams": (partition_manifest.get("seeds") or {}).get("streams"),
        "evaluation_bootstrap": run_params.get("evaluation.seed"),
        "synthetic": (synthetic_manifest or {}).get("seed") if used_synthetic_data(training_summary) else None,
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
        "use_synthetic": used_synthetic_data(training_summary),
        "differential_privacy": json_safe(privacy_from_summary(training_summary, training_history)),
        "wall_time_s": totals.get("wall_time_s"),
        "rounds": rounds,
    }
