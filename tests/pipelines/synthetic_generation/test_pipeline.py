"""The `synthetic_generation` pipeline: its nodes on a tiny real partition, its data gate,
a real Kedro run, and the DVC stage `synthesize`.

The tiny partition is made by the project's own data_partition nodes from a small
MedMNIST-shaped dataset (16x16, 3 classes), so every test sees the real file layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.figure import Figure

from fedmic_pipeline import synthetic_sets
from fedmic_pipeline.core.synthesis import SynthesisPlan, client_count_matrix, generator_from_record, state_sha256
from fedmic_pipeline.datasets.npz_dataset import load_npz
from fedmic_pipeline.pipelines.data_partition import nodes as partition_nodes
from fedmic_pipeline.pipelines.synthetic_generation import nodes

from fixtures_pipelines import PROJECT_ROOT as ROOT
from fixtures_pipelines import copy_project, write_partition
N_CLASSES = 3
KEYS = ["devices", "images", "is_synthetic", "labels"]


def tiny_dataset(seed: int = 0):
    """A small imbalanced `validated_dataset` + `dataset_info` (16x16 grey, 3 classes)."""
    rng = np.random.default_rng(seed)
    dataset = {}
    for split, n in (("train", 500), ("val", 100), ("test", 60)):
        labels = rng.choice(N_CLASSES, size=n, p=[0.2, 0.3, 0.5]).astype(np.int64)
        base = (40 + 60 * labels).reshape(n, 1, 1)
        dataset[f"{split}_images"] = np.clip(base + rng.integers(0, 80, size=(n, 16, 16)), 0, 255).astype(np.uint8)
        dataset[f"{split}_labels"] = labels
        dataset[f"{split}_source_index"] = np.arange(n, dtype=np.int64)
    info = {"flag": "tiny", "n_classes": N_CLASSES, "n_channels": 1, "label_names": {"0": "calm", "1": "mild", "2": "severe"}}
    return dataset, info


def tiny_synthetic_params(**overrides) -> dict:
    """The project's parameters shrunk to seconds: 2 rounds, thin models, 1-epoch quality models."""
    params = yaml.safe_load((ROOT / "conf/base/parameters_synthetic_generation.yml").read_text())
    s = params["synthetic"]
    s["num_threads"] = 1  # parallel test workers get one thread each
    s["cache_dir"] = None  # tests opt in with a temporary folder
    s["generator"].update(rounds=2, local_epochs=1, batch_size=32, model_options={"latent_dim": 4, "widths": [8, 16], "embed_dim": 4})
    s["plan"].update(max_per_client=30, min_cell_support=3)
    s["quality"].update(encoder_epochs=1, classifier_epochs=1, batch_size=32, model_options={"widths": [4, 8, 8], "feature_dim": 8},
                        min_per_cell=4, max_metric_samples=200)  # fmt: skip
    s["report"]["grid_examples"] = 2
    s.update(overrides)
    return params


@pytest.fixture(scope="module")
def partition():
    """(client arrays by name, global test set, manifest) from the real partition nodes."""
    dataset, info = tiny_dataset()
    params = yaml.safe_load((ROOT / "conf/base/parameters_data_partition.yml").read_text())
    params["partition"]["min_samples_per_client"] = 15
    plan = partition_nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    clients, global_test, manifest, _ = partition_nodes.materialise_partition(
        dataset, info, plan, params["partition"], params["devices"], True
    )
    return clients, global_test, json.loads(json.dumps(manifest))


def loaders(clients):
    return {name: (lambda arrays=arrays: arrays) for name, arrays in clients.items()}


@pytest.fixture(scope="module")
def generated(partition):
    """Generator, plan and candidate sets of the tiny partition (computed once)."""
    clients, _, manifest = partition
    synthetic = tiny_synthetic_params()["synthetic"]
    record, training = nodes.train_synthetic_generator(loaders(clients), manifest, synthetic)
    plan = nodes.compute_synthesis_plan(loaders(clients), manifest, synthetic)
    sets = nodes.sample_synthetic_sets(record, plan, manifest, synthetic)
    return record, training, plan, sets, synthetic


# ---- nodes called directly -------------------------------------------------------------------

