"""The federation setting the throughput benchmark measures, and where each value came from.

The setting is the project's recipe, read as the runners read it: ``training.{join_ratio,
seed, amp}`` and ``configuration.read_algorithm_params`` (``algorithm_params.common``
overlaid with the method's block) of ``conf/base/parameters_federated_training.yml``,
else the core's defaults; ``--param SCOPE.KEY=VALUE`` overrides go on top and are
recorded in ``source``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedmic_pipeline.configuration import read_algorithm_params
from fedmic_pipeline.core.algorithms import ALGORITHMS
from fedmic_pipeline.core.engine import SimulationConfig
from fedmic_pipeline.core.protocol import ConfigurationError

from .naive import SUPPORTED_ALGORITHMS

__all__ = ["SIMULATION_KEYS", "BenchmarkSettings", "parse_overrides", "resolve_settings"]

#: The ``training`` keys (and ``simulation.`` overrides) the benchmark takes.
SIMULATION_KEYS = ("join_ratio", "seed", "amp")


@dataclasses.dataclass
class BenchmarkSettings:
    """The federation setting measured, and where each value came from."""

    join_ratio: float = 1.0
    seed: int = 0
    amp: str = "auto"
    algorithm_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    source: str = "core defaults"
    ignored_keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _parse_value(text: str) -> Any:
    """A YAML scalar: '0.25' -> 0.25, 'true' -> True, '[8, 16]' -> [8, 16], else the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``['fedmic.teacher_width=0.25', 'simulation.join_ratio=0.5']`` -> nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, dot, name = key.strip().partition(".")
        if not sep or not dot or not scope or not name:
            raise ConfigurationError(
                f"--param expects SCOPE.KEY=VALUE (SCOPE an algorithm or 'simulation'), got {item!r}."
            )
        out.setdefault(scope, {})[name] = _parse_value(value)
    return out


def _training_block(path: Path) -> dict[str, Any]:
    """The benchmark's keys of the file's ``training`` block."""
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    training = (document.get("training") or {}) if isinstance(document, Mapping) else None
    if not isinstance(training, Mapping):
        raise ConfigurationError(f"{path}: expected a mapping whose 'training' block is a mapping.")
    return {k: training[k] for k in SIMULATION_KEYS if k in training}


def resolve_settings(
    params_file: Path | None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> BenchmarkSettings:
    """The project's default federation setting (file, else core defaults) plus overrides.

    Keys that an algorithm's config class does not know are dropped and listed in
    ``ignored_keys``.
    """
    core = SimulationConfig()
    sim: dict[str, Any] = {"join_ratio": core.join_ratio, "seed": core.seed, "amp": core.amp}
    algos: dict[str, dict[str, Any]] = {}
    settings = BenchmarkSettings()
    if params_file is not None and params_file.is_file():
        sim.update(_training_block(params_file))
        algos = {name: read_algorithm_params(params_file, name) for name in SUPPORTED_ALGORITHMS}
        settings.source = str(params_file)
    elif params_file is not None:
        settings.source = f"core defaults ({params_file} does not exist)"
    else:
        settings.source = "core defaults (--params-file none)"
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    sim.update(overrides.pop("simulation", {}))
    unknown_sim = sorted(set(sim) - set(SIMULATION_KEYS))
    if unknown_sim:
        raise ConfigurationError(f"Unknown simulation override(s) {unknown_sim}; valid: {', '.join(SIMULATION_KEYS)}.")
    for name, values in overrides.items():
        if name not in ALGORITHMS:
            raise ConfigurationError(f"--param scope '{name}' is neither 'simulation' nor an algorithm ({', '.join(sorted(ALGORITHMS))}).")
        algos.setdefault(name, {}).update(values)
    if overrides:
        settings.source += " + --param overrides"
    for name, params in algos.items():
        valid = {f.name for f in dataclasses.fields(ALGORITHMS[name].config_class)}  # type: ignore[attr-defined]
        ignored = sorted(set(params) - valid)
        if ignored:
            settings.ignored_keys[name] = ignored
        settings.algorithm_params[name] = {k: v for k, v in params.items() if k in valid}
    settings.join_ratio = float(sim["join_ratio"])
    settings.seed = int(sim["seed"])
    settings.amp = str(sim["amp"])
    return settings
