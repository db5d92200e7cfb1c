"""The project's run parameters as typed objects, each built once and checked on the way in.

``TrainingConfig.from_params`` reads the ``training`` block of
``conf/base/parameters_federated_training.yml`` (what the Kedro nodes, the comparison, the
ablation and the recipe benchmark receive as ``params:training``) and refuses keys that
nobody reads: a typo such as ``training.num_round=1`` would otherwise run the default 20
rounds and exit 0. ``algorithm_params_for`` is the one place where a method's parameters
are ``algorithm_params.common`` overlaid with its own block; ``read_algorithm_params``
does the same from a YAML file (the Flower ServerApp and the throughput benchmark).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmic_pipeline.core.algorithms import ALGORITHMS
from fedmic_pipeline.core.engine import SimulationConfig
from fedmic_pipeline.core.protocol import ConfigurationError

__all__ = [
    "EXTRA_TRAINING_DATA",
    "PARAMS_FILE",
    "TrainingConfig",
    "algorithm_params_for",
    "read_algorithm_params",
]

PARAMS_FILE = Path("conf/base/parameters_federated_training.yml")
#: What each hospital may add to its training split (the FedSSG switch and the ablation).
EXTRA_TRAINING_DATA = ("none", "synthetic", "augmented")
_RESUME = {"true": "true", "yes": "true", "1": "true", "false": "false", "no": "false", "0": "false", "none": "false", "auto": "auto"}
_SIMULATION_KEYS = tuple(f.name for f in dataclasses.fields(SimulationConfig))


@dataclass(frozen=True)
class TrainingConfig:
    """``params:training``: which method, how the federation runs, checkpoints and resume.

    ``resume``: 'true' (continue the checkpoint, fail if there is none), 'auto' (continue
    if there is one) or 'false' (start afresh, overwriting one). ``checkpoint_path`` is
    ``<checkpoint_dir>/<algorithm>-seed<seed>.pt`` (None without a checkpoint_dir).
    """

    algorithm: str
    simulation: SimulationConfig
    extra_training_data: str = "none"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    resume: str = "false"

    #: The block's own keys; every other key must be a ``SimulationConfig`` field.
    OWN_KEYS = ("algorithm", "extra_training_data", "checkpoint_dir", "checkpoint_every", "resume")

    @classmethod
    def from_params(cls, training: Mapping[str, Any]) -> TrainingConfig:
        unknown = sorted(set(training) - set(_SIMULATION_KEYS) - set(cls.OWN_KEYS))
        if unknown:
            valid = ", ".join(sorted((*_SIMULATION_KEYS, *cls.OWN_KEYS)))
            raise ConfigurationError(
                f"Unknown key(s) {unknown} in the `training` block (conf/base/parameters_federated_training.yml). "
                f"Valid keys: {valid}. Fix the spelling, e.g. `kedro run --params training.num_rounds=5`."
            )
        algorithm = str(training.get("algorithm", "fedavg"))
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"Unknown algorithm '{algorithm}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))} (training.algorithm)."
            )
        extra = str(training.get("extra_training_data", "none"))
        if extra not in EXTRA_TRAINING_DATA:
            raise ConfigurationError(
                f"training.extra_training_data must be one of {', '.join(EXTRA_TRAINING_DATA)}, got '{extra}'."
            )
        every = training.get("checkpoint_every", 0) or 0
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigurationError(f"training.checkpoint_every must be an integer >= 0 (0 = never), got {every!r}.")
        resume = _RESUME.get(str(training.get("resume", False)).strip().lower())
        if resume is None:
            raise ConfigurationError(f"training.resume must be true, false or auto, got {training.get('resume')!r}.")
        directory = training.get("checkpoint_dir")
        if not directory and resume == "true":
            raise ConfigurationError("training.resume is true but training.checkpoint_dir is empty: nothing to resume from.")
        simulation = SimulationConfig(**{key: training[key] for key in _SIMULATION_KEYS if key in training})
        return cls(algorithm, simulation, extra, Path(directory) if directory else None, every, resume)

    @property
    def seed(self) -> int:
        return self.simulation.seed

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / f"{self.algorithm}-seed{self.seed}.pt"


def algorithm_params_for(name: str, algorithm_params: Mapping[str, Any]) -> dict[str, Any]:
    """``algorithm_params.common`` merged with the method's own block (the method's values win)."""
    if name not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm '{name}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))}.")
    for block in ("common", name):
        value = algorithm_params.get(block)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigurationError(f"algorithm_params.{block} must be a mapping, got {value!r}.")
    return {**dict(algorithm_params.get("common") or {}), **dict(algorithm_params.get(name) or {})}


def read_algorithm_params(path: Path, name: str) -> dict[str, Any]:
    """``algorithm_params_for(name, ...)`` of the ``algorithm_params`` block of a YAML file."""
    import yaml

    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    blocks = document.get("algorithm_params", {}) if isinstance(document, dict) else None
    if not isinstance(blocks, Mapping):
        raise ConfigurationError(f"{path}: 'algorithm_params' must be a mapping.")
    try:
        return algorithm_params_for(name, blocks)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
