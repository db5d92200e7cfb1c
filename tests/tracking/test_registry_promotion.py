"""Champion promotion on a real MLflow registry (SQLite in a temp folder, real registered versions).

Each version is registered the way training does it (`register_global_model`: a real
pytorch-flavour model with a signature), carries the lineage tags training sets, and gets
its `final.*` metric the way evaluation logs it, into the same run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmic_pipeline.tracking import registry
from fedmic_pipeline.tracking.registry import PromotionConfigError, PromotionRule

DATA_A = ("a" * 64, "md5-of-raw-file-a")
DATA_B = ("b" * 64, "md5-of-raw-file-a")  # same raw file, another partition: another data version
METRIC = "final.global.balanced_accuracy"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A throw-away tracking + registry store; the previous tracking URI is restored after."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("promotion-tests")
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def tiny_record():
    from fedmic_pipeline.core.models import build_model, model_record
    from fedmic_pipeline.core.protocol import DataSpec

    model = build_model("student_cnn", DataSpec(in_channels=1, num_classes=2, image_size=8), seed=0, widths=(4, 4, 4), feature_dim=8)
    return model_record(model)


def _train_and_register(name, value, data, record, metric=METRIC):
    """One 'training run': lineage tags, registered global model, then evaluation's final metric."""
    import mlflow

    from fedmic_pipeline.tracking.mlflow_logging import register_global_model

    with mlflow.start_run() as run:
        mlflow.set_tags({"partition.manifest_sha256": data[0], "dataset.md5": data[1]})
        registered = register_global_model(record, name)
    from mlflow.tracking import MlflowClient

    if value is not None:
        MlflowClient().log_metric(run.info.run_id, metric, value)
    return {"mlflow_run_id": run.info.run_id, "registered": registered}


def _promote(tracking, store, **rule):
    return registry.promote_from_tracking(tracking, {}, {"metric": METRIC, "min_improvement": 0.005, **rule}, tracking_uri=store)


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store)


def _champion(store, name, alias="champion"):
    version = _client(store).get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def test_first_version_becomes_champion_and_the_registry_says_why(store, tiny_record):
    name = "first-global"
    tracking = _train_and_register(name, 0.70, DATA_A, tiny_record)
    decision = _promote(tracking, store)

    assert decision["decision"] == "promoted" and decision["promoted"] is True
    assert "no champion yet" in decision["reason"]
    assert decision["compared"] is False and decision["compared_with"] is None
    key = decision["candidate"]["data_version"]["key"]
    assert _champion(store, name) == "1"
    assert _champion(store, name, f"champion-{key}") == "1"
    tags = _client(store).get_model_version(name, "1").tags
    assert tags["promotion.decision"] == "promoted"
    assert "no champion yet" in tags["promotion.reason"]
    assert tags["promotion.metric"] == METRIC and tags["promotion.candidate_value"] == repr(0.70)
    assert tags["data.partition_manifest_sha256"] == DATA_A[0] and tags["data.dataset_md5"] == DATA_A[1]
    # Running the node again (e.g. `dvc repro` of the evaluate stage) changes nothing.
    again = _promote(tracking, store)
    assert again["decision"] == "already_champion" and _champion(store, name) == "1"
    assert again["original_decision"]["decision"] == "promoted"  # the tags keep the decision that made it champion
    assert _client(store).get_model_version(name, "1").tags["promotion.decision"] == "promoted"


