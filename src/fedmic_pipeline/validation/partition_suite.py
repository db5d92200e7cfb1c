"""The partition gate: clients are disjoint, complete, large enough and free of test images.

`placement` has one row per placed sample: `origin` (index into the pooled official
train+val set), `client`, `local_split` ('train'|'val'|'test'), `label`, `device` and
`pixel_sha1` (hash of the ORIGINAL pixels, `fedmic_pipeline.ingestion.pixel_sha1`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pandas as pd

from .gate import TableCheck, validate_tables

PARTITION_GATE = "partition"
PLACEMENT_SUITE = "partition_placement"
CLIENT_COUNT_SUITE = "partition_client_counts"
PLACEMENT_COLUMNS: tuple[str, ...] = ("origin", "client", "local_split", "label", "device", "pixel_sha1")
LOCAL_SPLITS: tuple[str, ...] = ("train", "val", "test")


def placement_expectations(pool_size: int, test_hashes: list[str]) -> list[dict[str, Any]]:
    """Each pooled sample placed exactly once, with a label, a device and no global-test twin."""
    expectations: list[dict[str, Any]] = [
        {
            "type": "expect_column_values_to_be_unique",
            "kwargs": {"column": "origin"},
            "description": "no sample is placed twice (clients are disjoint)",
        },
        {
            "type": "expect_table_row_count_to_equal",
            "kwargs": {"value": int(pool_size)},
            "description": f"every one of the {pool_size} pooled train+val samples is placed (none missing)",
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "origin", "min_value": 0, "max_value": int(pool_size) - 1},
            "description": "origins index the pooled train+val set",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "local_split", "value_set": list(LOCAL_SPLITS)},
            "description": "each placed sample is in a client's local train, val or test split",
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "client"},
            "description": "each placed sample belongs to a client",
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "label"},
            "description": "each placed sample has a label",
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "device"},
            "description": "each placed sample has an imaging device",
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "pixel_sha1"},
            "description": "each placed sample has the hash of its original pixels",
        },
    ]
    if test_hashes:
        expectations.append(
            {
                "type": "expect_column_values_to_not_be_in_set",
                "kwargs": {"column": "pixel_sha1", "value_set": test_hashes},
                "description": "no placed (training-pool) sample is an exact copy of a global test image",
            }
        )
    return expectations


def client_count_expectations(min_samples_per_client: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_samples", "min_value": int(min_samples_per_client)},
            "description": f"every client holds at least partition.min_samples_per_client={min_samples_per_client} samples",
        }
    ]


def client_count_table(placement: pd.DataFrame, num_clients: int | None = None) -> pd.DataFrame:
    """Samples per client, with 0 for clients that got nothing (ids 0..K-1)."""
    counts = placement["client"].dropna().astype("int64").value_counts()
    highest = int(counts.index.max()) + 1 if len(counts) else 0
    clients = range(max(highest, int(num_clients or 0)))
    return pd.DataFrame(
        {"client": list(clients), "n_samples": [int(counts.get(c, 0)) for c in clients]},
        columns=["client", "n_samples"],
    ).astype({"client": "int64", "n_samples": "int64"})


def validate_partition(
    placement: pd.DataFrame,
    pool_size: int,
    test_hashes: set[str] | list[str] | Iterable[str],
    min_samples_per_client: int,
    docs_dir: str | os.PathLike[str] | None,
    *,
    num_clients: int | None = None,
) -> dict[str, Any]:
    """Run the partition gate; pass `num_clients` so a client left with no sample is caught too."""
    missing = [name for name in PLACEMENT_COLUMNS if name not in placement.columns]
    if missing:
        raise ValueError(
            f"validate_partition: placement lacks columns {missing}; it needs one row per placed sample with "
            f"columns {list(PLACEMENT_COLUMNS)}."
        )
    hashes = sorted({str(h) for h in test_hashes})
    checks = [
        TableCheck(
            PLACEMENT_SUITE,
            placement.loc[:, list(PLACEMENT_COLUMNS)].reset_index(drop=True),
            placement_expectations(pool_size, hashes),
            index_columns=("client", "origin"),
        ),
        TableCheck(
            CLIENT_COUNT_SUITE,
            client_count_table(placement, num_clients),
            client_count_expectations(min_samples_per_client),
            index_columns=("client",),
        ),
    ]
    return validate_tables(PARTITION_GATE, checks, docs_dir)
