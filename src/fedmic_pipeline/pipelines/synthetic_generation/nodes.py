"""Nodes of `synthetic_generation` (FedSSG, methods.md section 2): thin wrappers over
`fedmic_pipeline.core.synthesis`.

Flow: partition -> federated generator training -> plan from the clients' count reports ->
sampling (in memory) -> data gate -> only then the per-client synthetic files and their
manifest; beside it, evaluation-only quality metrics and a sample grid.

What leaves a client in this stage (the simulation keeps everything in one process, but
the nodes only use these): generator weights (FedAvg uploads), and the class x device
count matrix of its training split. Pooled real images are touched only by the
evaluation-only quality node (reference encoder, real-trained CAS reference).

The output contract read by training (`training.extra_training_data: synthetic`): `synthetic_client_sets`
holds one `client_XX.npz` per partition client with exactly the keys `images` (uint8, the
partition's layout: (N,H,W) or (N,H,W,3)), `labels` (int64), `devices` (int64) and
`is_synthetic` (bool, all True); N may be 0.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from fedmic_pipeline.core.data import make_generator, to_client_data
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec
from fedmic_pipeline.core.synthesis import (
    GeneratorTrainingConfig,
    PlanConfig,
    QualityConfig,
    SynthesisPlan,
    client_count_matrix,
    compute_plan,
    evaluate_quality,
    generator_from_record,
    generator_record,
    images_to_uint8,
    pooled_counts,
    sample_plan,
    state_sha256,
    train_generator_federated,
)
from fedmic_pipeline.datasets.npz_dataset import npy_bytes
from fedmic_pipeline.reporting.synthetic_plots import synthetic_grid_figure

logger = logging.getLogger(__name__)

SYNTHETIC_KEYS: tuple[str, ...] = ("images", "labels", "devices", "is_synthetic")
MANIFEST_SCHEMA_VERSION = 1
_TOP_KEYS = {"enabled", "seed", "num_threads", "device", "generator", "plan", "sampling", "quality", "gate", "report"}
_GRID_STREAM = 41

PartitionLoaders = Mapping[str, Callable[[], dict[str, np.ndarray]]]


# ---- parameters and inputs ---------------------------------------------------------------

def _check_params(synthetic: Mapping[str, Any]) -> None:
    """Every parameter problem, before any work, naming the file to fix."""
    where = "conf/base/parameters_synthetic_generation.yml"
    unknown = sorted(set(synthetic) - _TOP_KEYS)
    missing = sorted({"enabled", "seed", "generator", "plan"} - set(synthetic))
    if unknown or missing:
        raise ConfigurationError(f"synthetic parameters: unknown {unknown}, missing {missing} (valid: {sorted(_TOP_KEYS)}); fix {where}.")
    if not isinstance(synthetic["enabled"], bool):
        raise ConfigurationError(f"synthetic.enabled must be true or false, got {synthetic['enabled']!r}; fix {where}.")
    seed = synthetic["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigurationError(f"synthetic.seed must be an integer >= 0, got {seed!r}; fix {where}.")
    threads = synthetic.get("num_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigurationError(f"synthetic.num_threads must be an integer >= 1 or null, got {threads!r}; fix {where}.")
    try:
        GeneratorTrainingConfig.from_params(synthetic["generator"])
        PlanConfig.from_params(synthetic["plan"])
        QualityConfig.from_params(synthetic.get("quality", {}))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} Fix {where}.") from None


def _threads(synthetic: Mapping[str, Any]) -> int | None:
    """Apply ``synthetic.num_threads`` (fixed thread count = reproducible float sums)."""
    threads = synthetic.get("num_threads")
    if threads is not None:
        torch.set_num_threads(int(threads))
    return threads


def _devices(manifest: Mapping[str, Any]) -> tuple[list[str], int | None]:
    names = list(manifest.get("devices") or [])
    if not names:
        raise ConfigurationError("partition_manifest lists no devices; re-run `kedro run --pipelines data_partition`.")
    held = manifest.get("held_out_device")
    return names, (names.index(held) if held is not None else None)


def _n_classes(manifest: Mapping[str, Any]) -> int:
    try:
        return int(manifest["dataset"]["n_classes"])
    except (KeyError, TypeError):
        raise ConfigurationError("partition_manifest lacks dataset.n_classes; re-run the data_partition pipeline.") from None


def _class_names(manifest: Mapping[str, Any], n_classes: int) -> list[str]:
    names = (manifest.get("dataset") or {}).get("class_names") or {}
    return [str(names.get(str(c), c)) for c in range(n_classes)]


def _load_clients(client_partitions: PartitionLoaders) -> dict[str, dict[str, np.ndarray]]:
    if not client_partitions:
        raise ConfigurationError("client_partitions is empty; run `kedro run --pipelines data_partition` first.")
    out = {}
    for name in sorted(client_partitions):
        arrays = client_partitions[name]()
        missing = [k for k in ("train_images", "train_labels", "device") if k not in arrays]
        if missing:
            raise ConfigurationError(f"{name} lacks {missing}; re-run the data_partition pipeline.")
        out[name] = arrays
    return out


def _spec(clients: Mapping[str, Mapping[str, np.ndarray]], n_classes: int) -> tuple[DataSpec, int]:
    """DataSpec and the image layout ndim (3 = (N,H,W), 4 = (N,H,W,C)) of the partition."""
    first = np.asarray(next(iter(clients.values()))["train_images"])
    if first.ndim == 3:
        channels = 1
    elif first.ndim == 4 and first.shape[-1] in (1, 3):
        channels = int(first.shape[-1])
    else:
        raise ConfigurationError(f"Client images have shape {first.shape}; expected (N,H,W) or (N,H,W,C).")
    if first.shape[1] != first.shape[2]:
        raise ConfigurationError(f"The generator needs square images, got {first.shape[1:3]}.")
    return DataSpec(in_channels=channels, num_classes=n_classes, image_size=int(first.shape[1])), first.ndim


def _client_data(clients: Mapping[str, Mapping[str, np.ndarray]]) -> list[ClientData]:
    out = []
    for index, (name, arrays) in enumerate(sorted(clients.items())):
        data = to_client_data(arrays, client_id=index)
        data.device_id = int(np.asarray(arrays["device"]).reshape(-1)[0])  # the partition's key is `device`
        out.append(data)
    return out


# ---- node 1: federated generator ---------------------------------------------------------

def train_synthetic_generator(
    client_partitions: PartitionLoaders, partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FedAvg-train the (class, device)-conditional generator on the clients' train splits.

    Returns the generator record (TorchModelDataset format + ``sha256``/``trained``) and a
    JSON training summary with the per-round history. With ``synthetic.enabled: false``
    no round is run and the untrained initial generator is recorded (nothing samples it).
    """
    _check_params(synthetic)
    threads = _threads(synthetic)
    names, held = _devices(partition_manifest)
    n_classes = _n_classes(partition_manifest)
    clients = _load_clients(client_partitions)
    spec, _ = _spec(clients, n_classes)
    config = GeneratorTrainingConfig.from_params(synthetic["generator"])
    if not synthetic["enabled"]:
        config = GeneratorTrainingConfig.from_params({**synthetic["generator"], "rounds": 0})
        logger.info("synthetic.enabled is false: recording the untrained generator, no federated rounds")
    start = time.perf_counter()
    result = train_generator_federated(
        _client_data(clients), spec, len(names), config, int(synthetic["seed"]),
        held_out_device=held, device=str(synthetic.get("device", "cpu")), num_threads=threads,
    )  # fmt: skip
    sha = state_sha256(result.model)
    record = generator_record(result.model, extra={"sha256": sha, "trained": bool(result.summary.get("trained"))})
    summary = {
        **result.summary,
        "generator_sha256": sha,
        "client_names": sorted(clients),
        "device_names": names,
        "history": result.history,
        "node_wall_time_s": time.perf_counter() - start,
    }
    logger.info("synthetic generator: %d rounds in %.1fs, sha256 %s", config.rounds, summary["node_wall_time_s"], sha[:12])
    return record, summary


