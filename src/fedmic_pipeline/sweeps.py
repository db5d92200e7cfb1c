"""What the `compare` and `ablation` grids share, so that neither pipeline imports the other.

Both read their lists as the command line gives them, fail on a misspelt method before
any training, and give each (lambda, seed) cell its own partition and device draw.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedmic_pipeline import federation


def as_list(value: Any) -> list[Any]:
    """A YAML list, or a space-separated string: `kedro run --params` splits on commas,
    so the command line gives lists as `compare.seeds="0 1 2"`."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def check_methods(methods: Iterable[str], algorithm_params: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> None:
    """Build every method once: a typo fails now, not after hours of training."""
    spec = federation.data_spec(dataset_info)
    for method in dict.fromkeys(methods):
        federation.make_algorithm(method, algorithm_params, spec)


def cell_params(
    partition: Mapping[str, Any], devices: Mapping[str, Any], dirichlet_lambda: float, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The partition and devices parameters of one grid cell: its lambda, and its seed for
    both the partition and the device assignment."""
    return {**partition, "dirichlet_lambda": float(dirichlet_lambda), "seed": int(seed)}, {**devices, "seed": int(seed)}
