"""The `audit` pipeline on a finished tiny run, and its integrity checks against real DVC.

One real Kedro project in a temp folder runs ingestion (a fake MedMNIST release, md5
registered in medmnist.INFO), partition, training, evaluation (with champion promotion)
against a temp SQLite MLflow store, then `audit`. The tests read what the audit wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmic_pipeline import hashing
from fedmic_pipeline.audit import collect, data_sections, integrity, render
from fedmic_pipeline.audit.inputs import AuditInputs

from .conftest import FLAG, _kedro  # the finished run every test here reads (fixture finished_run)

SECTIONS = (
    "schema_version", "report", "verdict", "annex_iv", "general", "code_version", "data_versioning", "parameters",
    "environment", "data_provenance", "data_gates", "training_process", "train_test_independence",
    "validation_and_test", "synthetic_data", "model_registry", "model_card", "integrity", "gmlp", "figures",
)  # fmt: skip
HTML_IDS = (
    "verdict", "general", "training_process", "parameters", "environment", "data_provenance", "data_versioning",
    "data_gates", "train_test_independence", "synthetic_data", "validation_and_test", "model_card", "metrics", "risk",
    "code_version", "model_registry", "gmlp", "conformity", "integrity", "params",
)  # fmt: skip


def _report(project: Path) -> dict:
    return json.loads((project / "data/08_reporting/audit/audit_report.json").read_text())


@pytest.mark.slow
def test_report_of_a_finished_run_holds_every_item(finished_run):
    project = finished_run["project"]
    report = _report(project)
    html = (project / "data/08_reporting/audit/audit_report.html").read_text()

    assert set(SECTIONS) <= set(report)
    run_id = json.loads((project / "data/07_model_output/mlflow_run.json").read_text())["mlflow_run_id"]
    assert report["general"]["mlflow_run_id"] == run_id and report["general"]["mlflow"]["available"] is True
    # code and data versions
    assert {"git_commit", "git_dirty"} <= set(report["code_version"]["run"]) and "git_commit" in report["code_version"]["current_checkout"]
    assert {"raw_and_validated_data", "partitions", "synthetic_sets", "lock_changed_since_run"} <= set(report["data_versioning"])
    # every parameter, from MLflow
    params = report["parameters"]
    assert params["run_params"]["training.algorithm"] == "fedavg" and params["run_params"]["training.num_rounds"] == "2"
    assert params["resolved_algorithm_config"]["algorithm"] == "fedavg"
    assert params["config_drift"]["checked"] is True and params["config_drift"]["changed"] == []
    # environment
    env = report["environment"]
    for package in ("torch", "kedro", "mlflow", "dvc", "great-expectations", "medmnist", "numpy"):
        assert env["packages"][package]["installed"], package
    assert env["python"]["version"] and "cuda_available" in env["hardware"] and "torch_cuda_build" in env["hardware"]
    # data provenance and gates
    prov = report["data_provenance"]
    assert prov["md5_verified"] is True and prov["license"] == "CC BY 4.0" and "MedMNIST" in prov["citation"]
    assert prov["duplicates_removed"]["present"] is True and prov["duplicates_removed"]["removed_total"] == 0
    gates = report["data_gates"]
    assert gates["raw_data"]["status"] == "PASS" and gates["partition"]["status"] == "PASS"
    assert all(e["success"] for e in gates["raw_data"]["expectations"]) and gates["raw_data"]["expectations"]
    assert gates["synthetic"]["status"] == "NOT USED"
    # training process
    tp = report["training_process"]
    assert tp["algorithm"] == "fedavg" and tp["rounds_planned"] == 2 and tp["rounds_completed"] == 2
    assert tp["participation"]["join_ratio"] == 0.5 and sum(tp["participation"]["rounds_per_client"].values()) == 4
    assert {"training", "partition", "devices", "evaluation_bootstrap"} <= set(tp["seeds"])
    # independence
    ind = report["train_test_independence"]
    assert ind["status"] == "PASS" and ind["counts"]["global_test"] == 60 and ind["counts"]["partition_pool"] == 400
    assert any("global test image" in c["check"] and c["status"] == "PASS" for c in ind["checks"])
    # results
    vt = report["validation_and_test"]
    assert len(vt["global_model"]["ci"]["accuracy"]) == 2 and vt["n_bootstrap"] == 50
    assert {"mean", "worst", "worst_site"} <= set(vt["per_site"]["summary"]) and len(vt["per_site"]["sites"]) == 4
    assert len(vt["per_class"]) == 2 and "global_recall" in vt["per_class"][0]
    assert [d["device"] for d in vt["per_device"]["devices"] if d["held_out"]] == ["portable_lowdose"]
    assert vt["unseen_device"]["global_model"]["device"] == "portable_lowdose"
    assert vt["calibration"]["global"]["ece"] is not None and vt["communication"]["bytes_up_total"] > 0
    assert report["synthetic_data"]["status"] == "NOT USED" and "not used" in report["synthetic_data"]["statement"]
    # registry: training registered v1; the images are random noise, so the global model is a
    # constant predictor, which evaluation refused to promote and the audit flags as a failure
    reg = report["model_registry"]
    assert reg["registered_model"] == f"{FLAG}-fedavg-global" and reg["version"] == "1"
    assert vt["global_model"]["constant_predictor"] is True
    assert reg["is_champion"] is False and reg["promotion_decision"]["decision"] == "not_promoted"
    assert "constant predictor" in reg["promotion_decision"]["reason"]
    assert any(f["severity"] == "FAIL" and "constant predictor" in f["message"] for f in report["verdict"]["findings"])
    # model card
    card = report["model_card"]
    assert card["not_for_clinical_use"] is True and "not for clinical use" in card["intended_use"].lower()
    assert any("28x28" in line for line in card["limitations"]) and card["ethical_considerations"] and card["caveats"]
    # integrity: every input unchanged
    assert report["integrity"]["status"] == "PASS" and report["verdict"]["integrity_status"] == "PASS"
    checked = {c["subject"] for c in report["integrity"]["checks"] if c["status"] == "PASS"}
    assert {f"data/05_model_input/clients/client_0{k}.npz" for k in range(4)} <= checked
    assert {"data/05_model_input/global_test.npz", f"data/01_raw/{FLAG}.npz"} <= checked
    assert [g["principle"] for g in report["gmlp"]] == list(range(1, 11))

    for anchor in HTML_IDS:
        assert f'id="{anchor}"' in html, anchor
    assert html.count("data:image/png;base64,") >= 5  # evaluation and partition plots
    assert "Research use only — not for clinical use" in html and "Audit verdict" in html
    assert "<script" not in html and "<link" not in html and 'src="http' not in html  # self-contained: nothing fetched
    # the promotion decision file written by the evaluation pipeline
    decision = json.loads((project / "data/08_reporting/evaluation/promotion_decision.json").read_text())
    assert decision["decision"] == "not_promoted" and decision["promoted"] is False


@pytest.mark.slow
def test_one_flipped_byte_in_a_partition_is_reported_then_enforced(finished_run):
    from fedmic_pipeline.pipelines.audit.nodes import AuditIntegrityError

    project = finished_run["project"]
    target = project / "data/05_model_input/clients/client_02.npz"
    original = target.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01
    target.write_bytes(bytes(tampered))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", finished_run["tracking_uri"])
            mp.chdir(project)
            with pytest.raises(AuditIntegrityError, match="client_02.npz") as failure:
                _kedro(project, ["audit"])
        assert "FAILED" in str(failure.value) and "dvc checkout" in str(failure.value)
        report = _report(project)  # written before the enforcing node failed
        assert report["verdict"]["status"] == "FAIL" and report["integrity"]["status"] == "FAIL"
        assert report["integrity"]["changed_files"] == ["data/05_model_input/clients/client_02.npz"]
        failure_row = report["integrity"]["failures"][0]
        assert failure_row["reference"] == "partition_manifest.json sha256" and failure_row["expected"] != failure_row["actual"]
        assert any("client_02.npz" in f["message"] and f["severity"] == "FAIL" for f in report["verdict"]["findings"])
        html = (project / "data/08_reporting/audit/audit_report.html").read_text()
        assert "Data changed since the run" in html and "client_02.npz" in html.split('id="verdict"')[1].split("</section>")[0]
    finally:
        target.write_bytes(original)


@pytest.mark.slow
def test_lineage_is_what_the_run_read_and_a_foreign_dvc_lock_is_no_alarm(finished_run, project_root):
    """A `kedro run` records the md5 of every file it read, not dvc.lock's; the committed lock
    of another dataset then neither becomes the run's lineage nor a 'changed' alarm."""
    from mlflow.tracking import MlflowClient

    project = finished_run["project"]
    run_id = json.loads((project / "data/07_model_output/mlflow_run.json").read_text())["mlflow_run_id"]
    tags = MlflowClient(tracking_uri=finished_run["tracking_uri"]).get_run(run_id).data.tags
    assert tags["dvc.stage"] == "none" and not [k for k in tags if k.startswith("dvc.") and ":" in k]
    read = {k.removeprefix("data.md5:"): v for k, v in tags.items() if k.startswith("data.md5:")}
    clients = sorted((project / "data/05_model_input/clients").glob("*.npz"))
    assert {f"data/05_model_input/clients/{c.name}" for c in clients} <= set(read)
    for path, md5 in read.items():
        assert hashing.file_digest(project / path) == md5, path

    lock = project / "dvc.lock"
    shutil.copy(project_root / "dvc.lock", lock)  # the repository's lock: another dataset's hashes
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", finished_run["tracking_uri"])
            mp.chdir(project)
            _kedro(project, ["audit"])
        integrity = _report(project)["integrity"]
        assert integrity["status"] == "PASS" and integrity["changed_files"] == []
        skipped = [c for c in integrity["checks"] if c["subject"] == "dvc.lock" and c["status"] == "SKIPPED"]
        assert skipped and "kedro run" in skipped[0]["actual"]
        assert sum(c["category"] == "run inputs" and c["status"] == "PASS" for c in integrity["checks"]) == len(read)
    finally:
        lock.unlink()