# ---- node 2: the plan ----------------------------------------------------------------------

def compute_synthesis_plan(
    client_partitions: PartitionLoaders, partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> dict[str, Any]:
    """The server's plan from each client's class x device count report (train split only).

    With ``synthetic.enabled: false`` the plan is computed with a cap of 0 images per
    client, i.e. every client receives an empty set (the files still exist, so the
    training switch never meets a missing input).
    """
    _check_params(synthetic)
    names, held = _devices(partition_manifest)
    n_classes = _n_classes(partition_manifest)
    clients = _load_clients(client_partitions)
    reports = {
        name: client_count_matrix(arrays["train_labels"], int(np.asarray(arrays["device"]).reshape(-1)[0]), n_classes, len(names))
        for name, arrays in clients.items()
    }
    params = dict(synthetic["plan"])
    if not synthetic["enabled"]:
        params["max_per_client"] = 0
    plan = compute_plan(reports, PlanConfig.from_params(params), held, n_classes, len(names))
    out = plan.as_dict()
    out.update({"enabled": bool(synthetic["enabled"]), "device_names": names, "class_names": _class_names(partition_manifest, n_classes)})
    for item in plan.skipped:
        logger.warning("synthesis plan: skipped %s", item)
    logger.info("synthesis plan: %d synthetic images over %d clients (%s)", plan.total(), len(plan.clients),
                ", ".join(f"{k}={plan.total(k)}" for k in plan.clients))  # fmt: skip
    return out


# ---- node 3: sampling (kept in memory until the gate passes) -------------------------------

def sample_synthetic_sets(
    synthetic_generator: dict[str, Any], synthesis_plan: dict[str, Any], partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> dict[str, dict[str, np.ndarray]]:
    """Draw every client's planned images from the generator (deterministic in the seed)."""
    _threads(synthetic)
    plan = SynthesisPlan.from_dict(synthesis_plan)
    model = generator_from_record(synthetic_generator)
    if state_sha256(model) != synthetic_generator.get("sha256", state_sha256(model)):
        raise ConfigurationError("synthetic_generator's weights do not match its recorded sha256; re-run the pipeline.")
    channels = int(synthetic_generator["spec"]["in_channels"])
    layout = 3 if channels == 1 else 4
    temperature = float((synthetic.get("sampling") or {}).get("temperature", 1.0))
    start = time.perf_counter()
    sets = sample_plan(model, plan, int(synthetic["seed"]), layout, temperature=temperature)
    logger.info("sampled %d synthetic images in %.1fs", sum(v["labels"].size for v in sets.values()), time.perf_counter() - start)
    return sets


# ---- nodes 4 and 5: the data gate ------------------------------------------------------------

def _hash_rows(images: np.ndarray) -> list[str]:
    from fedmic_pipeline.ingestion import pixel_sha1

    return pixel_sha1(images)


def evaluation_image_hashes(
    client_partitions: PartitionLoaders, global_test_set: Mapping[str, np.ndarray]
) -> list[str]:
    """SHA-1 of every image any evaluation uses: the global test set (original and every
    device rendering) and each client's local val and test splits."""
    hashes: set[str] = set()
    for key, value in global_test_set.items():
        if key == "images" or key.startswith("images_"):
            hashes.update(_hash_rows(np.asarray(value)))
    for name in sorted(client_partitions):
        arrays = client_partitions[name]()
        for split in ("val", "test"):
            if f"{split}_images" in arrays:
                hashes.update(_hash_rows(np.asarray(arrays[f"{split}_images"])))
    return sorted(hashes)


def _sample_table(sets: Mapping[str, Mapping[str, np.ndarray]]) -> pd.DataFrame:
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
            "pixel_sha1": _hash_rows(images) if n else [],
        }))  # fmt: skip
    columns = ["client", "row", "label", "device", "is_synthetic", "dtype", "shape", "pixel_min", "pixel_max", "pixel_sha1"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _array_table(sets: Mapping[str, Mapping[str, np.ndarray]], expected_clients: list[str]) -> pd.DataFrame:
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


def _count_table(sets: Mapping[str, Mapping[str, np.ndarray]], plan: SynthesisPlan) -> pd.DataFrame:
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


def validate_synthetic_sets(
    synthetic_candidate_sets: dict[str, dict[str, np.ndarray]],
    synthesis_plan: dict[str, Any],
    client_partitions: PartitionLoaders,
    global_test_set: dict[str, np.ndarray],
    partition_manifest: dict[str, Any],
    synthetic: dict[str, Any],
) -> dict[str, Any]:
    """The synthetic data gate (Great Expectations), run BEFORE any synthetic file is written.

    Checks: every sample flagged synthetic; labels within the classes; devices valid and
    never the held-out one; uint8 pixels of the partition's image shape within [0, 255];
    no synthetic image equal (pixel SHA-1) to any evaluation image (global test set in every
    rendering, clients' local val/test); one set per partition client with exactly the
    keys {images, labels, devices, is_synthetic} of equal lengths; counts per (client,
    class, device) equal to the plan.
    """
    from fedmic_pipeline.validation.gate import TableCheck, validate_tables  # GX imports slowly

    plan = SynthesisPlan.from_dict(synthesis_plan)
    names, held = _devices(partition_manifest)
    allowed = [d for d in range(len(names)) if d != held]
    clients = _load_clients(client_partitions)
    _, layout = _spec(clients, plan.num_classes)
    image_shape = str(tuple(np.asarray(next(iter(clients.values()))["train_images"]).shape[1:]))
    hashes = evaluation_image_hashes(client_partitions, global_test_set)
    samples = _sample_table(synthetic_candidate_sets)
    arrays = _array_table(synthetic_candidate_sets, sorted(clients))
    counts = _count_table(synthetic_candidate_sets, plan)

    sample_expectations: list[dict[str, Any]] = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "is_synthetic", "value_set": [True]},
         "description": "every synthetic sample carries is_synthetic = True"},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "label", "min_value": 0, "max_value": plan.num_classes - 1},
         "description": f"labels are classes 0..{plan.num_classes - 1}"},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "device", "value_set": allowed},
         "description": f"devices are training devices {allowed} (ids into partition_manifest.devices)"},
        {"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "device", "value_set": [] if held is None else [held]},
         "description": f"never the held-out device ({names[held] if held is not None else 'none'})"},
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
    docs = (synthetic.get("gate") or {}).get("docs_dir")
    report = validate_tables(
        "synthetic",
        [
            TableCheck("synthetic_samples", samples, sample_expectations, index_columns=("client", "row")),
            TableCheck("synthetic_client_arrays", arrays, array_expectations, index_columns=("client",)),
            TableCheck("synthetic_plan_counts", counts, count_expectations, index_columns=("client", "class_id", "device")),
        ],
        docs,
    )
    report["evaluation_images_hashed"] = len(hashes)
    report["layout_ndim"] = layout
    return report


