"""FedSSG's per-hospital synthetic training sets, from a partition to published files.

The steps of the `synthetic_generation` stage as plain functions over a partition's
clients (arrays, or the loaders a PartitionedDataset hands over) and its manifest: check
the parameters, train the federated generator, plan, sample, gate, publish, measure
quality. They live outside `pipelines/` because `ablation` runs the same steps on the
partitions it builds in memory; the stage's Kedro nodes wrap them for the catalog.

With ``synthetic.cache_dir`` set, the trained generator, the fitted quality ruler and the
quality report are kept in a result cache (`result_cache.py`) and reused by any later run on
the same inputs: a second `make run` trains nothing here.

Only these leave a client: generator weights (FedAvg uploads) and the class x device count
matrix of its training split. Pooled real images are touched only by `measure_quality`
(evaluation only: reference encoder, real-trained CAS reference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from fedmic_pipeline.core.data import make_generator, to_client_data
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec
from fedmic_pipeline.core.synthesis import (
    GeneratorTrainingConfig,
    PlanConfig,
    QualityConfig,
    QualityRuler,
    SynthesisPlan,
    client_count_matrix,
    compute_plan,
    generator_from_record,
    generator_record,
    images_to_uint8,
    sample_plan,
    state_sha256,
    train_generator_federated,
)
from fedmic_pipeline.partitioning import npy_sha256
from fedmic_pipeline.result_cache import ResultCache, content_key
from fedmic_pipeline.reporting.synthetic_plots import synthetic_grid_figure
from fedmic_pipeline.validation.synthetic_suite import SYNTHETIC_KEYS, validate_synthetic

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
_TOP_KEYS = {"enabled", "seed", "num_threads", "device", "cache_dir", "generator", "plan", "sampling", "quality", "gate", "report"}
_GRID_STREAM = 41
_PARAMS_FILE = "conf/base/parameters_synthetic_generation.yml"

Arrays = dict[str, np.ndarray]
#: A partition's clients by name: their arrays, or the loaders of a PartitionedDataset.
Clients = Mapping[str, Arrays | Callable[[], Arrays]]


# ---- parameters and inputs ---------------------------------------------------------------

def _check_params(synthetic: Mapping[str, Any]) -> None:
    """Every parameter problem, before any work, naming the file to fix."""
    unknown = sorted(set(synthetic) - _TOP_KEYS)
    missing = sorted({"enabled", "seed", "generator", "plan"} - set(synthetic))
    if unknown or missing:
        raise ConfigurationError(f"synthetic parameters: unknown {unknown}, missing {missing} (valid: {sorted(_TOP_KEYS)}); fix {_PARAMS_FILE}.")
    if not isinstance(synthetic["enabled"], bool):
        raise ConfigurationError(f"synthetic.enabled must be true or false, got {synthetic['enabled']!r}; fix {_PARAMS_FILE}.")
    seed = synthetic["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigurationError(f"synthetic.seed must be an integer >= 0, got {seed!r}; fix {_PARAMS_FILE}.")
    threads = synthetic.get("num_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigurationError(f"synthetic.num_threads must be an integer >= 1 or null, got {threads!r}; fix {_PARAMS_FILE}.")
    try:
        GeneratorTrainingConfig.from_params(synthetic["generator"])
        PlanConfig.from_params(synthetic["plan"])
        QualityConfig.from_params(synthetic.get("quality", {}))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} Fix {_PARAMS_FILE}.") from None


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


def _load_clients(clients: Clients) -> dict[str, Arrays]:
    if not clients:
        raise ConfigurationError("client_partitions is empty; run `kedro run --pipelines data_partition` first.")
    out = {}
    for name in sorted(clients):
        arrays = clients[name]() if callable(clients[name]) else clients[name]
        missing = [k for k in ("train_images", "train_labels", "device") if k not in arrays]
        if missing:
            raise ConfigurationError(f"{name} lacks {missing}; re-run the data_partition pipeline.")
        out[name] = arrays
    return out


def _cache(synthetic: Mapping[str, Any]) -> ResultCache:
    return ResultCache(synthetic.get("cache_dir"))


def _client_inputs(arrays: Mapping[str, Arrays], keys: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """What a cache key needs of every client: the named arrays it has."""
    return {name: {k: np.asarray(a[k]) for k in keys if k in a} for name, a in arrays.items()}


def _device_of(arrays: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(arrays["device"]).reshape(-1)[0])  # the partition's key is `device`


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


def client_data(clients: Mapping[str, Mapping[str, np.ndarray]]) -> list[ClientData]:
    """The core's clients, in name order, each carrying its imaging device."""
    out = []
    for index, (_, arrays) in enumerate(sorted(clients.items())):
        data = to_client_data(arrays, client_id=index)
        data.device_id = _device_of(arrays)
        out.append(data)
    return out


