"""The raw-data gate: the image manifest must match what medmnist says the release contains."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .gate import TableCheck, validate_tables

RAW_GATE = "raw_data"
MANIFEST_SUITE = "raw_image_manifest"
SPLIT_COUNT_SUITE = "raw_split_counts"
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "split",
    "index",
    "label",
    "pixel_sha1",
    "height",
    "width",
    "channels",
    "pixel_min",
    "pixel_max",
    "pixel_mean",
    "pixel_std",
)


def manifest_expectations(
    flag: str, n_classes: int, size: int, n_channels: int, pixel_range: Sequence[float]
) -> list[dict[str, Any]]:
    """Per-image expectations: classes, geometry, channels and pixel range as the release promises."""
    low, high = pixel_range
    return [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {"column_set": list(MANIFEST_COLUMNS), "exact_match": True},
            "description": "the manifest has exactly the documented columns",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "split", "value_set": list(SPLITS)},
            "description": "every image belongs to an official split",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": list(range(n_classes))},
            "description": f"labels are class ids of {flag} (0..{n_classes - 1})",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "height", "value_set": [size]},
            "description": f"images are {size} pixels high (dataset.size)",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "width", "value_set": [size]},
            "description": f"images are {size} pixels wide (dataset.size)",
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "channels", "value_set": [n_channels]},
            "description": f"images have {n_channels} channel(s), as medmnist.INFO says for {flag}",
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "pixel_min", "min_value": low, "max_value": high},
            "description": f"darkest pixel within ingestion.pixel_range [{low}, {high}]",
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "pixel_max", "min_value": low, "max_value": high},
            "description": f"brightest pixel within ingestion.pixel_range [{low}, {high}]",
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "pixel_sha1"},
            "description": "every image has a pixel hash (used to find test duplicates)",
        },
    ]


def split_count_expectations() -> list[dict[str, Any]]:
    """One row per official split: its image count must equal medmnist's official size."""
    return [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "split", "value_set": list(SPLITS)},
            "description": "only the official splits",
        },
        {
            "type": "expect_table_row_count_to_equal",
            "kwargs": {"value": len(SPLITS)},
            "description": "all three official splits are present",
        },
        {
            "type": "expect_column_pair_values_to_be_equal",
            "kwargs": {"column_A": "n_images", "column_B": "n_official"},
            "description": "each split holds exactly medmnist.INFO's official number of images",
        },
    ]


def split_count_table(manifest: pd.DataFrame, official_split_sizes: Mapping[str, int]) -> pd.DataFrame:
    counts = manifest["split"].value_counts()
    names = list(SPLITS) + sorted(set(counts.index.astype(str)) - set(SPLITS))
    return pd.DataFrame(
        {
            "split": names,
            "n_images": [int(counts.get(name, 0)) for name in names],
            "n_official": [int(official_split_sizes.get(name, 0)) for name in names],
        }
    )


def validate_raw_manifest(
    manifest: pd.DataFrame,
    dataset_info: Mapping[str, Any],
    pixel_range: Sequence[float],
    docs_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the raw-data gate on an image manifest, against the dataset's medmnist description."""
    checks = [
        TableCheck(
            MANIFEST_SUITE,
            manifest,
            manifest_expectations(
                flag=str(dataset_info["flag"]),
                n_classes=int(dataset_info["n_classes"]),
                size=int(dataset_info["size"]),
                n_channels=int(dataset_info["n_channels"]),
                pixel_range=pixel_range,
            ),
            index_columns=("split", "index"),
        ),
        TableCheck(
            SPLIT_COUNT_SUITE,
            split_count_table(manifest, dataset_info["official_split_sizes"]),
            split_count_expectations(),
            index_columns=("split",),
        ),
    ]
    return validate_tables(RAW_GATE, checks, docs_dir)
