"""The typed run parameters: one parse of `params:training`, one merge of algorithm params."""

from pathlib import Path

import pytest
import yaml

from fedmic_pipeline.configuration import PARAMS_FILE, TrainingConfig, algorithm_params_for, read_algorithm_params
from fedmic_pipeline.core.protocol import ConfigurationError


def test_the_shipped_training_block_parses_into_the_runner_settings(project_root: Path) -> None:
    block = yaml.safe_load((project_root / PARAMS_FILE).read_text())["training"]
    config = TrainingConfig.from_params(block)
    assert config.algorithm == block["algorithm"]
    assert config.simulation.num_rounds == block["num_rounds"]
    assert config.simulation.seed == config.seed == block["seed"]


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"algorithm": "fedavg", "num_round": 1}, r"Unknown key\(s\) \['num_round'\].*num_rounds"),
        ({"algorithm": "fedavgg"}, "Unknown algorithm 'fedavgg'. Valid algorithms: .*training.algorithm"),
        ({"algorithm": "fedavg", "extra_training_data": "gan"}, "extra_training_data must be one of none, synthetic"),
        ({"algorithm": "fedavg", "checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
        ({"algorithm": "fedavg", "checkpoint_every": True}, "checkpoint_every must be an integer >= 0"),
        ({"algorithm": "fedavg", "resume": "maybe"}, "training.resume must be true, false or auto"),
        ({"algorithm": "fedavg", "resume": True}, "checkpoint_dir is empty: nothing to resume from"),
        ({"algorithm": "fedavg", "join_ratio": 0}, r"join_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_training_blocks_name_the_fix(training: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TrainingConfig.from_params(training)


def test_checkpoint_path_and_resume_spellings() -> None:
    config = TrainingConfig.from_params({"algorithm": "fedmic", "seed": 3, "checkpoint_dir": "ckpt", "resume": "yes"})
    assert config.checkpoint_path == Path("ckpt/fedmic-seed3.pt")
    assert config.resume == "true"
    assert TrainingConfig.from_params({"algorithm": "fedmic"}).checkpoint_path is None
    assert TrainingConfig.from_params({"algorithm": "fedmic", "resume": "AUTO"}).resume == "auto"


def test_method_blocks_override_common_and_files_read_the_same(tmp_path: Path) -> None:
    blocks = {"common": {"lr": 0.01, "batch_size": 32}, "fedprox": {"lr": 0.05, "mu": 0.1}}
    assert algorithm_params_for("fedprox", blocks) == {"lr": 0.05, "batch_size": 32, "mu": 0.1}
    assert algorithm_params_for("fedavg", blocks) == {"lr": 0.01, "batch_size": 32}
    path = tmp_path / "params.yml"
    path.write_text(yaml.safe_dump({"training": {}, "algorithm_params": blocks}))
    assert read_algorithm_params(path, "fedprox") == algorithm_params_for("fedprox", blocks)
    with pytest.raises(ConfigurationError, match="Unknown algorithm 'nope'"):
        algorithm_params_for("nope", blocks)
    path.write_text(yaml.safe_dump({"algorithm_params": {"common": [1, 2]}}))
    with pytest.raises(ConfigurationError, match="algorithm_params.common must be a mapping"):
        read_algorithm_params(path, "fedavg")


# ---- every block, as the command line spells it ----------------------------------------------

def _shipped_parameters(project_root: Path, **runtime_params: dict) -> dict:
    from kedro.config import OmegaConfigLoader

    loader = OmegaConfigLoader(str(project_root / "conf"), base_env="base", default_run_env="base", runtime_params=runtime_params)
    return loader["parameters"]


@pytest.mark.parametrize(
    ("block", "override"),
    [
        ("compare", {"scenarios": "none", "lambdas": "0.1 0.3 0.5", "seeds": "0 1 2", "join_ratios": 0.2}),
        ("compare", {"training_overrides": {"num_rounds": 10}, "cache_dir": None, "join_ratios": None}),
        ("ablation", {"methods": "fedavg fedmic", "seeds": 3}),
        ("training", {"resume": "auto", "num_threads": None, "device": "cpu"}),
        ("algorithm_params", {"common": {"lr": "1e-3", "model_options": {"norm": "group"}}, "fedmic": {"max_adaptive_weight": float("inf")}}),
        ("devices", {"held_out": None}),
        ("synthetic", {"enabled": False, "device": "auto"}),
        ("promotion", {"enabled": False}),
    ],
)
def test_the_spellings_the_docs_show_pass(project_root: Path, block: str, override: dict) -> None:
    from fedmic_pipeline.configuration import validate_parameters

    parameters = _shipped_parameters(project_root)
    parameters[block] = {**parameters[block], **override}
    validate_parameters(parameters, [block])


@pytest.mark.parametrize(
    ("block", "override", "message"),
    [
        ("training", {"num_rounds": True}, r"`training.num_rounds` must be an integer, got True"),
        ("training", {"eval_batch_size": "big"}, r"`training.eval_batch_size` must be an integer, got 'big'"),
        ("training", {"checkpoint_every": False}, "checkpoint_every must be an integer >= 0"),
        ("evaluation", {"n_bootstrap": -5}, r"`evaluation.n_bootstrap` must be an integer >= 0, got -5"),
        ("compare", {"seeds": "0 one"}, r"`compare.seeds\[1\]` must be an integer >= 0, got 'one'"),
        ("compare", {"methods": ["fedavg", "fedmc"]}, r"`compare.methods\[1\]` must be one of .*fedmic"),
        ("compare", {"training_overrides": {"num_round": 3}}, r"compare.training_overrides.*Unknown key\(s\) \['num_round'\]"),
        ("ablation", {"dirichlet_lambda": 0}, r"`ablation.dirichlet_lambda` must be a finite number > 0"),
        ("audit", {"plots": {"performnce": ["x.png"]}}, r"Unknown audit.plots parameter\(s\) \['performnce'\]"),
        ("ingestion", {"pixel_range": [255, 0]}, r"pixel_range` must be \[low, high\] with low <= high"),
        ("algorithm_params", {"fedprox": {"mu": -1}}, r"algorithm_params.fedprox.*mu must be >= 0"),
        ("algorithm_params", {"common": {"weight_decay": "nan"}}, r"`algorithm_params.common.weight_decay` must be a number, got 'nan'"),
        ("synthetic", {"sampling": {"temperatur": 2}}, r"Unknown synthetic.sampling parameter\(s\) \['temperatur'\]"),
    ],
)
def test_a_bad_value_is_one_paragraph_naming_block_key_and_file(project_root: Path, block: str, override: dict, message: str) -> None:
    from fedmic_pipeline.configuration import PARAMETER_BLOCKS, PARAMETER_ERRORS, validate_parameters

    parameters = _shipped_parameters(project_root)
    parameters[block] = {**parameters[block], **override}
    with pytest.raises(PARAMETER_ERRORS, match=message) as refused:
        validate_parameters(parameters, [block])
    text = str(refused.value)
    assert text.startswith(f"Invalid `{block}` parameter ({PARAMETER_BLOCKS[block][0]}): ") and "\n" not in text
    assert f"kedro run --params {block}.<key>=<value>" in text


def test_every_pipeline_reads_only_checked_blocks(project_root: Path) -> None:
    """The hook checks the blocks behind a pipeline's `params:` inputs: none may be unknown."""
    from kedro.framework.startup import bootstrap_project

    from fedmic_pipeline.configuration import PARAMETER_BLOCKS, blocks_read_by
    from fedmic_pipeline.pipeline_registry import register_pipelines

    bootstrap_project(project_root)
    for name, pipeline in register_pipelines().items():
        read = blocks_read_by(pipeline.inputs())
        assert read <= set(PARAMETER_BLOCKS), f"pipeline {name} reads unchecked blocks {sorted(read - set(PARAMETER_BLOCKS))}"
    assert blocks_read_by(["params:partition", "dataset_info"]) == {"partition", "min_samples_per_client_by_dataset"}
    assert blocks_read_by(["parameters"]) == set(PARAMETER_BLOCKS)


def test_dvc_train_stage_depends_on_every_training_key_that_changes_results(project_root: Path) -> None:
    """Display and resumption settings are not DVC params (changing them must not retrain);
    every other training key is, and the training curve is a DVC plot of the stage."""
    import dataclasses

    from fedmic_pipeline.core.engine import SimulationConfig

    train = yaml.safe_load((project_root / "dvc.yaml").read_text())["stages"]["train"]
    listed = {key.removeprefix("training.") for entry in train["params"] for file, keys in entry.items() for key in keys
              if key.startswith("training.")}  # fmt: skip
    never_change_results = {"progress", "min_train_samples", "checkpoint_dir", "checkpoint_every", "resume"}
    every_key = {f.name for f in dataclasses.fields(SimulationConfig)} | set(TrainingConfig.OWN_KEYS)
    assert listed == every_key - never_change_results
    shipped = yaml.safe_load((project_root / PARAMS_FILE).read_text())["training"]
    assert listed <= set(shipped), "DVC fails on a param missing from the file: ship every listed key"
    plots = {path: spec for entry in train["plots"] for path, spec in entry.items()}
    assert plots["data/07_model_output/training_history.csv"] == {"x": "round", "y": "global_val_balanced_accuracy"}
