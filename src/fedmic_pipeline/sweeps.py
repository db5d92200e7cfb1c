"""What the `compare` and `ablation` grids share, so that neither pipeline imports the other.

Both read their lists as the command line gives them, fail on a misspelt method before
any training, give each (lambda, seed) cell its own partition and device draw, and say in
every log line how far the grid is and about how long it has left (``GridClock``).
"""

from __future__ import annotations

import time
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


class GridClock:
    """Elapsed time and an estimate of the time left for a grid of ``total`` runs.

    The estimate is the mean wall time of the runs trained so far (cache hits cost nothing
    and are not counted) times the runs still to do: rough when methods differ in cost, but
    it tells a user whether to wait or come back tomorrow.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._trained_s: list[float] = []
        self._started = time.perf_counter()

    def tick(self, trained_s: float | None = None) -> str:
        """Count one finished run (``trained_s``: its wall time, None for a cache hit);
        returns ``'k/N, 3.1 min so far, about 12 min left'``."""
        self.done += 1
        if trained_s is not None:
            self._trained_s.append(trained_s)
        elapsed = (time.perf_counter() - self._started) / 60
        left = self.total - self.done
        if left == 0:
            return f"{self.done}/{self.total}, {elapsed:.1f} min in all"
        if not self._trained_s:
            return f"{self.done}/{self.total}, {elapsed:.1f} min so far"
        eta = left * sum(self._trained_s) / len(self._trained_s) / 60
        return f"{self.done}/{self.total}, {elapsed:.1f} min so far, about {eta:.0f} min left"


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