@pytest.mark.slow
def test_missing_evidence_is_reported_not_fatal_and_render_is_strict_clean(finished_run, tmp_path):
    project = finished_run["project"]
    gate = project / "data/08_reporting/data_gate/raw_validation.json"
    moved = tmp_path / "raw_validation.json"
    shutil.move(gate, moved)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", finished_run["tracking_uri"])
            mp.chdir(project)
            _kedro(project, ["audit"])  # no exception: missing evidence is a warning by default
            report = _report(project)
            assert report["data_gates"]["raw_data"]["status"] == "MISSING"
            assert report["integrity"]["status"] == "PASS"
            assert any("raw data" in f["message"] and f["severity"] == "WARN" for f in report["verdict"]["findings"])
            # the only failure is the constant global model of a run on random images, not the missing file
            fails = [f for f in report["verdict"]["findings"] if f["severity"] == "FAIL"]
            assert [f["section"] for f in fails] == ["validation_and_test"] and "constant predictor" in fails[0]["message"]
            # every template reference resolves, also for a report with gaps
            render.render_html(report, project_root=project, strict=True)
    finally:
        shutil.move(moved, gate)


@pytest.mark.slow
def test_unreachable_tracking_server_degrades_to_local_records(finished_run):
    import socket

    project = finished_run["project"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    tracking = json.loads((project / "data/07_model_output/mlflow_run.json").read_text())
    tracking["tracking_uri"] = f"http://127.0.0.1:{port}"
    audit_params = yaml.safe_load((project / "conf/base/parameters_audit.yml").read_text())["audit"]

    def load(rel):
        return json.loads((project / rel).read_text())

    import pandas as pd

    report = collect.build_report(AuditInputs(
        training_tracking=tracking,
        training_summary=load("data/07_model_output/training_summary.json"),
        training_history=pd.read_csv(project / "data/07_model_output/training_history.csv"),
        evaluation_report=load("data/08_reporting/evaluation/evaluation_report.json"),
        evaluation_metrics=load("data/08_reporting/evaluation/metrics.json"),
        dataset_info=load("data/03_primary/dataset_info.json"),
        partition_manifest=load("data/05_model_input/partition_manifest.json"),
        raw_validation_report=None, duplicate_report=None, partition_validation_report=None,
        synthetic_manifest=None, synthetic_validation_report=None, synthetic_quality=None, promotion_decision=None,
        parameters=None, audit={**audit_params, "mlflow_timeout_s": 3},
    ), project_root=project)  # fmt: skip
    assert report["general"]["mlflow"]["available"] is False
    assert "training_summary.json" in report["parameters"]["source"]
    assert report["integrity"]["status"] == "PASS"  # local run tags still bind the data to the run
    assert any("MLflow run unavailable" in f["message"] for f in report["verdict"]["findings"])
    html = render.render_html(report, project_root=project, strict=True)
    assert "unavailable" in html


# ---- integrity checks against a real DVC project (no Kedro) -------------------------------------

def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")
    return env


def test_directory_hash_is_dvcs_own(tmp_path):
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    folder = tmp_path / "clients"
    (folder / "sub").mkdir(parents=True)
    for name, content in {"client_00.npz": b"a" * 100, "client_01.npz": b"b", "sub/x.bin": b"\x00\x01"}.items():
        (folder / name).write_bytes(content)
    ours, listing = hashing.dvc_dir_md5(folder)
    tree = Tree()
    for rel, md5 in listing.items():
        tree.add(tuple(rel.split("/")), Meta(), HashInfo("md5", md5))
    tree.digest()
    assert ours == tree.hash_info.value and ours.endswith(".dir")


def test_dvc_lock_outputs_are_rehashed_file_by_file(tmp_path):
    """`dvc repro` writes a real dvc.lock and cache; a flipped byte is named with both md5s."""
    project = tmp_path / "dvcproj"
    project.mkdir()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, env=_tool_env(), check=True)
    script = (
        "import pathlib; d = pathlib.Path('data/05_model_input/clients'); d.mkdir(parents=True, exist_ok=True); "
        "[(d / f'client_0{k}.npz').write_bytes(bytes([k]) * 64) for k in range(3)]; "
        "pathlib.Path('data/05_model_input/global_test.npz').write_bytes(b'test' * 16)"
    )
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"partition": {
        "cmd": f'"{sys.executable}" -c "{script}"',
        "outs": ["data/05_model_input/clients", "data/05_model_input/global_test.npz"],
    }}}))  # fmt: skip
    result = subprocess.run(["dvc", "repro", "-q"], cwd=project, env=_tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lock = data_sections.read_dvc_lock(project / "dvc.lock")

    clean = integrity._dvc_checks(lock, project, project / ".dvc/cache", synthetic_used=False)
    assert [c["status"] for c in clean] == ["PASS", "PASS"]

    target = project / "data/05_model_input/clients/client_01.npz"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    checks = integrity._dvc_checks(lock, project, project / ".dvc/cache", synthetic_used=False)
    failed = [c for c in checks if c["status"] == "FAIL"]
    assert [c["subject"] for c in failed] == ["data/05_model_input/clients/client_01.npz"]
    assert failed[0]["expected"] == hashlib.md5(bytes([1]) * 64).hexdigest()
    assert failed[0]["actual"] == hashing.file_digest(target) and failed[0]["role"] == "input"


def test_synthetic_sets_matter_only_when_the_run_used_them(tmp_path):
    from fedmic_pipeline.datasets.npz_dataset import npy_bytes, save_npz_deterministic

    folder = tmp_path / "data/05_model_input/synthetic"
    arrays = {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 1])}
    save_npz_deterministic(folder / "client_00.npz", arrays)
    manifest = {"sha256": {"client_00": {k: hashlib.sha256(npy_bytes(v)).hexdigest() for k, v in arrays.items()}}}
    save_npz_deterministic(folder / "client_00.npz", {**arrays, "labels": np.array([1, 1])})  # changed after the manifest

    unused = integrity._npz_checks("synthetic", folder, manifest["sha256"], "synthetic_manifest.json sha256", integrity.UNUSED, tmp_path)
    used = integrity._npz_checks("synthetic", folder, manifest["sha256"], "synthetic_manifest.json sha256", integrity.INPUT, tmp_path)
    assert [c["status"] for c in unused] == ["WARN"] and integrity.summarise_checks(unused)["status"] == "WARN"
    assert [c["status"] for c in used] == ["FAIL"] and integrity.summarise_checks(used)["changed_files"] == [
        "data/05_model_input/synthetic/client_00.npz"
    ]
    assert "labels.npy sha256" in used[0]["expected"] and used[0]["expected"] != used[0]["actual"]


