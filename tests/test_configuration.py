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