def test_a_better_version_takes_over_and_worse_or_marginal_ones_do_not(store, tiny_record):
    name = "same-data-global"
    _promote(_train_and_register(name, 0.70, DATA_A, tiny_record), store)  # v1: champion

    better = _promote(_train_and_register(name, 0.72, DATA_A, tiny_record), store)  # v2: +0.02
    assert better["decision"] == "promoted" and better["compared"] is True
    assert better["compared_with"]["version"] == "1" and better["improvement"] == pytest.approx(0.02)
    assert _champion(store, name) == "2"
    assert _client(store).get_model_version(name, "1").tags["promotion.replaced_by"] == "2"

    marginal = _promote(_train_and_register(name, 0.722, DATA_A, tiny_record), store)  # v3: +0.002 < 0.005
    assert marginal["decision"] == "not_promoted" and marginal["compared"] is True
    assert "does not beat" in marginal["reason"] and "required >= 0.005" in marginal["reason"]

    worse = _promote(_train_and_register(name, 0.60, DATA_A, tiny_record), store)  # v4
    assert worse["decision"] == "not_promoted" and worse["improvement"] == pytest.approx(-0.12)
    assert _champion(store, name) == "2"
    tags = _client(store).get_model_version(name, "4").tags
    assert tags["promotion.decision"] == "not_promoted"
    assert tags["promotion.compared_with_version"] == "2"
    assert float(tags["promotion.champion_value"]) == pytest.approx(0.72)
    assert float(tags["promotion.candidate_value"]) == pytest.approx(0.60)


def test_versions_on_different_data_are_never_compared(store, tiny_record):
    name = "cross-data-global"
    first = _promote(_train_and_register(name, 0.90, DATA_A, tiny_record), store)  # v1 on A
    key_a = first["candidate"]["data_version"]["key"]

    # v2 on data B scores far lower, yet becomes champion: B has no champion, and A's number is no yardstick.
    on_b = _promote(_train_and_register(name, 0.60, DATA_B, tiny_record), store)
    key_b = on_b["candidate"]["data_version"]["key"]
    assert key_a != key_b
    assert on_b["decision"] == "promoted" and on_b["compared"] is False and on_b["compared_with"] is None
    assert f"no champion for data version {key_b}" in on_b["reason"] and "not comparable" in on_b["reason"]
    assert on_b["previous_champion"]["version"] == "1"
    assert _champion(store, name) == "2"
    assert _champion(store, name, f"champion-{key_a}") == "1"  # A keeps its own champion
    assert _client(store).get_model_version(name, "2").tags["promotion.compared"] == "False"

    # v3 on data A beats v2's 0.60 but not A's champion (0.90): it is judged against A only.
    on_a = _promote(_train_and_register(name, 0.70, DATA_A, tiny_record), store)
    assert on_a["decision"] == "not_promoted"
    assert on_a["compared_with"]["version"] == "1" and on_a["compared_with"]["value"] == pytest.approx(0.90)
    assert _champion(store, name) == "2"


def test_lower_is_better_metric(store, tiny_record):
    name = "ece-global"
    rule = {"metric": "final.global.ece", "greater_is_better": False, "min_improvement": 0.0}
    registry.promote_from_tracking(_train_and_register(name, 0.20, DATA_A, tiny_record, "final.global.ece"), {}, rule, store)
    lower = registry.promote_from_tracking(_train_and_register(name, 0.10, DATA_A, tiny_record, "final.global.ece"), {}, rule, store)
    higher = registry.promote_from_tracking(_train_and_register(name, 0.15, DATA_A, tiny_record, "final.global.ece"), {}, rule, store)
    assert lower["decision"] == "promoted" and higher["decision"] == "not_promoted"
    assert _champion(store, name) == "2"


def test_candidate_metric_falls_back_to_the_evaluation_file(store, tiny_record):
    name = "fallback-global"
    tracking = _train_and_register(name, None, DATA_A, tiny_record)  # nothing logged in the run
    decision = registry.promote_from_tracking(tracking, {"global.balanced_accuracy": 0.8}, {"metric": METRIC}, store)
    assert decision["decision"] == "promoted" and decision["candidate"]["value"] == pytest.approx(0.8)


