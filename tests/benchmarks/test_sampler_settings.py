"""Choosing the flow's sampling settings on validation data, on a tiny saved project.

The project is laid out as `make run` leaves it (partition files, a trained flow record,
the shipped parameters shrunk); the benchmark's own ``run`` scores each setting with one
validation-only ruler.
"""

from __future__ import annotations

import json

import pytest
import yaml

from fedmic_pipeline import synthetic_sets
from fedmic_pipeline.benchmarks import sampler_settings
from fedmic_pipeline.datasets.torch_model_dataset import TorchModelDataset
from fedmic_pipeline.pipelines.data_partition import nodes as partition_nodes

from fixtures_pipelines import make_project, project_params, synthetic_dataset, write_partition


def _tiny_synthetic(project, architecture: str) -> dict:
    path = project / "conf/base/parameters_synthetic_generation.yml"
    params = yaml.safe_load(path.read_text())
    s = params["synthetic"]
    s["num_threads"] = 1
    options = {"architecture": "flow_matching", "widths": [8, 16], "embed_dim": 8, "sample_steps": 2} if architecture == "flow" else {"latent_dim": 4, "widths": [8, 16], "embed_dim": 4}
    s["generator"].update(rounds=2, local_epochs=1, batch_size=32, model_options=options,
                          cond_dropout=0.2 if architecture == "flow" else 0.0, fit_latent=False, device_noise=True)  # fmt: skip
    s["quality"].update(encoder_epochs=1, classifier_epochs=1, batch_size=32, model_options={"widths": [4, 8, 8], "feature_dim": 8},
                        min_per_cell=4, max_metric_samples=200)  # fmt: skip
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return s


def _saved_project(tmp_path, architecture: str):
    project = make_project(tmp_path)
    dataset, info = synthetic_dataset()
    params = project_params(min_samples_per_client=15)
    plan = partition_nodes.build_partition_plan(dataset, info, params["partition"], params["devices"])
    clients, global_test, manifest, _ = partition_nodes.materialise_partition(dataset, info, plan, params["partition"], params["devices"], True)
    manifest = json.loads(json.dumps(manifest))
    write_partition(project, clients, global_test, manifest)
    synthetic = _tiny_synthetic(project, architecture)
    record, _ = synthetic_sets.train_generator(clients, manifest, synthetic)
    TorchModelDataset(filepath=str(project / "data/05_model_input/synthetic_generator.pt")).save(record)
    return project


def test_every_setting_is_scored_on_validation_and_the_cheapest_near_best_is_chosen(tmp_path):
    project = _saved_project(tmp_path, "flow")
    rows = sampler_settings.run([(1, 1.0, 1.0), (1, 2.0, 1.0), (3, 1.0, 1.0), (3, 2.0, 1.0)], threads=1, root=project)
    assert [(r["sample_steps"], r["guidance"]) for r in rows] == [(1, 1.0), (1, 2.0), (3, 1.0), (3, 2.0)]
    assert [r["network_passes_per_image"] for r in rows] == [1, 2, 5, 10]
    assert all(r["validation"]["cas_held_out"] is None for r in rows)  # validation has no held-out device
    assert len({round(r["validation"]["fd"], 9) for r in rows}) == 4  # the settings change the samples
    chosen = sampler_settings.choose(rows)
    best = min(r["validation"]["fd"] for r in rows)
    assert chosen["validation"]["fd"] <= sampler_settings.FD_TOLERANCE * best
    assert all(r["network_passes_per_image"] >= chosen["network_passes_per_image"]
               for r in rows if r["validation"]["fd"] <= sampler_settings.FD_TOLERANCE * best)  # fmt: skip
    text = sampler_settings.markdown(rows, threads=1)
    assert "**(chosen)**" in text and f"sample_steps {chosen['sample_steps']}" in text


def test_a_vae_record_is_refused_with_the_command_that_trains_the_flow(tmp_path):
    project = _saved_project(tmp_path, "vae")
    with pytest.raises(SystemExit, match="architecture=flow_matching"):
        sampler_settings.run([(2, 1.0, 1.0)], threads=1, root=project)


def test_settings_parse_from_the_command_line_or_say_the_format():
    assert sampler_settings.parse_setting("8:2") == (8, 2.0, 1.0)
    assert sampler_settings.parse_setting("4:1.5:0.9") == (4, 1.5, 0.9)
    with pytest.raises(Exception, match="steps:guidance"):
        sampler_settings.parse_setting("8")
