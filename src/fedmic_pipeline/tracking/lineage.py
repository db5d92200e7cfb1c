"""Facts that tie a run to its code and data: git commit, dirty flag, the data's hashes.

The data hashes are those of the files the run read (``input_hashes``), computed when it
ran, never copied from dvc.lock: a run on another dataset, or one made with `kedro run`
after the data changed, would otherwise carry the committed lock's hashes as its lineage.
``dvc_stage`` says whether `dvc repro` made the run (DVC sets DVC_STAGE for a stage's
command); only then does dvc.lock describe the run's data.

Everything here degrades to an explicit "unknown" rather than failing a run: a training
run outside a git checkout (for example in a container) must still train, and the audit
then shows plainly that the link is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(project_root: Path) -> dict[str, Any]:
    """Commit hash and whether tracked files differ from it (untracked outputs don't count)."""
    commit = _git(["rev-parse", "HEAD"], project_root)
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], project_root)
    return {
        "git_commit": commit or UNKNOWN,
        "git_dirty": UNKNOWN if dirty is None else bool(dirty),
    }


#: What a training run reads (the data deps of dvc.yaml's train stage), relative to the project root.
TRAINING_INPUTS = (
    "data/03_primary/dataset_info.json",
    "data/05_model_input/partition_manifest.json",
    "data/05_model_input/clients",
)
SYNTHETIC_INPUT = "data/05_model_input/synthetic"


def input_hashes(project_root: Path, paths: Iterable[str]) -> dict[str, str]:
    """``path -> md5`` of every file among ``paths`` that exists, a directory file by file
    (so a check can name the one file that changed)."""
    from fedmic_pipeline.hashing import file_digest

    hashes: dict[str, str] = {}
    for path in paths:
        target = project_root / path
        files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target] if target.is_file() else []
        for file in files:
            hashes[file.relative_to(project_root).as_posix()] = file_digest(file)
    return hashes


def dvc_stage() -> str | None:
    """The dvc.yaml stage running this process (`dvc repro` sets DVC_STAGE), else None."""
    return os.environ.get("DVC_STAGE") or None


def dvc_lock_hashes(project_root: Path) -> dict[str, str]:
    """`stage:path -> md5` for every output recorded in dvc.lock (empty without a lock)."""
    lock_path = project_root / "dvc.lock"
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes: dict[str, str] = {}
    for stage, record in (lock.get("stages") or {}).items():
        for out in record.get("outs", []) or []:
            if "md5" in out:
                hashes[f"{stage}:{out['path']}"] = out["md5"]
    return hashes


def sha256_of_files(paths: list[Path]) -> str:
    """One digest over files' names and bytes, in sorted order (stable across machines)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.as_posix()):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def content_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (for manifests and params)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