def _temperature(synthetic: Mapping[str, Any]) -> float:
    return float((synthetic.get("sampling") or {}).get("temperature", 1.0))


def _layout(generator: Mapping[str, Any]) -> int:
    return 3 if int(generator["spec"]["in_channels"]) == 1 else 4


# ---- the stage's steps ---------------------------------------------------------------------

def train_generator(clients: Clients, manifest: Mapping[str, Any], synthetic: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """FedAvg-train the (class, device)-conditional generator on the clients' train splits.

    Returns the generator record (TorchModelDataset format + ``sha256``/``trained``) and a
    JSON training summary with the per-round history. With ``synthetic.enabled: false``
    no round is run and the untrained initial generator is recorded (nothing samples it).
    """
    _check_params(synthetic)
    threads = _threads(synthetic)
    names, held = _devices(manifest)
    n_classes = _n_classes(manifest)
    arrays = _load_clients(clients)
    spec, _ = _spec(arrays, n_classes)
    key = content_key(
        "generator", _client_inputs(arrays, ("train_images", "train_labels", "device")), names, held, n_classes,
        {k: synthetic.get(k) for k in ("enabled", "seed", "device", "generator")},
    )  # fmt: skip
    cached = _cache(synthetic).get("generator", key)
    if cached is not None and cached["record"].get("sha256") == state_sha256(cached["record"]["state_dict"]):
        return cached["record"], {**cached["summary"], "cache": {"key": key, "reused": True}}
    config = GeneratorTrainingConfig.from_params(synthetic["generator"])
    if not synthetic["enabled"]:
        config = GeneratorTrainingConfig.from_params({**synthetic["generator"], "rounds": 0})
        logger.info("synthetic.enabled is false: recording the untrained generator, no federated rounds")
    start = time.perf_counter()
    result = train_generator_federated(
        client_data(arrays), spec, len(names), config, int(synthetic["seed"]),
        held_out_device=held, device=str(synthetic.get("device", "cpu")), num_threads=threads,
    )  # fmt: skip
    sha = state_sha256(result.model)
    record = generator_record(result.model, extra={"sha256": sha, "trained": bool(result.summary.get("trained"))})
    summary = {
        **result.summary,
        "generator_sha256": sha,
        "client_names": sorted(arrays),
        "device_names": names,
        "history": result.history,
        "node_wall_time_s": time.perf_counter() - start,
    }
    logger.info("synthetic generator: %d rounds in %.1fs, sha256 %s", config.rounds, summary["node_wall_time_s"], sha[:12])
    _cache(synthetic).put("generator", key, {"record": record, "summary": summary})
    return record, {**summary, "cache": {"key": key, "reused": False}}


def plan_synthesis(clients: Clients, manifest: Mapping[str, Any], synthetic: Mapping[str, Any]) -> dict[str, Any]:
    """The server's plan from each client's class x device count report (train split only).

    With ``synthetic.enabled: false`` the plan is computed with a cap of 0 images per
    client, i.e. every client receives an empty set (the files still exist, so the
    training switch never meets a missing input).
    """
    _check_params(synthetic)
    names, held = _devices(manifest)
    n_classes = _n_classes(manifest)
    reports = {
        name: client_count_matrix(arrays["train_labels"], _device_of(arrays), n_classes, len(names))
        for name, arrays in _load_clients(clients).items()
    }
    params = dict(synthetic["plan"])
    if not synthetic["enabled"]:
        params["max_per_client"] = 0
    plan = compute_plan(reports, PlanConfig.from_params(params), held, n_classes, len(names))
    out = plan.as_dict()
    out.update({"enabled": bool(synthetic["enabled"]), "device_names": names, "class_names": _class_names(manifest, n_classes)})
    for item in plan.skipped:
        logger.warning("synthesis plan: skipped %s", item)
    logger.info("synthesis plan: %d synthetic images over %d clients (%s)", plan.total(), len(plan.clients),
                ", ".join(f"{k}={plan.total(k)}" for k in plan.clients))  # fmt: skip
    return out


def sample_sets(generator: Mapping[str, Any], synthesis_plan: Mapping[str, Any], synthetic: Mapping[str, Any]) -> dict[str, Arrays]:
    """Draw every client's planned images from the generator (deterministic in the seed)."""
    _threads(synthetic)
    plan = SynthesisPlan.from_dict(synthesis_plan)
    model = generator_from_record(generator)
    if state_sha256(model) != generator.get("sha256", state_sha256(model)):
        raise ConfigurationError("synthetic_generator's weights do not match its recorded sha256; re-run the pipeline.")
    start = time.perf_counter()
    sets = sample_plan(model, plan, int(synthetic["seed"]), _layout(generator), temperature=_temperature(synthetic))
    logger.info("sampled %d synthetic images in %.1fs", sum(v["labels"].size for v in sets.values()), time.perf_counter() - start)
    return sets


def validate_candidates(
    candidate_sets: Mapping[str, Arrays], synthesis_plan: Mapping[str, Any], clients: Clients,
    global_test_set: Mapping[str, np.ndarray], manifest: Mapping[str, Any], synthetic: Mapping[str, Any],
) -> dict[str, Any]:
    """The synthetic data gate's report (`validation.synthetic_suite`) on the candidate sets."""
    plan = SynthesisPlan.from_dict(synthesis_plan)
    names, held = _devices(manifest)
    arrays = _load_clients(clients)
    _, layout = _spec(arrays, plan.num_classes)
    docs = (synthetic.get("gate") or {}).get("docs_dir")
    report = validate_synthetic(candidate_sets, plan, arrays, global_test_set, names, held, docs)
    report["layout_ndim"] = layout
    return report


def publish(
    candidate_sets: Mapping[str, Arrays], generator: Mapping[str, Any], synthesis_plan: Mapping[str, Any],
    validation_report: Mapping[str, Any], synthetic: Mapping[str, Any],
) -> tuple[dict[str, Arrays], dict[str, Any]]:
    """The per-client sets with exactly `SYNTHETIC_KEYS`, and their manifest.

    The manifest has no timestamps, so the same inputs give a byte-identical file.
    """
    sets = {name: {k: np.ascontiguousarray(arrays[k]) for k in SYNTHETIC_KEYS} for name, arrays in sorted(candidate_sets.items())}
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
            "sha256": generator["sha256"],
            "architecture": generator["architecture"],
            "spec": generator["spec"],
            "kwargs": generator["kwargs"],
            "trained": bool(generator.get("trained", False)),
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
        "sha256": {name: {k: npy_sha256(v) for k, v in sorted(arrays.items())} for name, arrays in sets.items()},
        "gate": {"suite": validation_report.get("suite"), "success": bool(validation_report.get("success")),
                 "statistics": validation_report.get("statistics")},
    }  # fmt: skip
    logger.info("published %d synthetic images for %d clients (generator %s)", manifest["total"], len(sets), manifest["generator"]["sha256"][:12])
    return sets, manifest


