"""The synthetic data gate: what a FedSSG candidate set must satisfy before it is written.

Three tables are checked (as partition_suite.py does for client files): one row per
synthetic sample, one per client's set, and one per planned (client, class, device) cell.
The pixel hashes are `fedmic_pipeline.ingestion.pixel_sha1`, the identity of every gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedmic_pipeline.core.synthesis import SynthesisPlan, pooled_counts
from fedmic_pipeline.ingestion import pixel_sha1

from .gate import TableCheck, validate_tables

#: The keys of every published synthetic set, and nothing else (the contract training reads).
SYNTHETIC_KEYS: tuple[str, ...] = ("images", "labels", "devices", "is_synthetic")

Arrays = Mapping[str, np.ndarray]


def evaluation_image_hashes(clients: Mapping[str, Arrays], global_test_set: Arrays) -> list[str]:
    """SHA-1 of every image any evaluation uses: the global test set (original and every
    device rendering) and each client's local val and test splits."""
    hashes: set[str] = set()
    for key, value in global_test_set.items():
        if key == "images" or key.startswith("images_"):
            hashes.update(pixel_sha1(np.asarray(value)))
    for name in sorted(clients):
        arrays = clients[name]
        for split in ("val", "test"):
            if f"{split}_images" in arrays:
                hashes.update(pixel_sha1(np.asarray(arrays[f"{split}_images"])))
    return sorted(hashes)


def validate_synthetic(
    sets: Mapping[str, Arrays],
    plan: SynthesisPlan,
    clients: Mapping[str, Arrays],
    global_test_set: Arrays,
    device_names: list[str],
    held_out: int | None,
    docs_dir: str | None,
) -> dict[str, Any]:
    """Run the three suites on the candidate `sets` of the partition's `clients`."""
    allowed = [d for d in range(len(device_names)) if d != held_out]
    image_shape = str(tuple(np.asarray(next(iter(clients.values()))["train_images"]).shape[1:]))
    hashes = evaluation_image_hashes(clients, global_test_set)
    held_name = device_names[held_out] if held_out is not None else "none"
    sample_expectations: list[dict[str, Any]] = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "is_synthetic", "value_set": [True]},
         "description": "every synthetic sample carries is_synthetic = True"},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "label", "min_value": 0, "max_value": plan.num_classes - 1},
         "description": f"labels are classes 0..{plan.num_classes - 1}"},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "device", "value_set": allowed},
         "description": f"devices are training devices {allowed} (ids into partition_manifest.devices)"},
        {"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "device", "value_set": [] if held_out is None else [held_out]},
         "description": f"never the held-out device ({held_name})"},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "dtype", "value_set": ["uint8"]},
         "description": "images are uint8, like the partition"},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "shape", "value_set": [image_shape]},
         "description": f"image shape {image_shape}, the partition's layout"},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "pixel_min", "min_value": 0, "max_value": 255},
         "description": "pixel values within [0, 255]"},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "pixel_max", "min_value": 0, "max_value": 255},
         "description": "pixel values within [0, 255]"},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "pixel_sha1"},
         "description": "every sample hashed"},
        {"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "pixel_sha1", "value_set": hashes},
         "description": "no synthetic image is an exact copy of an evaluation image (global test in every rendering, local val/test)"},
    ]  # fmt: skip
    array_expectations = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "in_partition", "value_set": [True]},
         "description": "a synthetic set only for clients of the partition"},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "has_all_keys", "value_set": [True]},
         "description": f"each set has exactly the keys {list(SYNTHETIC_KEYS)}"},
        {"type": "expect_table_row_count_to_equal", "kwargs": {"value": len(clients)},
         "description": "one synthetic set per partition client (possibly empty)"},
        *[{"type": "expect_column_pair_values_to_be_equal", "kwargs": {"column_A": "n_images", "column_B": f"n_{k}"},
           "description": f"{k} has one entry per image"} for k in ("labels", "devices", "is_synthetic")],
    ]  # fmt: skip
    count_expectations = [
        {"type": "expect_column_pair_values_to_be_equal", "kwargs": {"column_A": "planned", "column_B": "produced"},
         "description": "the sets hold exactly the planned number of images per (client, class, device)"},
    ]  # fmt: skip
    report = validate_tables(
        "synthetic",
        [
            TableCheck("synthetic_samples", _sample_table(sets), sample_expectations, index_columns=("client", "row")),
            TableCheck("synthetic_client_arrays", _array_table(sets, sorted(clients)), array_expectations, index_columns=("client",)),
            TableCheck("synthetic_plan_counts", _count_table(sets, plan), count_expectations, index_columns=("client", "class_id", "device")),
        ],
        docs_dir,
    )
    report["evaluation_images_hashed"] = len(hashes)
    return report


def _sample_table(sets: Mapping[str, Arrays]) -> pd.DataFrame:
    frames = []
    for name in sorted(sets):
        arrays = sets[name]
        images = np.asarray(arrays.get("images", np.zeros((0,))))
        n = images.shape[0] if images.ndim else 0
        flat = images.reshape(n, -1) if n else np.zeros((0, 1), dtype=np.uint8)
        frames.append(pd.DataFrame({
            "client": name,
            "row": np.arange(n, dtype=np.int64),
            "label": np.asarray(arrays.get("labels", []))[:n].astype(np.int64) if n else np.zeros(0, np.int64),
            "device": np.asarray(arrays.get("devices", []))[:n].astype(np.int64) if n else np.zeros(0, np.int64),
            "is_synthetic": np.asarray(arrays.get("is_synthetic", []))[:n] if n else np.zeros(0, bool),
            "dtype": str(images.dtype),
            "shape": str(tuple(images.shape[1:])),
            "pixel_min": flat.min(axis=1).astype(np.int64) if n else np.zeros(0, np.int64),
            "pixel_max": flat.max(axis=1).astype(np.int64) if n else np.zeros(0, np.int64),
            "pixel_sha1": pixel_sha1(images) if n else [],
        }))  # fmt: skip
    columns = ["client", "row", "label", "device", "is_synthetic", "dtype", "shape", "pixel_min", "pixel_max", "pixel_sha1"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _array_table(sets: Mapping[str, Arrays], expected_clients: list[str]) -> pd.DataFrame:
    rows = []
    for name in sorted(set(sets) | set(expected_clients)):
        arrays = sets.get(name, {})
        lengths = {k: int(np.asarray(arrays[k]).shape[0]) if k in arrays and np.asarray(arrays[k]).ndim else -1 for k in SYNTHETIC_KEYS}
        rows.append({
            "client": name,
            "in_partition": name in expected_clients,
            "has_all_keys": sorted(arrays) == sorted(SYNTHETIC_KEYS),
            **{f"n_{k}": v for k, v in lengths.items()},
        })  # fmt: skip
    return pd.DataFrame(rows)


def _count_table(sets: Mapping[str, Arrays], plan: SynthesisPlan) -> pd.DataFrame:
    produced = pooled_counts({k: v for k, v in sets.items() if k in plan.cells}, plan.num_classes, plan.num_devices)
    rows = []
    for name in plan.clients:
        planned = plan.count_matrix(name)
        got = produced.get(name, np.zeros_like(planned))
        for c in range(plan.num_classes):
            for d in range(plan.num_devices):
                if planned[c, d] or got[c, d]:
                    rows.append({"client": name, "class_id": c, "device": d, "planned": int(planned[c, d]), "produced": int(got[c, d])})
    return pd.DataFrame(rows, columns=["client", "class_id", "device", "planned", "produced"])