def enforce_synthetic_gate(synthetic_validation_report: dict[str, Any]) -> bool:
    """Stop the run (raise) when the synthetic gate failed; otherwise unlock publishing."""
    from fedmic_pipeline.validation.gate import enforce_gate

    enforce_gate(
        synthetic_validation_report,
        hint="No synthetic file was written. Fix conf/base/parameters_synthetic_generation.yml (or the partition) "
        "and re-run `kedro run --pipelines synthetic_generation`.",
    )
    return True


# ---- node 6: publish -------------------------------------------------------------------------

def _npy_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(npy_bytes(array)).hexdigest()


def publish_synthetic_sets(
    synthetic_candidate_sets: dict[str, dict[str, np.ndarray]],
    synthetic_generator: dict[str, Any],
    synthesis_plan: dict[str, Any],
    synthetic_validation_report: dict[str, Any],
    synthetic: dict[str, Any],
    synthetic_gate_passed: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The per-client files (only after the gate) and their manifest.

    The manifest has no timestamps, so the same inputs give a byte-identical file.
    """
    if synthetic_gate_passed is not True:
        raise RuntimeError("The synthetic data gate did not pass; refusing to write synthetic sets.")
    sets = {name: {k: np.ascontiguousarray(arrays[k]) for k in SYNTHETIC_KEYS} for name, arrays in sorted(synthetic_candidate_sets.items())}
    devices, classes = synthesis_plan["device_names"], synthesis_plan["class_names"]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for name, arrays in sets.items():
        cells: dict[str, dict[str, int]] = {}
        for c, d in zip(arrays["labels"].tolist(), arrays["devices"].tolist(), strict=True):
            cells.setdefault(str(c), {}).setdefault(devices[d], 0)
            cells[str(c)][devices[d]] += 1
        counts[name] = {c: dict(sorted(v.items())) for c, v in sorted(cells.items())}
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "enabled": bool(synthetic["enabled"]),
        "keys": list(SYNTHETIC_KEYS),
        "use": "append to the client's TRAIN split only (is_synthetic = True); never to val or test",
        "generator": {
            "sha256": synthetic_generator["sha256"],
            "architecture": synthetic_generator["architecture"],
            "spec": synthetic_generator["spec"],
            "kwargs": synthetic_generator["kwargs"],
            "trained": bool(synthetic_generator.get("trained", False)),
            "training": dict(synthetic["generator"]),
        },
        "seed": int(synthetic["seed"]),
        "sampling": dict(synthetic.get("sampling") or {}),
        "plan_params": synthesis_plan["config"],
        "held_out_device": None if synthesis_plan["held_out_device"] is None else devices[synthesis_plan["held_out_device"]],
        "devices": devices,
        "class_names": {str(c): n for c, n in enumerate(classes)},
        "counts": counts,
        "totals": {name: int(arrays["labels"].size) for name, arrays in sets.items()},
        "total": int(sum(arrays["labels"].size for arrays in sets.values())),
        "sha256": {name: {k: _npy_sha256(v) for k, v in sorted(arrays.items())} for name, arrays in sets.items()},
        "gate": {"suite": synthetic_validation_report.get("suite"), "success": bool(synthetic_validation_report.get("success")),
                 "statistics": synthetic_validation_report.get("statistics")},
    }  # fmt: skip
    logger.info("published %d synthetic images for %d clients (generator %s)", manifest["total"], len(sets), manifest["generator"]["sha256"][:12])
    return sets, manifest


# ---- node 7: quality (evaluation only) -------------------------------------------------------

def _float_images(images: np.ndarray) -> torch.Tensor:
    arr = np.asarray(images)
    arr = arr[:, None] if arr.ndim == 3 else np.transpose(arr, (0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)


def evaluate_synthetic_quality(
    synthetic_generator: dict[str, Any],
    client_partitions: PartitionLoaders,
    global_test_set: dict[str, np.ndarray],
    partition_manifest: dict[str, Any],
    synthetic: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, str]:
    """FD, MMD, k-NN precision/recall and CAS (see core/synthesis/quality.py): JSON, a tidy
    CSV table and a markdown summary. Evaluation only: its outputs feed nothing else."""
    _check_params(synthetic)
    _threads(synthetic)
    names, held = _devices(partition_manifest)
    n_classes = _n_classes(partition_manifest)
    class_names = _class_names(partition_manifest, n_classes)
    if not synthetic["enabled"] or not synthetic_generator.get("trained", False):
        result = {"enabled": False, "reason": "synthetic.enabled is false: no generator was trained"}
        table = pd.DataFrame(columns=_TABLE_COLUMNS)
        return result, table, "# Synthetic sample quality\n\nSynthetic generation is disabled (`synthetic.enabled: false`).\n"
    clients = _load_clients(client_partitions)
    _, layout = _spec(clients, n_classes)
    x_train = _float_images(np.concatenate([a["train_images"] for a in clients.values()]))
    c_train = np.concatenate([np.asarray(a["train_labels"]).reshape(-1) for a in clients.values()]).astype(np.int64)
    d_train = np.concatenate([np.full(np.asarray(a["train_labels"]).size, int(np.asarray(a["device"]).reshape(-1)[0])) for a in clients.values()])
    y_test = torch.from_numpy(np.asarray(global_test_set["labels"]).reshape(-1).astype(np.int64))
    tests = {}
    for d, name in enumerate(names):
        key = f"images_{name}"
        if key not in global_test_set:
            raise ConfigurationError(f"global_test_set lacks '{key}'; re-run the data_partition pipeline.")
        tests[d] = (_float_images(global_test_set[key]), y_test)
    start = time.perf_counter()
    config = QualityConfig.from_params(synthetic.get("quality", {}))
    raw = evaluate_quality(
        generator_from_record(synthetic_generator), (x_train, c_train, d_train), tests, n_classes, len(names), held,
        config, int(synthetic["seed"]), layout_ndim=layout,
    )  # fmt: skip
    result = _name_devices(raw, names, class_names)
    result.update({
        "enabled": True,
        "generator_sha256": synthetic_generator["sha256"],
        "device_names": names,
        "held_out_device": None if held is None else names[held],
        "class_names": class_names,
        "reference_encoder_note": "Inception weights cannot be downloaded (no internet), so FD is measured in the "
        "feature space of a project-trained student CNN (joint class x device classifier), not FID.",
        "wall_time_s": time.perf_counter() - start,
    })  # fmt: skip
    table = quality_table(result)
    logger.info("synthetic quality evaluated in %.1fs", result["wall_time_s"])
    return result, table, quality_markdown(result, table)


def _name_devices(raw: dict[str, Any], names: list[str], class_names: list[str]) -> dict[str, Any]:
    """Device ids -> names in the JSON (ids kept beside them)."""
    out = dict(raw)
    dist = dict(raw["distribution"])
    for key in ("cells", "by_device"):
        dist[key] = [{**e, "device_name": names[e["device"]]} for e in dist[key]]
    dist["cells"] = [{**e, "class_name": class_names[e["class_id"]]} for e in dist["cells"]]
    dist["by_class"] = [{**e, "class_name": class_names[e["class_id"]]} for e in dist["by_class"]]
    out["distribution"] = dist
    cas = dict(raw["cas"])
    for key in ("trained_on_synthetic", "trained_on_real"):
        cas[key] = {names[d]: v for d, v in cas[key].items()}
    cas["held_out_device"] = None if raw["cas"]["held_out_device"] is None else names[raw["cas"]["held_out_device"]]
    out["cas"] = cas
    enc = dict(raw["encoder"])
    for key in ("test_joint_accuracy_by_device", "test_device_accuracy_by_device"):
        enc[key] = {names[d]: v for d, v in enc[key].items()}
    out["encoder"] = enc
    return out


_TABLE_COLUMNS = ["section", "scope", "class", "device", "metric", "synthetic", "real_reference", "n_real", "n_compared"]
_DIST_METRICS = ("fd", "mmd2", "precision_k3", "recall_k3", "precision_k5", "recall_k5")


def quality_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy rows: distribution metrics (synthetic vs test, real train vs test as the
    reference) per cell/class/device/overall, and CAS (synthetic-trained vs real-trained
    student) accuracy and per-class recall per test-set device."""
    rows = []
    dist = result["distribution"]
    scopes = [("cell", e.get("class_name"), e.get("device_name"), e) for e in dist["cells"]]
    scopes += [("class", e["class_name"], "all", e) for e in dist["by_class"]]
    scopes += [("device", "all", e["device_name"], e) for e in dist["by_device"]]
    if dist.get("overall"):
        scopes.append(("overall", "all", "all", dist["overall"]))
    for scope, cls, dev, e in scopes:
        syn, ref = e.get("synthetic_vs_test"), e.get("real_train_vs_test")
        if not syn:
            continue
        metrics = [m for m in _DIST_METRICS if m in syn] or list(_DIST_METRICS)
        for metric in metrics:
            rows.append(["distribution", scope, cls, dev, metric, syn.get(metric), ref.get(metric), syn["n_real"], syn["n_fake"]])
    cas = result["cas"]
    classes = result["class_names"]
    for dev, block in cas["trained_on_synthetic"].items():
        real = cas["trained_on_real"][dev]
        rows.append(["cas", "device", "all", dev, "accuracy", block["accuracy"], real["accuracy"], block["n"], cas["train_size"]])
        for c, (a, b) in enumerate(zip(block["per_class_recall"], real["per_class_recall"], strict=True)):
            rows.append(["cas", "device", classes[c], dev, "recall", a, b, block["n"], cas["train_size"]])
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def quality_markdown(result: Mapping[str, Any], table: pd.DataFrame) -> str:
    """A human summary: distribution metrics with their real-data reference, and CAS."""
    lines = [
        "# Synthetic sample quality (FedSSG)",
        "",
        f"Generator sha256 `{result['generator_sha256'][:16]}...`; seed {result['seed']}. {result['reference_encoder_note']}",
        "Real reference set: the global TEST images of the cell's class rendered by the cell's device. `synthetic` compares "
        "generator samples with it; `real train` compares the real training images of the same cell (same sample size) "
        "with it, i.e. the value a perfect generator would reach. Lower FD/MMD^2 and higher precision/recall are better.",
        "",
        "## Distribution metrics",
        "",
        "| scope | class | device | n synth | FD synth | FD real train | MMD^2 synth | MMD^2 real train | P@3 synth | R@3 synth | P@3 real | R@3 real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dist = table[table["section"] == "distribution"]
    for (scope, cls, dev), group in dist.groupby(["scope", "class", "device"], sort=False):
        g = group.set_index("metric")
        def val(metric: str, column: str) -> str:
            return _fmt(g[column].get(metric)) if metric in g.index else "-"
        lines.append(
            f"| {scope} | {cls} | {dev} | {int(g['n_compared'].iloc[0])} | {val('fd', 'synthetic')} | {val('fd', 'real_reference')} | "
            f"{val('mmd2', 'synthetic')} | {val('mmd2', 'real_reference')} | {val('precision_k3', 'synthetic')} | "
            f"{val('recall_k3', 'synthetic')} | {val('precision_k3', 'real_reference')} | {val('recall_k3', 'real_reference')} |"
        )
    cas = result["cas"]
    lines += [
        "",
        "## Classification accuracy score (train on synthetic only, test on real)",
        "",
        f"Student CNN trained on {cas['train_size']} synthetic images (same class x device counts as the real training "
        "data) vs the same recipe trained on the real training data; tested on the global test set rendered by each device.",
        "",
        "| test device | CAS (synthetic-trained) | real-trained | " + " | ".join(f"recall {c} synth / real" for c in result["class_names"]) + " |",
        "|---|---|---|" + "---|" * len(result["class_names"]),
    ]
    for dev, block in cas["trained_on_synthetic"].items():
        real = cas["trained_on_real"][dev]
        tag = " (held out, unseen)" if dev == cas["held_out_device"] else ""
        recalls = " | ".join(f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(block["per_class_recall"], real["per_class_recall"], strict=True))
        lines.append(f"| {dev}{tag} | {_fmt(block['accuracy'])} | {_fmt(real['accuracy'])} | {recalls} |")
    lines += [
        "",
        f"Mean over seen devices: CAS {_fmt(cas.get('trained_on_synthetic_mean_seen_devices'))} vs real-trained "
        f"{_fmt(cas.get('trained_on_real_mean_seen_devices'))}.",
        "",
        "Reference encoder on the global test set (per rendering device): device identified "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in result["encoder"]["test_device_accuracy_by_device"].items())
        + "; joint class x device label "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in result["encoder"]["test_joint_accuracy_by_device"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ---- node 8: the sample grid -----------------------------------------------------------------

def plot_synthetic_grid(
    synthetic_generator: dict[str, Any], global_test_set: dict[str, np.ndarray], partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> Figure:
    """Rows = (class, training device); left real global-test images of that class rendered
    by that device (public evaluation data, no client's private image), right synthetic
    samples of the cell."""
    names, held = _devices(partition_manifest)
    n_classes = _n_classes(partition_manifest)
    class_names = _class_names(partition_manifest, n_classes)
    per_side = int((synthetic.get("report") or {}).get("grid_examples", 4))
    if not synthetic["enabled"] or not synthetic_generator.get("trained", False):
        return synthetic_grid_figure({}, {}, class_names, names, per_side)
    model = generator_from_record(synthetic_generator)
    layout = 3 if int(synthetic_generator["spec"]["in_channels"]) == 1 else 4
    labels = np.asarray(global_test_set["labels"]).reshape(-1)
    trained_devices = sorted({int(c["device_id"]) for c in partition_manifest["client_devices"].values()})
    real, synth = {}, {}
    temperature = float((synthetic.get("sampling") or {}).get("temperature", 1.0))
    gen = make_generator(int(synthetic["seed"]), _GRID_STREAM)
    for c in range(n_classes):
        for d in trained_devices:
            if d == held:
                continue
            rows = np.flatnonzero(labels == c)[:per_side]
            real[(c, d)] = np.asarray(global_test_set[f"images_{names[d]}"])[rows]
            synth[(c, d)] = images_to_uint8(model.sample([c] * per_side, [d] * per_side, gen, temperature=temperature), layout)
    return synthetic_grid_figure(real, synth, class_names, names, per_side,
                                 title=f"Real (global test, left) vs synthetic (right) per class x device; generator "
                                 f"{synthetic_generator['sha256'][:12]}")  # fmt: skip