# ---- evaluation only: quality and the sample grid ------------------------------------------

def _float_images(images: np.ndarray) -> torch.Tensor:
    arr = np.asarray(images)
    arr = arr[:, None] if arr.ndim == 3 else np.transpose(arr, (0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)


def _ruler_key(arrays: Mapping[str, Arrays], manifest: Mapping[str, Any], synthetic: Mapping[str, Any],
               global_test_set: Mapping[str, np.ndarray] | None) -> str:
    """The result-cache key of the quality ruler: every real image and label it reads, the
    quality parameters and the seed (from the uint8 arrays, before any float conversion)."""
    names, held = _devices(manifest)
    test_inputs = None if global_test_set is None else {k: np.asarray(v) for k, v in global_test_set.items()}
    return content_key(
        "quality_ruler", _client_inputs(arrays, ("train_images", "train_labels", "val_images", "val_labels", "device")),
        test_inputs, names, held, _n_classes(manifest), QualityConfig.from_params(synthetic.get("quality", {})).as_dict(),
        int(synthetic["seed"]),
    )  # fmt: skip


def quality_ruler(
    clients: Clients, manifest: Mapping[str, Any], synthetic: Mapping[str, Any], global_test_set: Mapping[str, np.ndarray] | None
) -> tuple[QualityRuler, int]:
    """The generator-independent half of the quality step on this partition (and the image
    layout): encoder, real features and references ``validation`` (the hospitals' local
    validation splits pooled per device) and ``test`` (the global test set per device;
    left out when ``global_test_set`` is None, as when choosing settings). Fitted once per
    set of inputs: later runs restore it from the result cache."""
    names, held = _devices(manifest)
    n_classes = _n_classes(manifest)
    arrays = _load_clients(clients)
    _, layout = _spec(arrays, n_classes)

    def labels(a: Arrays, split: str) -> np.ndarray:
        return np.asarray(a[f"{split}_labels"]).reshape(-1).astype(np.int64)

    x_train = _float_images(np.concatenate([a["train_images"] for a in arrays.values()]))
    c_train = np.concatenate([labels(a, "train") for a in arrays.values()])
    d_train = np.concatenate([np.full(np.asarray(a["train_labels"]).size, _device_of(a)) for a in arrays.values()])
    validation = {}
    for d in sorted({_device_of(a) for a in arrays.values()}):
        own = [a for a in arrays.values() if _device_of(a) == d and "val_images" in a and labels(a, "val").size]
        if own:
            validation[d] = (_float_images(np.concatenate([a["val_images"] for a in own])),
                             torch.from_numpy(np.concatenate([labels(a, "val") for a in own])))  # fmt: skip
    references = {"validation": validation}
    if global_test_set is not None:
        y_test = torch.from_numpy(np.asarray(global_test_set["labels"]).reshape(-1).astype(np.int64))
        references["test"] = {}
        for d, name in enumerate(names):
            key = f"images_{name}"
            if key not in global_test_set:
                raise ConfigurationError(f"global_test_set lacks '{key}'; re-run the data_partition pipeline.")
            references["test"][d] = (_float_images(global_test_set[key]), y_test)
    config = QualityConfig.from_params(synthetic.get("quality", {}))
    key, cache = _ruler_key(arrays, manifest, synthetic, global_test_set), _cache(synthetic)
    fitted = cache.get("quality_ruler", key)
    ruler = QualityRuler((x_train, c_train, d_train), references, n_classes, len(names), held, config, int(synthetic["seed"]), fitted=fitted)
    if fitted is None:
        cache.put("quality_ruler", key, ruler.fitted_state())
    return ruler, layout


def measure_quality(
    generator: Mapping[str, Any], clients: Clients, global_test_set: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any], synthetic: Mapping[str, Any],
) -> dict[str, Any]:
    """FD, MMD, k-NN precision/recall and CAS (see core/synthesis/quality.py) against the
    validation and the test reference, as JSON with device and class names;
    ``{"enabled": False, ...}`` when no generator was trained. The report of a generator
    already scored by the same ruler is reused from the result cache (the ruler is then not
    even restored)."""
    _check_params(synthetic)
    _threads(synthetic)
    names, held = _devices(manifest)
    class_names = _class_names(manifest, _n_classes(manifest))
    if not synthetic["enabled"] or not generator.get("trained", False):
        return {"enabled": False, "reason": "synthetic.enabled is false: no generator was trained"}
    start = time.perf_counter()
    arrays = _load_clients(clients)
    _, layout = _spec(arrays, len(class_names))
    key = content_key("quality", _ruler_key(arrays, manifest, synthetic, global_test_set), generator["sha256"],
                      generator["architecture"], generator["kwargs"], layout)  # fmt: skip
    cache = _cache(synthetic)
    result = cache.get("quality", key)
    if result is None:
        ruler, _ = quality_ruler(arrays, manifest, synthetic, global_test_set)
        result = _name_devices(ruler.score(generator_from_record(generator), layout), names, class_names)
        result.update({
            "enabled": True,
            "generator_sha256": generator["sha256"],
            "device_names": names,
            "held_out_device": None if held is None else names[held],
            "class_names": class_names,
            "reference_encoder_note": "Inception weights cannot be downloaded (no internet), so FD is measured in the "
            "feature space of a project-trained student CNN (joint class x device classifier), not FID.",
            "wall_time_s": time.perf_counter() - start,
        })  # fmt: skip
        cache.put("quality", key, result)
        logger.info("synthetic quality evaluated in %.1fs", result["wall_time_s"])
    return result