def test_generator_plan_and_sets_follow_the_contract(partition, generated):
    clients, _, manifest = partition
    record, training, plan_dict, sets, synthetic = generated
    held = manifest["devices"].index(manifest["held_out_device"])
    assert record["sha256"] == state_sha256(generator_from_record(record)) == training["generator_sha256"]
    assert record["trained"] is True and len(training["history"]) == 2
    assert training["bytes_up_total"] > 0 and training["data_used"].startswith("each client's local train split")

    plan = SynthesisPlan.from_dict(plan_dict)
    assert plan_dict["enabled"] is True and plan.held_out_device == held
    assert plan.clients == sorted(clients) == sorted(sets)
    for name, arrays in clients.items():  # the plan was made from the clients' train counts only
        report = client_count_matrix(arrays["train_labels"], int(arrays["device"]), N_CLASSES, len(manifest["devices"]))
        assert plan.client_counts[name] == tuple(tuple(r) for r in report.tolist())
        assert plan.total(name) <= 30
    assert plan.total() > 0
    for name, arrays in sets.items():
        assert sorted(arrays) == KEYS
        n = plan.total(name)
        assert arrays["images"].shape == (n, 16, 16) and arrays["images"].dtype == np.uint8
        assert arrays["labels"].dtype == np.int64 and arrays["devices"].dtype == np.int64
        assert arrays["is_synthetic"].dtype == bool and arrays["is_synthetic"].all()
        assert not (arrays["devices"] == held).any()
        assert np.array_equal(client_count_matrix(arrays["labels"], arrays["devices"], N_CLASSES, 5), plan.count_matrix(name))

    files, manifest_out = nodes.publish_synthetic_sets(sets, record, plan_dict, {"suite": "synthetic", "success": True}, synthetic, True)
    assert sorted(files) == sorted(clients) and all(sorted(v) == KEYS for v in files.values())
    assert manifest_out["generator"]["sha256"] == record["sha256"] and manifest_out["seed"] == synthetic["seed"]
    assert manifest_out["total"] == plan.total() and manifest_out["held_out_device"] == manifest["held_out_device"]
    names = manifest["devices"]
    for name in plan.clients:
        expected = {str(c.class_id): {} for c in plan.cells[name]}
        for c in plan.cells[name]:
            expected[str(c.class_id)][names[c.device]] = c.n
        assert manifest_out["counts"][name] == expected
    with pytest.raises(RuntimeError, match="gate did not pass"):
        nodes.publish_synthetic_sets(sets, record, plan_dict, {}, synthetic, False)


def test_quality_and_grid_nodes(partition, generated):
    clients, global_test, manifest = partition
    record, _, _, _, synthetic = generated
    result, table, markdown = nodes.evaluate_synthetic_quality(record, loaders(clients), global_test, manifest, synthetic)
    assert result["enabled"] is True and result["held_out_device"] == manifest["held_out_device"]
    assert "Inception" in result["reference_encoder_note"]
    test, validation = result["references"]["test"], result["references"]["validation"]
    assert set(test["cas"]["trained_on_synthetic"]) == set(manifest["devices"])
    # the hospitals' validation splits: every training device, never the held-out one
    trained = {manifest["devices"][d["device_id"]] for d in manifest["client_devices"].values()}
    assert set(validation["cas"]["trained_on_synthetic"]) == trained
    assert manifest["held_out_device"] not in trained
    assert set(result["summary"]) == {"validation", "test"} and result["summary"]["validation"]["cas_held_out"] is None
    assert set(table["reference"]) == {"validation", "test"}
    assert {"distribution", "cas"} <= set(table["section"])
    assert {"fd", "mmd2", "precision_k3", "recall_k5"} <= set(table.loc[table.section == "distribution", "metric"])
    assert "| scope |" in markdown and "CAS" in markdown and "Against the validation reference" in markdown
    json.dumps(result)
    figure = nodes.plot_synthetic_grid(record, global_test, manifest, synthetic)
    assert isinstance(figure, Figure)
    trained_devices = {d["device_id"] for d in manifest["client_devices"].values()}
    assert len(figure.axes) == N_CLASSES * len(trained_devices) * 2 * 2


def test_disabled_stage_writes_empty_sets(partition):
    clients, global_test, manifest = partition
    synthetic = tiny_synthetic_params(enabled=False)["synthetic"]
    record, training = nodes.train_synthetic_generator(loaders(clients), manifest, synthetic)
    assert record["trained"] is False and training["rounds"] == 0
    plan = nodes.compute_synthesis_plan(loaders(clients), manifest, synthetic)
    assert plan["total"] == 0 and plan["enabled"] is False
    sets = nodes.sample_synthetic_sets(record, plan, manifest, synthetic)
    assert sorted(sets) == sorted(clients)
    assert all(v["images"].shape == (0, 16, 16) and sorted(v) == KEYS for v in sets.values())
    result, table, _ = nodes.evaluate_synthetic_quality(record, loaders(clients), global_test, manifest, synthetic)
    assert result["enabled"] is False and table.empty


def test_bad_parameters_fail_before_any_work(partition):
    clients, _, manifest = partition
    with pytest.raises(Exception, match="parameters_synthetic_generation.yml"):
        nodes.train_synthetic_generator(loaders(clients), manifest, tiny_synthetic_params(enabeld=True)["synthetic"])
    params = tiny_synthetic_params()["synthetic"]
    params["plan"]["cross_device"] = "sometimes"
    with pytest.raises(Exception, match="cross_device"):
        nodes.compute_synthesis_plan(loaders(clients), manifest, params)


