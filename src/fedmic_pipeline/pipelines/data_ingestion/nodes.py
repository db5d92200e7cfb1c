"""Nodes of `data_ingestion`: read the release, describe every image, gate it, drop test twins."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmic_pipeline.ingestion import (
    SPLITS,
    dataset_spec,
    ensure_raw_file,
    file_md5,
    load_arrays,
    pixel_sha1,
    verify_md5,
)
from fedmic_pipeline.validation import enforce_gate, validate_raw_manifest

logger = logging.getLogger(__name__)

DEFAULT_DATA_DOCS_DIR = "data/08_reporting/data_docs"
_STATS_CHUNK_VALUES = 1 << 24  # pixels converted to float64 at a time: bounds memory on 224x224 RGB sets


def _param(block: Mapping[str, Any], block_name: str, key: str) -> Any:
    if key not in block:
        raise ValueError(
            f"Parameter `{block_name}.{key}` is missing; add it to conf/base/parameters_data_ingestion.yml."
        )
    return block[key]


def load_raw_dataset(dataset: dict[str, Any], ingestion: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Locate (or download), checksum and read the configured MedMNIST release."""
    spec = dataset_spec(_param(dataset, "dataset", "name"), dataset.get("size", 28))
    path = ensure_raw_file(_param(dataset, "dataset", "raw_dir"), spec, download=bool(dataset.get("download", True)))
    actual_md5 = file_md5(path)
    check_md5 = bool(ingestion.get("verify_md5", True))
    if check_md5:
        verify_md5(path, spec, actual_md5)
    elif actual_md5 != spec.md5:
        logger.warning("%s differs from the official release (md5 %s, expected %s); verify_md5 is off", path, actual_md5, spec.md5)
    arrays = load_arrays(path, spec)
    info = {
        "flag": spec.flag,
        "size": spec.size,
        "python_class": spec.python_class,
        "task": spec.task,
        "n_channels": spec.n_channels,
        "n_classes": spec.n_classes,
        "label_names": spec.label_names,
        "official_split_sizes": spec.official_split_sizes,
        "split_sizes": {split: int(len(arrays[f"{split}_labels"])) for split in SPLITS},
        "image_shape": list(arrays["train_images"].shape[1:]),
        "md5": actual_md5,
        "md5_expected": spec.md5,
        "md5_verified": check_md5,
        "file": Path(path).as_posix(),
        "url": spec.url,
        "license": spec.license,
        "medmnist_version": _medmnist_version(),
    }
    logger.info(
        "Read %s (%s, %d classes, %d channel(s)): %s images per split",
        path,
        spec.task,
        spec.n_classes,
        spec.n_channels,
        info["split_sizes"],
    )
    return arrays, info


def _medmnist_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("medmnist")