def _name_devices(raw: Mapping[str, Any], names: list[str], class_names: list[str]) -> dict[str, Any]:
    """Device ids -> names in a ``QualityRuler.score`` result (ids kept beside them)."""
    out = dict(raw)
    out["references"] = {}
    for ref, block in raw["references"].items():
        dist = dict(block["distribution"])
        for key in ("cells", "by_device"):
            dist[key] = [{**e, "device_name": names[e["device"]]} for e in dist[key]]
        dist["cells"] = [{**e, "class_name": class_names[e["class_id"]]} for e in dist["cells"]]
        dist["by_class"] = [{**e, "class_name": class_names[e["class_id"]]} for e in dist["by_class"]]
        cas = dict(block["cas"])
        for key in ("trained_on_synthetic", "trained_on_real"):
            cas[key] = {names[d]: v for d, v in cas[key].items()}
        cas["held_out_device"] = None if block["cas"]["held_out_device"] is None else names[block["cas"]["held_out_device"]]
        out["references"][ref] = {"distribution": dist, "cas": cas}
    enc = dict(raw["encoder"])
    enc["accuracy"] = {ref: {k: {names[d]: v for d, v in by.items()} for k, by in acc.items()} for ref, acc in raw["encoder"]["accuracy"].items()}
    out["encoder"] = enc
    return out