@pytest.mark.slow
def test_server_pretraining_is_shown_in_the_synthetic_data_section(finished_run):
    """A run whose server pretrained on the synthetic pool: the section says so, with the
    model's digest before and after, and the page renders with every reference resolved."""
    report = _report(finished_run["project"])
    pretraining = {"samples": 120, "epochs": 2, "lr": 0.01, "batch_size": 64, "seed": 42,
                   "initial_digest": "a" * 64, "pretrained_digest": "b" * 64, "loss_by_epoch": [0.7, 0.4]}  # fmt: skip
    summary = {"extra_training_data": "none", "pretraining": pretraining, "synthetic_train_samples": {}}
    manifest = {"enabled": True, "use": "pretraining", "total": 120, "seed": 0, "gate": {"success": True},
                "generator": {"architecture": "conditional_vae", "sha256": "c" * 64, "trained": True}}  # fmt: skip
    report["synthetic_data"] = data_sections.synthetic_data(summary, manifest, {"success": True}, None)
    assert report["synthetic_data"]["status"] == "PASS" and report["synthetic_data"]["used_by_run"] is True
    html = render.render_html(report, project_root=finished_run["project"], strict=True)
    assert "server pretraining" in html and "120 synthetic images, 2 epoch(s)" in html
    assert "pretrained the shared model on 120 synthetic images" in html