def test_the_stage_reuses_the_generator_ruler_and_report_and_recomputes_what_changed(partition, tmp_path):
    clients, global_test, manifest = partition
    synthetic = {**tiny_synthetic_params()["synthetic"], "cache_dir": str(tmp_path / "cache")}
    record, summary = synthetic_sets.train_generator(clients, manifest, synthetic)
    quality = synthetic_sets.measure_quality(record, clients, global_test, manifest, synthetic)
    assert summary["cache"]["reused"] is False
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert kinds == ["generator", "quality", "quality_ruler"]

    record_again, summary_again = synthetic_sets.train_generator(clients, manifest, synthetic)
    assert summary_again["cache"] == {"key": summary["cache"]["key"], "reused": True}
    assert record_again["sha256"] == record["sha256"]
    assert all(torch.equal(record_again["state_dict"][k], v) for k, v in record["state_dict"].items())
    assert json.dumps(synthetic_sets.measure_quality(record_again, clients, global_test, manifest, synthetic)) == json.dumps(quality)

    # one more round: a new generator and a new report, scored by the ruler already fitted
    longer = {**synthetic, "generator": {**synthetic["generator"], "rounds": 3}}
    record_longer, summary_longer = synthetic_sets.train_generator(clients, manifest, longer)
    assert summary_longer["cache"]["reused"] is False and record_longer["sha256"] != record["sha256"]
    synthetic_sets.measure_quality(record_longer, clients, global_test, manifest, longer)
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert kinds == ["generator", "generator", "quality", "quality", "quality_ruler"]

    # one training pixel changed: the old entries do not apply
    edited = {name: dict(arrays) for name, arrays in clients.items()}
    first = sorted(edited)[0]
    edited[first]["train_images"] = edited[first]["train_images"].copy()
    edited[first]["train_images"][0, 0, 0] ^= 1
    assert synthetic_sets.train_generator(edited, manifest, synthetic)[1]["cache"]["reused"] is False


# ---- the data gate (Great Expectations) --------------------------------------------------------

@pytest.mark.slow
def test_gate_passes_clean_sets_and_catches_a_planted_test_image(partition, generated, tmp_path):
    from fedmic_pipeline.validation.gate import DataGateError

    clients, global_test, manifest = partition
    record, _, plan, sets, synthetic = generated
    synthetic = {**synthetic, "gate": {"docs_dir": str(tmp_path / "docs")}}
    report = nodes.validate_synthetic_sets(sets, plan, loaders(clients), global_test, manifest, synthetic)
    assert report["success"] is True, nodes.__name__
    assert nodes.enforce_synthetic_gate(report) is True

    planted = {k: {kk: vv.copy() for kk, vv in v.items()} for k, v in sets.items()}
    victim = next(k for k in sorted(planted) if planted[k]["labels"].size)
    planted[victim]["images"][0] = global_test["images_reference_scanner"][5]  # a test image inside a synthetic set
    report = nodes.validate_synthetic_sets(planted, plan, loaders(clients), global_test, manifest, synthetic)
    assert report["success"] is False
    failed = [r for r in report["results"] if not r["success"]]
    assert [r["kwargs"]["column"] for r in failed] == ["pixel_sha1"]
    with pytest.raises(DataGateError, match="No synthetic file was written"):
        nodes.enforce_synthetic_gate(report)

    held = manifest["devices"].index(manifest["held_out_device"])
    broken = {k: {kk: vv.copy() for kk, vv in v.items()} for k, v in sets.items()}
    broken[victim]["devices"][0] = held  # the held-out device (also breaks the planned counts)
    broken[victim]["is_synthetic"][1] = False
    report = nodes.validate_synthetic_sets(broken, plan, loaders(clients), global_test, manifest, synthetic)
    failed = {(r["suite"], r["type"], r["kwargs"].get("column", r["kwargs"].get("column_A"))) for r in report["results"] if not r["success"]}
    assert ("synthetic_samples", "expect_column_values_to_not_be_in_set", "device") in failed
    assert ("synthetic_samples", "expect_column_values_to_be_in_set", "is_synthetic") in failed
    assert ("synthetic_plan_counts", "expect_column_pair_values_to_be_equal", "planned") in failed

    # the disabled stage: empty sets for every client pass the same gate
    off = {**tiny_synthetic_params(enabled=False)["synthetic"], "gate": {"docs_dir": None}}
    off_record, _ = nodes.train_synthetic_generator(loaders(clients), manifest, off)
    off_plan = nodes.compute_synthesis_plan(loaders(clients), manifest, off)
    off_sets = nodes.sample_synthetic_sets(off_record, off_plan, manifest, off)
    assert nodes.validate_synthetic_sets(off_sets, off_plan, loaders(clients), global_test, manifest, off)["success"] is True


