"""The `data_partition` pipeline: its nodes on synthetic data, and real Kedro runs of the stage."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmic_pipeline.core.partition import SPLIT_NAMES, PartitionError
from fedmic_pipeline.datasets.npz_dataset import load_npz
from fedmic_pipeline.pipelines.data_partition import nodes

from fixtures_pipelines import N_CLASSES, make_project, project_params, synthetic_dataset


# ---- nodes called directly (fast) ------------------------------------------------------

@pytest.mark.parametrize("rgb", [False, True])
def test_materialised_clients_match_the_plan(rgb):
    dataset, info = synthetic_dataset(rgb=rgb)
    params = project_params(min_samples_per_client=15)
    plan = nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    placement, test_hashes = nodes.build_placement_table(dataset, plan, params["devices"])
    assert list(placement.columns) == ["origin", "client", "local_split", "label", "device", "pixel_sha1"]
    assert placement["origin"].tolist() == list(range(600))
    assert len(test_hashes) == 60

    clients, global_test, manifest, counts = nodes.materialise_partition(
        dataset, info, plan, params["partition"], params["devices"], True
    )
    pool_images = np.concatenate([dataset["train_images"], dataset["val_images"]])
    pool_labels = np.concatenate([dataset["train_labels"], dataset["val_labels"]])
    held_out = params["devices"]["held_out"]
    names = [p["name"] for p in params["devices"]["profiles"]]
    assert sorted(clients) == [f"client_{k:02d}" for k in range(10)]
    seen = []
    for cid, arrays in clients.items():
        device = int(arrays["device"])
        assert arrays["device"].shape == () and arrays["device"].dtype == np.int64
        assert names[device] != held_out
        for split in SPLIT_NAMES:
            origin = arrays[f"{split}_origin"]
            assert np.array_equal(arrays[f"{split}_labels"], pool_labels[origin])
            assert arrays[f"{split}_images"].shape == (origin.size,) + pool_images.shape[1:]
            assert arrays[f"{split}_images"].dtype == np.uint8
            seen.append(origin)
        if names[device] == "reference_scanner":  # the identity device keeps pixels as they are
            assert np.array_equal(arrays["train_images"], pool_images[arrays["train_origin"]])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(600))

    assert list(global_test["device_names"]) == names and global_test["device_names"].dtype.kind == "U"
    for name in names:
        assert global_test[f"images_{name}"].shape == dataset["test_images"].shape
    assert np.array_equal(global_test["images"], dataset["test_images"])

    assert list(counts.columns) == ["client", "class", "device", "local_split", "count"]
    assert int(counts["count"].sum()) == 600
    assert sum(v for c in manifest["counts"].values() for cls in c.values() for v in cls.values()) == 600
    assert sum(s["total"] for s in manifest["split_sizes"].values()) == 600
    json.dumps(manifest)  # JSON-ready


def test_materialise_refuses_without_the_gate():
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    plan = nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    with pytest.raises(RuntimeError, match="gate"):
        nodes.materialise_partition(dataset, info, plan, params["partition"], params["devices"], False)


def test_bad_input_names_the_fix():
    dataset, info = synthetic_dataset()
    del dataset["val_labels"]
    params = project_params()
    with pytest.raises(nodes.PartitionInputError, match="re-run the data_ingestion pipeline"):
        nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])


def test_plots_are_figures_with_the_expected_axes():
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    plan = nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    _, global_test, _, counts = nodes.materialise_partition(dataset, info, plan, params["partition"], params["devices"], True)
    bubble = nodes.plot_class_by_client(counts, info, params["partition"])
    assert "K = 10" in bubble.axes[0].get_title() and "0.3" in bubble.axes[0].get_title()
    devices = nodes.plot_device_by_client(counts, params["partition"], params["devices"])
    assert any("unseen" in t.get_text() for t in devices.axes[0].get_yticklabels())
    examples = nodes.plot_device_examples(global_test, info, params["devices"])
    assert len(examples.axes) == len(params["devices"]["profiles"]) * N_CLASSES * 3


@pytest.mark.slow
def test_gate_nodes_pass_a_good_plan_and_stop_a_leaking_one(tmp_path):
    from fedmic_pipeline.validation.gate import DataGateError

    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    plan = nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    placement, test_hashes = nodes.build_placement_table(dataset, plan, params["devices"])
    gate = {"docs_dir": str(tmp_path / "docs")}
    report = nodes.validate_partition_placement(placement, plan, test_hashes, params["partition"], gate)
    assert nodes.enforce_partition_gate(report) is True

    leaking = placement.copy()
    leaking.loc[3, "pixel_sha1"] = test_hashes[0]  # a global test image inside a client
    report = nodes.validate_partition_placement(leaking, plan, test_hashes, params["partition"], gate)
    with pytest.raises(DataGateError, match="No client file was written"):
        nodes.enforce_partition_gate(report)


# ---- real Kedro runs (slow: a session, Great Expectations, file I/O) -------------------

def _run(project: Path) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["data_partition"])


def _snapshot(project: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted((project / "data/05_model_input").rglob("*")):
        if path.is_file():
            out[path.relative_to(project).as_posix()] = path.read_bytes()
    out["counts"] = (project / "data/08_reporting/partition/counts_client_class_device.csv").read_bytes()
    return out


@pytest.mark.slow
def test_kedro_run_writes_everything_and_is_byte_identical(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.chdir(project)  # relative parameter paths (data docs, mlflow.db) stay in the temp project

    _run(project)
    first = _snapshot(project)

    clients = sorted((project / "data/05_model_input/clients").glob("*.npz"))
    assert [p.stem for p in clients] == [f"client_{k:02d}" for k in range(10)]
    manifest = json.loads((project / "data/05_model_input/partition_manifest.json").read_text())
    for key in ("parameters", "seeds", "attempts_used", "client_devices", "held_out_device", "counts",
                "split_sizes", "sha256", "mean_label_entropy_nats", "dataset"):
        assert key in manifest
    assert manifest["dataset"]["flag"] == "synthetic"
    assert sum(s["total"] for s in manifest["split_sizes"].values()) == 600
    for path in clients:  # the manifest's hashes are those of the array files inside each .npz
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[: -len(".npy")]: hashlib.sha256(archive.read(info)).hexdigest() for info in archive.infolist()}
        assert members == manifest["sha256"][path.stem]
        arrays = load_npz(path)
        assert sum(arrays[f"{s}_labels"].size for s in SPLIT_NAMES) == manifest["split_sizes"][path.stem]["total"]
        assert manifest["client_devices"][path.stem]["device_id"] == arrays["device"].item()
    counts = pd.read_csv(project / "data/08_reporting/partition/counts_client_class_device.csv")
    assert int(counts["count"].sum()) == 600
    report = json.loads((project / "data/08_reporting/data_gate/partition_validation.json").read_text())
    assert report["success"] is True
    for name in ("class_by_client.png", "device_by_client.png", "device_examples.png"):
        png = project / "data/08_reporting/partition" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "data/08_reporting/data_docs").is_dir()

    _run(project)
    assert _snapshot(project) == first


@pytest.mark.slow
def test_kedro_run_stops_at_the_redraw_bound_before_writing(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    params = project_params(min_samples_per_client=58, dirichlet_lambda=0.05, max_redraws=20)
    (project / "conf/base/parameters_data_partition.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    with pytest.raises(PartitionError, match="smallest client had") as info:
        _run(project)
    assert "min_samples_per_client" in str(info.value) and "dirichlet_lambda" in str(info.value)
    assert not (project / "data/05_model_input/clients").exists()