def _pixel_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image min, max, mean and std, vectorised in bounded chunks."""
    n = images.shape[0]
    flat = images.reshape(n, -1)
    means = np.empty(n, dtype=np.float64)
    stds = np.empty(n, dtype=np.float64)
    step = max(1, _STATS_CHUNK_VALUES // max(1, flat.shape[1]))
    for start in range(0, n, step):
        block = flat[start : start + step].astype(np.float64)
        means[start : start + step] = block.mean(axis=1)
        stds[start : start + step] = block.std(axis=1)
    return {
        "pixel_min": flat.min(axis=1).astype(np.int64) if n else np.empty(0, np.int64),
        "pixel_max": flat.max(axis=1).astype(np.int64) if n else np.empty(0, np.int64),
        "pixel_mean": means,
        "pixel_std": stds,
    }


def build_image_manifest(raw_dataset: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per image with its split, label, geometry, pixel statistics and pixel hash."""
    frames = []
    for split in SPLITS:
        images = raw_dataset[f"{split}_images"]
        n = images.shape[0]
        frames.append(
            pd.DataFrame(
                {
                    "split": pd.Series([split] * n, dtype="str"),
                    "index": np.arange(n, dtype=np.int64),
                    "label": np.asarray(raw_dataset[f"{split}_labels"], dtype=np.int64),
                    "pixel_sha1": pd.Series(pixel_sha1(images), dtype="str"),
                    "height": np.full(n, images.shape[1], dtype=np.int64),
                    "width": np.full(n, images.shape[2], dtype=np.int64),
                    "channels": np.full(n, images.shape[3] if images.ndim == 4 else 1, dtype=np.int64),
                    **_pixel_statistics(images),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def validate_raw_data(image_manifest: pd.DataFrame, dataset_info: dict[str, Any], ingestion: dict[str, Any]) -> dict[str, Any]:
    """Run the raw-data gate (GX); the report is saved whether it passes or not."""
    pixel_range = list(_param(ingestion, "ingestion", "pixel_range"))
    if len(pixel_range) != 2 or not pixel_range[0] <= pixel_range[1]:
        raise ValueError(f"`ingestion.pixel_range` must be [low, high] with low <= high, got {pixel_range}.")
    return validate_raw_manifest(
        image_manifest, dataset_info, pixel_range, docs_dir=ingestion.get("data_docs_dir", DEFAULT_DATA_DOCS_DIR)
    )


def enforce_data_gate(raw_validation_report: dict[str, Any]) -> bool:
    """Stop the run here when the raw data failed its gate: nothing downstream gets written."""
    enforce_gate(
        raw_validation_report,
        hint=(
            "The full report is data/08_reporting/data_gate/raw_validation.json; no validated dataset was written. "
            "Fix the raw file (or the parameter named above) and run again: `make run` "
            "(or `kedro run --pipelines data_ingestion`)."
        ),
    )
    return True


def remove_test_duplicates(
    raw_dataset: dict[str, np.ndarray], image_manifest: pd.DataFrame, raw_gate_passed: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Drop train/val images that are exact pixel copies of official test images; test stays intact.

    A test image that also sits in training inflates test accuracy, and in federated
    training it would leak into some client; the official test split is the benchmark, so
    only train and val give way.
    """
    if raw_gate_passed is not True:
        raise RuntimeError("remove_test_duplicates runs only after the raw-data gate passed (enforce_data_gate).")
    hashes = {split: _split_hashes(image_manifest, split, len(raw_dataset[f"{split}_labels"])) for split in SPLITS}
    test_hashes = set(hashes["test"])
    validated: dict[str, np.ndarray] = {}
    removed: dict[str, list[int]] = {}
    for split in SPLITS:
        n = len(hashes[split])
        if split == "test":
            keep = np.ones(n, dtype=bool)
        else:
            keep = np.fromiter((h not in test_hashes for h in hashes[split]), dtype=bool, count=n)
        removed[split] = np.flatnonzero(~keep).astype(int).tolist()
        validated[f"{split}_images"] = raw_dataset[f"{split}_images"][keep]
        validated[f"{split}_labels"] = np.asarray(raw_dataset[f"{split}_labels"], dtype=np.int64)[keep]
        validated[f"{split}_source_index"] = np.flatnonzero(keep).astype(np.int64)

    pool_hashes = set(hashes["train"]) | set(hashes["val"])
    report = {
        "policy": "exact pixel duplicates (same sha1 of the raw pixel bytes) of official test images are removed "
        "from train and val; the official test split is never changed",
        "removed": {split: len(removed[split]) for split in ("train", "val")},
        "removed_total": len(removed["train"]) + len(removed["val"]),
        "removed_source_index": {split: removed[split] for split in ("train", "val")},
        "test_images_with_copies_in_train_or_val": int(sum(1 for h in hashes["test"] if h in pool_hashes)),
        "split_sizes_before": {split: len(hashes[split]) for split in SPLITS},
        "split_sizes_after": {split: int(len(validated[f"{split}_labels"])) for split in SPLITS},
        "informational_not_removed": {
            "repeated_images_within_split": {split: int(len(hashes[split]) - len(set(hashes[split]))) for split in SPLITS},
            "distinct_images_in_both_train_and_val": len(set(hashes["train"]) & set(hashes["val"])),
        },
    }
    if report["removed_total"]:
        logger.warning(
            "Removed %d train and %d val images that are exact copies of official test images "
            "(%d test images affected); see the duplicate report",
            report["removed"]["train"],
            report["removed"]["val"],
            report["test_images_with_copies_in_train_or_val"],
        )
    else:
        logger.info("No train or val image is an exact copy of an official test image")
    return validated, report


def _split_hashes(manifest: pd.DataFrame, split: str, n_images: int) -> np.ndarray:
    """The split's hashes in image order, checked against the arrays they describe."""
    rows = manifest.loc[manifest["split"] == split, ["index", "pixel_sha1"]]
    ordered = rows.set_index("index")["pixel_sha1"].sort_index()
    if len(ordered) != n_images or not np.array_equal(ordered.index.to_numpy(), np.arange(n_images)):
        raise ValueError(
            f"The image manifest does not describe the {n_images} {split} images of the raw dataset "
            f"({len(ordered)} rows); rerun the whole data_ingestion pipeline so both come from the same file."
        )
    return ordered.to_numpy(dtype=object)
