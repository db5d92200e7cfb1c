"""A partitioned dataset that is allowed to be absent (and is written atomically).

The synthetic sets are an optional input of training: a run without FedSSG
(`training.extra_training_data: none`) must not require the synthetic_generation stage
to have run. Loading an empty or missing folder gives `{}`; the node that needs the sets
then fails with a message naming the stage to run. Saving replaces the whole folder in one
step, as for the client files (see `AtomicPartitionedDataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .atomic_partitioned_dataset import AtomicPartitionedDataset


class OptionalPartitionedDataset(AtomicPartitionedDataset):
    def load(self) -> dict[str, Callable[[], Any]]:
        if not self._list_partitions():
            return {}
        return super().load()
