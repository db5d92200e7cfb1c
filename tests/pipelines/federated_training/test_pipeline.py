"""The training and evaluation pipelines against a real MLflow store in a temp folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.pipelines.federated_training.nodes import train_federated
from fixtures_pipelines import make_project, training_params, write_training_params
from fixtures_pipelines import small_federation as in_memory_federation


@pytest.fixture(scope="module")
def small_federation():
    """An easy 3-class task (brightness encodes the class) split over 10 hospitals."""
    return in_memory_federation(num_clients=10)


def _train(federation, **training_overrides):
    clients, global_test, info, manifest = federation
    params = training_params(**training_overrides)
    return train_federated(clients, manifest, info, params["training"], params["algorithm_params"])


def test_same_seed_gives_the_same_run_on_the_cpu(small_federation):
    models_a, history_a, comm_a, _ = _train(small_federation, algorithm="fedmic", seed=3)
    models_b, history_b, comm_b, _ = _train(small_federation, algorithm="fedmic", seed=3)
    cols = [
        "train_loss", "train_accuracy", "global_val_balanced_accuracy", "personalized_val_balanced_accuracy", "bytes_up_total"
    ]  # fmt: skip
    assert history_a[cols].equals(history_b[cols])
    assert comm_a.equals(comm_b)
    for key, value in models_a["global"]["state_dict"].items():
        assert np.array_equal(value.numpy(), models_b["global"]["state_dict"][key].numpy()), key


def test_fedmic_uploads_less_than_fedavg_and_keeps_teachers_personal(small_federation):
    fedavg_models, _, fedavg_comm, fedavg_summary = _train(small_federation, algorithm="fedavg")
    fedmic_models, _, fedmic_comm, fedmic_summary = _train(small_federation, algorithm="fedmic")
    assert fedmic_comm["bytes_up"].sum() < fedavg_comm["bytes_up"].sum()
    assert (fedavg_comm["bytes_up"] == fedavg_comm["bytes_dense_one_way"]).all()
    assert fedmic_summary["algorithm_config"]["algorithm"] == "fedmic"
    # The personalized model of FedMIC is the teacher; FedAvg's is the global student.
    assert fedmic_models["client_00"]["state_dict"].keys() != fedmic_models["global"]["state_dict"].keys() or (
        fedmic_models["client_00"]["architecture"] == "student_cnn"
    )
    assert set(fedavg_models) == {"global", "global_last", *(f"client_{k:02d}" for k in range(10))}


@pytest.mark.parametrize(
    ("overrides", "algorithm_overrides", "message"),
    [
        ({"algorithm": "fedsgd"}, {}, "Unknown algorithm 'fedsgd'. Valid algorithms:"),
        ({"join_ratio": 0.0}, {}, "join_ratio must be in \\(0, 1\\]"),
        ({"algorithm": "fedmic"}, {"energy_end": 1.5}, "energy"),
        ({"algorithm": "fedmic"}, {"energy_start": 0.0}, "energy"),
        ({"num_round": 1}, {}, r"Unknown key\(s\) \['num_round'\] in the `training` block.*num_rounds"),
    ],
)
def test_bad_configuration_fails_before_training(small_federation, overrides, algorithm_overrides, message):
    clients, global_test, info, manifest = small_federation
    params = training_params(**overrides)
    params["algorithm_params"]["fedmic"].update(algorithm_overrides)
    never_loaded = {key: _explode for key in clients}  # training would load client data first
    with pytest.raises(ConfigurationError, match=message):
        train_federated(never_loaded, manifest, info, params["training"], params["algorithm_params"])


def _explode():
    raise AssertionError("client data was loaded: the bad configuration was not caught before training")


def test_more_clients_than_samples_is_refused(small_federation):
    clients, global_test, info, manifest = small_federation
    tiny = {}
    for key, arrays in clients.items():
        tiny[key] = {**arrays, "train_images": arrays["train_images"][:0], "train_labels": arrays["train_labels"][:0]}
    params = training_params(algorithm="fedavg")
    with pytest.raises(ConfigurationError, match="(?i)sample|empty"):
        train_federated(tiny, None, info, params["training"], params["algorithm_params"])


@pytest.mark.slow
def test_kedro_training_and_evaluation_log_a_complete_mlflow_run(project_root, tmp_path, monkeypatch):
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path)
    params = training_params(algorithm="fedavg")
    params["evaluation"]["n_bootstrap"] = 50
    write_training_params(project, params)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(project)

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["data_partition", "federated_training", "evaluation"])
    mlflow.set_tracking_uri(tracking_uri)

    run_info = json.loads((project / "data/07_model_output/mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_info["mlflow_run_id"])
    assert run.data.params["training.algorithm"] == "fedavg"
    assert run.data.params["training.seed"] == str(params["training"]["seed"])
    assert run.data.params["resolved.lr"] == str(float(params["algorithm_params"]["common"]["lr"]))
    for tag in ("git_commit", "git_dirty", "partition.manifest_sha256", "dataset.flag", "seed"):
        assert tag in run.data.tags
    history = client.get_metric_history(run.info.run_id, "global_val_balanced_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bytes_up_total")] == [1, 2]
    # Evaluation wrote its headline numbers into the same run, and a DVC metrics file.
    assert "final.global.accuracy" in run.data.metrics
    metrics = json.loads((project / "data/08_reporting/evaluation/metrics.json").read_text())
    assert metrics["global.accuracy"] == pytest.approx(run.data.metrics["final.global.accuracy"])
    # The global model is registered, with a signature, and loads back.
    version = client.get_model_version(run_info["registered"]["registered_model"], str(run_info["registered"]["version"]))
    assert version.run_id == run.info.run_id
    model_info = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}")
    assert model_info.signature is not None
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"personalized_models", "evaluation"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "personalized_models")) == 10


def test_pretraining_on_the_synthetic_pool_is_recorded_in_the_summary_mlflow_and_audit(small_federation, tmp_path, monkeypatch):
    """With the synthetic sets (FedSSG mode) the server pretrains the shared model by default;
    the run summary, the MLflow run and the audit's synthetic-data section all say so, with the
    digests of the model before and after."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from fedmic_pipeline.audit.data_sections import synthetic_data
    from fedmic_pipeline.tracking.mlflow_logging import log_training_run

    clients, _, info, manifest = small_federation
    synthetic = {
        name: {"images": arrays["train_images"][:6], "labels": arrays["train_labels"][:6],
               "devices": np.full(6, int(arrays["device"])), "is_synthetic": np.ones(6, dtype=bool)}
        for name, arrays in clients.items()
    }  # fmt: skip
    params = training_params(algorithm="fedavg", extra_training_data="synthetic")
    models, history, _, summary = train_federated(
        clients, manifest, info, params["training"], params["algorithm_params"], {k: (lambda v=v: v) for k, v in synthetic.items()}
    )
    pretraining = summary["pretraining"]
    assert pretraining["samples"] == 6 * len(clients) and pretraining["epochs"] == params["training"]["pretraining"]["epochs"]
    assert pretraining["initial_digest"] != pretraining["pretrained_digest"]
    plain = train_federated(clients, manifest, info, {**params["training"], "pretraining": {"enabled": False}},
                            params["algorithm_params"], {k: (lambda v=v: v) for k, v in synthetic.items()})  # fmt: skip
    assert plain[3]["pretraining"] is None
    assert not history["train_loss"].equals(plain[1]["train_loss"]), "round 1 must start from the pretrained model"

    monkeypatch.chdir(tmp_path)
    tracking_uri, previous_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(experiment_id=client.create_experiment("pretraining")) as run:
            log_training_run(history, summary, {}, info, manifest, seed=params["training"]["seed"])
    finally:
        mlflow.set_tracking_uri(previous_uri)
    logged = client.get_run(run.info.run_id).data
    assert logged.params["pretraining.samples"] == str(pretraining["samples"])
    assert logged.tags["pretraining.pretrained_digest"] == pretraining["pretrained_digest"]
    assert logged.metrics["pretraining.loss"] == pytest.approx(pretraining["loss_by_epoch"][-1])

    section = synthetic_data(summary, {"enabled": True, "total": 60, "gate": {"success": True}}, {"success": True}, None)
    assert section["used_by_run"] is True and section["pretraining"] == pretraining
    assert f"pretrained the shared model on {pretraining['samples']} synthetic images" in section["statement"]
    assert pretraining["pretrained_digest"][:12] in section["statement"]