# ---- a real Kedro run ---------------------------------------------------------------------------

def _make_project(tmp: Path, partition, synthetic_params: dict) -> Path:
    project = copy_project(tmp)
    (project / "conf/base/parameters_synthetic_generation.yml").write_text(yaml.safe_dump(synthetic_params, sort_keys=False))
    write_partition(project, *partition)
    return project


@pytest.mark.slow
def test_kedro_run_writes_gated_sets_reports_and_grid(partition, tmp_path, monkeypatch):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    params = tiny_synthetic_params()
    params["synthetic"]["cache_dir"] = "data/09_cache/synthetic"
    project = _make_project(tmp_path, partition, params)
    monkeypatch.chdir(project)  # relative paths (data docs, mlflow.db) stay in the temp project
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["synthetic_generation"])

    clients = partition[0]
    files = sorted((project / "data/05_model_input/synthetic").glob("*.npz"))
    assert [p.stem for p in files] == sorted(clients)
    manifest = json.loads((project / "data/05_model_input/synthetic_manifest.json").read_text())
    plan = SynthesisPlan.from_dict(json.loads((project / "data/05_model_input/synthesis_plan.json").read_text()))
    for path in files:
        arrays = load_npz(path)
        assert sorted(arrays) == KEYS and arrays["is_synthetic"].all()
        assert arrays["labels"].size == plan.total(path.stem) == manifest["totals"][path.stem]
    assert manifest["gate"]["success"] is True
    report = json.loads((project / "data/08_reporting/data_gate/synthetic_validation.json").read_text())
    assert report["success"] is True and report["evaluation_images_hashed"] > 0
    quality = json.loads((project / "data/08_reporting/synthetic/quality.json").read_text())
    assert quality["enabled"] is True and quality["generator_sha256"] == manifest["generator"]["sha256"]
    assert (project / "data/08_reporting/synthetic/quality.md").read_text().startswith("# Synthetic sample quality")
    assert (project / "data/08_reporting/synthetic/quality_table.csv").read_text().startswith("reference,section,scope")
    assert (project / "data/08_reporting/synthetic/sample_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "data/05_model_input/synthetic_generator.pt").is_file()

    # the same inputs again: nothing retrained, every published byte the same
    outputs = [*files, project / "data/05_model_input/synthetic_manifest.json", project / "data/08_reporting/synthetic/quality.json"]
    first = {path: path.read_bytes() for path in outputs}
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["synthetic_generation"])
    training = json.loads((project / "data/08_reporting/synthetic/generator_training.json").read_text())
    assert training["cache"]["reused"] is True
    assert {path: path.read_bytes() for path in outputs} == first
    log = (project / "logs/info.log").read_text()
    assert "result cache: reusing generator" in log and "time by stage (its nodes' wall time): synthetic_generation" in log


# ---- DVC: the `synthesize` stage ------------------------------------------------------------------

def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(KEDRO_DISABLE_TELEMETRY="1", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", MPLBACKEND="Agg")
    return env


def _clean_clone(target: Path) -> Path:
    """The working tree as the next commit would hold it (tracked files plus untracked,
    not-ignored ones: this stage's files may not be committed yet), as a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(["git", "add", "-A"], cwd=target, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], cwd=target, check=True)
    return target


@pytest.mark.slow
def test_dvc_repro_synthesize_then_status_is_clean_and_a_parameter_change_is_seen(tmp_path):
    clone = _clean_clone(tmp_path / "clone")
    params_file = clone / "conf/base/parameters_synthetic_generation.yml"
    tiny = tiny_synthetic_params()
    tiny["synthetic"]["plan"]["max_per_client"] = 20
    params_file.write_text(yaml.safe_dump(tiny, sort_keys=False))  # seconds, not minutes, on the real partition
    env = _tool_env()

    run = subprocess.run(["dvc", "repro", "synthesize"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["synthesize"]
    assert {o["path"] for o in lock["outs"]} >= {"data/05_model_input/synthetic", "data/05_model_input/synthetic_manifest.json"}
    # `synthesize` and its upstream stages only: train/evaluate were not reproduced here
    status = subprocess.run(["dvc", "status", "synthesize", "--json"], cwd=clone, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout

    tiny["synthetic"]["seed"] = 1
    params_file.write_text(yaml.safe_dump(tiny, sort_keys=False))
    status = subprocess.run(["dvc", "status", "synthesize", "--json"], cwd=clone, env=env, capture_output=True, text=True)
    changed = json.loads(status.stdout or "{}")
    assert "synthesize" in changed and "partition" not in changed and "ingest" not in changed