def test_the_default_rule_decides_on_validation_and_never_promotes_below_the_majority_baseline(store, tiny_record):
    from mlflow.tracking import MlflowClient

    assert PromotionRule().metric == "total.selected_global_val_balanced_accuracy"  # validation, not the test set
    name = "majority-floor-global"
    tracking = _train_and_register(name, 0.5, DATA_A, tiny_record, metric="total.selected_global_val_balanced_accuracy")
    MlflowClient().log_metric(tracking["mlflow_run_id"], registry.MAJORITY_METRIC, 0.5)  # two classes: 1 / K
    first = registry.promote_from_tracking(tracking, {}, {}, tracking_uri=store)
    assert first["decision"] == "not_promoted" and "majority-class baseline" in first["reason"]
    assert _champion(store, name) is None  # not even the first version of a data version
    assert _client(store).get_model_version(name, "1").tags["promotion.majority_baseline"] == repr(0.5)

    better = _train_and_register(name, 0.61, DATA_A, tiny_record, metric="total.selected_global_val_balanced_accuracy")
    MlflowClient().log_metric(better["mlflow_run_id"], registry.MAJORITY_METRIC, 0.5)
    assert registry.promote_from_tracking(better, {}, {}, tracking_uri=store)["decision"] == "promoted"
    assert _champion(store, name) == "2"


def test_a_registered_model_ships_its_code_and_requirements(store, tiny_record, tmp_path):
    """The registered model needs only torch, numpy (and MLflow to load it) and the core it carries (code/), which
    imports neither Kedro nor MLflow; it loads and predicts like the record it came from."""
    import subprocess
    import sys

    import torch
    from mlflow.artifacts import download_artifacts

    from fedmic_pipeline.core.models import model_from_record

    tracking = _train_and_register("shipped-global", 0.7, DATA_A, tiny_record)
    uri = f"models:/shipped-global/{tracking['registered']['version']}"
    local = Path(download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"torch", "numpy", "mlflow"}  # mlflow: the loader itself
    core = local / "code/fedmic_pipeline/core"
    assert (core / "models.py").is_file() and not (local / "code/fedmic_pipeline/pipelines").exists()
    # the shipped core imports only torch and numpy: load it alone, in a fresh interpreter
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fedmic_pipeline.core.models as m; "
        "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('kedro', 'mlflow', 'great_expectations', 'flwr')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", probe, str(local / "code")], check=True, cwd=tmp_path)
    # MLflow's loader puts the shipped code first on sys.path (and re-imports it): load in a
    # child process, so this test process (and what it spawns later) keeps the project's package
    x = torch.rand(3, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    loader = (
        "import sys, torch, mlflow, mlflow.pytorch; mlflow.set_tracking_uri(sys.argv[1]); "
        "model = mlflow.pytorch.load_model(sys.argv[2]); "
        "torch.save(model(torch.load(sys.argv[3])).detach(), sys.argv[4])"
    )
    subprocess.run([sys.executable, "-c", loader, store, uri, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True)
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), model_from_record(tiny_record)(x))


def test_nothing_to_promote_is_a_skipped_decision(store):
    assert registry.promote_from_tracking({"mlflow_run_id": None}, {}, {}, store)["decision"] == "skipped"
    no_model = registry.promote_from_tracking({"mlflow_run_id": "abc", "registered": None}, {}, {}, store)
    assert no_model["decision"] == "skipped" and "no global model" in no_model["reason"]
    disabled = registry.promote_from_tracking({"mlflow_run_id": "abc"}, {}, {"enabled": False}, store)
    assert disabled["decision"] == "skipped" and "enabled is false" in disabled["reason"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"metrc": "x"}, "Unknown key\\(s\\) \\['metrc'\\] in params:promotion"),
        ({"alias": "latest"}, "not a valid MLflow alias"),
        ({"alias": "v2"}, "not a valid MLflow alias"),
        ({"min_improvement": -1}, "min_improvement must be a number >= 0"),
        ({"metric": ""}, "promotion.metric must name a metric"),
    ],
)
def test_bad_rules_name_the_key_to_fix(params, message):
    with pytest.raises(PromotionConfigError, match=message):
        PromotionRule.from_params(params)
