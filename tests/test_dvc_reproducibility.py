"""`dvc repro` in a clean copy of the repository reproduces the recorded data byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(KEDRO_DISABLE_TELEMETRY="1", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def _clean_clone(project_root: Path, target: Path) -> Path:
    """What a fresh `git clone` holds: the tracked files only, in a new git repository."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=project_root, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, tracked):
        source = project_root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(["git", "add", "-A"], cwd=target, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], cwd=target, check=True
    )
    return target


def _out_hashes(lock_path: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load(lock_path.read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_dvc_repro_in_a_clean_clone_reproduces_the_locked_partition(project_root: Path, tmp_path: Path) -> None:
    committed_lock = project_root / "dvc.lock"
    if not committed_lock.is_file():
        pytest.fail("dvc.lock is missing: run `make repro` and commit dvc.lock.")
    clone = _clean_clone(project_root, tmp_path / "clone")
    lock_before = _out_hashes(clone / "dvc.lock", "partition")

    result = subprocess.run(
        ["dvc", "repro", "--force", "partition"], cwd=clone, env=_tool_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for stage in ("ingest", "partition"):
        assert _out_hashes(clone / "dvc.lock", stage) == _out_hashes(committed_lock, stage), (
            f"stage '{stage}' produced different bytes than the committed dvc.lock records"
        )
    assert _out_hashes(clone / "dvc.lock", "partition") == lock_before

    status = subprocess.run(["dvc", "status", "--json", "partition"], cwd=clone, env=_tool_env(), capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout


def test_changing_lambda_changes_the_partition_stage(project_root: Path, tmp_path: Path) -> None:
    clone = _clean_clone(project_root, tmp_path / "clone")
    env = _tool_env()
    first = subprocess.run(["dvc", "repro", "partition"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _out_hashes(clone / "dvc.lock", "partition")

    params_file = clone / "conf/base/parameters_data_partition.yml"
    params = params_file.read_text().replace("dirichlet_lambda: 0.3", "dirichlet_lambda: 0.1")
    params_file.write_text(params)
    status = subprocess.run(["dvc", "status", "--json", "partition"], cwd=clone, env=env, capture_output=True, text=True)
    assert "partition" in status.stdout and "ingest" not in status.stdout

    second = subprocess.run(["dvc", "repro", "partition"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _out_hashes(clone / "dvc.lock", "partition")
    assert after["data/05_model_input/clients"] != before["data/05_model_input/clients"]