def grid_figure(
    generator: Mapping[str, Any], global_test_set: Mapping[str, np.ndarray], manifest: Mapping[str, Any], synthetic: Mapping[str, Any]
) -> Figure:
    """Rows = (class, training device); left real global-test images of that class rendered
    by that device (public evaluation data, no client's private image), right synthetic
    samples of the cell."""
    names, held = _devices(manifest)
    n_classes = _n_classes(manifest)
    class_names = _class_names(manifest, n_classes)
    per_side = int((synthetic.get("report") or {}).get("grid_examples", 4))
    if not synthetic["enabled"] or not generator.get("trained", False):
        return synthetic_grid_figure({}, {}, class_names, names, per_side)
    model = generator_from_record(generator)
    labels = np.asarray(global_test_set["labels"]).reshape(-1)
    trained_devices = sorted({int(c["device_id"]) for c in manifest["client_devices"].values()})
    real, synth = {}, {}
    gen = make_generator(int(synthetic["seed"]), _GRID_STREAM)
    for c in range(n_classes):
        for d in trained_devices:
            if d == held:
                continue
            rows = np.flatnonzero(labels == c)[:per_side]
            real[(c, d)] = np.asarray(global_test_set[f"images_{names[d]}"])[rows]
            samples = model.sample([c] * per_side, [d] * per_side, gen, temperature=_temperature(synthetic))
            synth[(c, d)] = images_to_uint8(samples, _layout(generator))
    return synthetic_grid_figure(real, synth, class_names, names, per_side,
                                 title=f"Real (global test, left) vs synthetic (right) per class x device; generator "
                                 f"{generator['sha256'][:12]}")  # fmt: skip
