"""Glue between Flower's configuration and the core: configs, a node's data, the algorithm.

Three sources of configuration, each with one job:

* the **run config** (``[tool.flwr.app.config]`` in pyproject.toml, overridden with
  ``flwr run . <connection> --run-config "key=value ..."``) is read by the ServerApp
  only: algorithm, rounds, seed, sampling, failure policy, MLflow, output directory;
* the **node config** (``flower-supernode --node-config "partition-id=0 num-partitions=2
  data-dir='/path'"``) says which hospital a SuperNode is and where its data lives;
* the **message config** (a ``ConfigRecord`` in every message) carries what the server
  decided -- algorithm name and resolved parameters, DataSpec, round, seed -- so every
  client builds exactly the server's algorithm without reading the server's files.

A node loads its OWN partition only: ``<data-dir>/clients/client_{partition_id:02d}.npz``
(the files ``make run`` writes to ``data/05_model_input``). The server reads
``partition_manifest.json`` (channels, classes) and the image size from its own
``data-dir``; it scores no images itself and selects the global model on the validation
counts the nodes report. Relative paths resolve against the project root (``FEDMIC_PROJECT_ROOT``,
else the nearest parent of the working directory holding a Kedro ``pyproject.toml``).

This module imports torch and the core lazily, so the ClientApp's ``query`` handler
(which only counts samples) starts quickly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.protocol import ClientData, DataSpec, FederatedAlgorithm
    from ..core.simulation import SimulationConfig

__all__ = [
    "FAILURE_POLICIES",
    "RUN_CONFIG_DEFAULTS",
    "FlowerConfigError",
    "NodeIdentity",
    "ServerRunConfig",
    "build_algorithm_for",
    "client_partition_path",
    "load_algorithm_params",
    "load_client_data",
    "load_data_spec",
    "node_identity",
    "partition_sizes",
    "preload_client_data",
    "project_root",
    "resolve_path",
    "spec_from_config",
    "spec_to_config",
]

logger = logging.getLogger(__name__)

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_DIR_KEY = "data-dir"
NUM_THREADS_KEY = "num-threads"
CLIENTS_SUBDIR = "clients"
GLOBAL_TEST_FILE = "global_test.npz"
MANIFEST_FILE = "partition_manifest.json"
FAILURE_POLICIES = ("continue", "stop")
SECURE_AGGREGATION_MODES = ("none", "secaggplus")

#: The run config and its defaults; pyproject.toml's ``[tool.flwr.app.config]`` mirrors
#: this (Flower only accepts ``--run-config`` overrides of keys declared there), and
#: ``ServerRunConfig.from_run_config`` falls back to it for keys that are absent (e.g.
#: under ``flwr.simulation.run_simulation``, which passes an empty run config).
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "algorithm": "fedmic",
    # YAML with ``algorithm_params: {common: {...}, <algorithm>: {...}}``; "" = none.
    "params-file": "conf/base/parameters_federated_training.yml",
    # JSON object merged over the params file, e.g. '{"teacher_width": 0.125}'.
    "algorithm-params": "{}",
    "num-rounds": 10,
    "join-ratio": 1.0,
    "seed": 42,
    "device": "auto",
    "amp": "auto",
    "num-threads": 0,
    "eval-every": 1,
    "eval-batch-size": 1024,
    "evaluate-personalized": True,
    "data-dir": "data/05_model_input",
    "output-dir": "data/06_models/flower",
    "min-nodes": 2,
    "node-wait-timeout": 120.0,
    "round-timeout": 600.0,
    "on-node-failure": "continue",
    # "" = $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db; "none" = off.
    "mlflow-tracking-uri": "",
    "mlflow-experiment": "fedmic-flower",
    # "secaggplus" = Flower's SecAgg+ for the train exchange (FedAvg family only; see
    # secure_aggregation); its updates are clipped to +-secagg-clipping-range per entry.
    "secure-aggregation": "none",
    "secagg-clipping-range": 8.0,
}


class FlowerConfigError(ValueError):
    """A Flower-side configuration value is missing or invalid; the message names the fix."""


# -- paths ---------------------------------------------------------------------------
def project_root() -> Path:
    """``$FEDMIC_PROJECT_ROOT``, else the nearest parent of the working directory whose
    pyproject.toml has a ``[tool.kedro]`` table, else the working directory."""
    env = os.environ.get("FEDMIC_PROJECT_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file():
            try:
                if "[tool.kedro]" in pyproject.read_text(encoding="utf-8"):
                    return candidate
            except OSError:  # pragma: no cover - unreadable file: keep looking
                continue
    return cwd


def resolve_path(value: str | os.PathLike[str], root: Path | None = None) -> Path:
    """An absolute path: ``value`` itself when absolute, else under the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root or project_root()) / path


# -- the server's run config -----------------------------------------------------------
def _get(run_config: Mapping[str, Any], key: str) -> Any:
    return run_config[key] if key in run_config else RUN_CONFIG_DEFAULTS[key]


def _as_int(value: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise FlowerConfigError(f"run config '{key}' must be an integer, got {value!r}.")
    out = int(value)
    if minimum is not None and out < minimum:
        raise FlowerConfigError(f"run config '{key}' must be >= {minimum}, got {out}.")
    return out


def _as_float(value: Any, key: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise FlowerConfigError(f"run config '{key}' must be a finite number, got {value!r}.")
    if positive and float(value) <= 0:
        raise FlowerConfigError(f"run config '{key}' must be > 0, got {value!r}.")
    return float(value)


def _as_choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    out = str(value).strip().lower()
    if out not in choices:
        raise FlowerConfigError(f"run config '{key}' must be one of {choices}, got {out!r}.")
    return out


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise FlowerConfigError(f"run config '{key}' must be true or false, got {value!r}.")


def load_algorithm_params(algorithm: str, params_file: str, overrides_json: str, root: Path | None = None) -> dict[str, Any]:
    """The algorithm's parameters: ``algorithm_params.common`` then
    ``algorithm_params.<algorithm>`` from ``params_file`` (if given), then the JSON
    object ``overrides_json`` on top."""
    params: dict[str, Any] = {}
    if params_file:
        from ..configuration import read_algorithm_params
        from ..core.protocol import ConfigurationError

        path = resolve_path(params_file, root)
        if not path.is_file():
            raise FlowerConfigError(
                f"params-file {path} does not exist; set run config params-file=\"\" to use only algorithm-params."
            )
        try:
            params = read_algorithm_params(path, algorithm)
        except ConfigurationError as exc:
            raise FlowerConfigError(str(exc)) from None
    try:
        overrides = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as exc:
        raise FlowerConfigError(
            f"run config 'algorithm-params' must be a JSON object, e.g. '{{\"lr\": 0.05}}': {exc}"
        ) from None
    if not isinstance(overrides, dict):
        raise FlowerConfigError(f"run config 'algorithm-params' must be a JSON object, got {overrides!r}.")
    params.update(overrides)
    return params


@dataclass(frozen=True)
class ServerRunConfig:
    """The ServerApp's view of the run config, validated (see ``RUN_CONFIG_DEFAULTS``)."""

    algorithm: str
    algorithm_params: dict[str, Any]
    num_rounds: int
    join_ratio: float
    seed: int
    device: str
    amp: str
    num_threads: int
    eval_every: int
    eval_batch_size: int
    evaluate_personalized: bool
    data_dir: Path
    output_dir: Path
    min_nodes: int
    node_wait_timeout: float
    round_timeout: float
    on_node_failure: str
    mlflow_tracking_uri: str | None
    mlflow_experiment: str
    secure_aggregation: str = "none"
    secagg_clipping_range: float = 8.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], root: Path | None = None) -> "ServerRunConfig":
        unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            logger.warning("Ignoring unknown run config keys %s (known: %s).", unknown, sorted(RUN_CONFIG_DEFAULTS))
        root = root or project_root()
        algorithm = str(_get(run_config, "algorithm"))
        policy = _as_choice(_get(run_config, "on-node-failure"), "on-node-failure", FAILURE_POLICIES)
        uri = str(_get(run_config, "mlflow-tracking-uri")).strip()
        if uri.lower() == "none":
            tracking: str | None = None
        elif uri:
            tracking = uri
        else:
            tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        cfg = cls(
            algorithm=algorithm,
            algorithm_params=load_algorithm_params(
                algorithm, str(_get(run_config, "params-file")), str(_get(run_config, "algorithm-params")), root
            ),
            num_rounds=_as_int(_get(run_config, "num-rounds"), "num-rounds", 1),
            join_ratio=_as_float(_get(run_config, "join-ratio"), "join-ratio"),
            seed=_as_int(_get(run_config, "seed"), "seed", 0),
            device=str(_get(run_config, "device")),
            amp=str(_get(run_config, "amp")),
            num_threads=_as_int(_get(run_config, "num-threads"), "num-threads", 0),
            eval_every=_as_int(_get(run_config, "eval-every"), "eval-every", 1),
            eval_batch_size=_as_int(_get(run_config, "eval-batch-size"), "eval-batch-size", 1),
            evaluate_personalized=_as_bool(_get(run_config, "evaluate-personalized"), "evaluate-personalized"),
            data_dir=resolve_path(str(_get(run_config, "data-dir")), root),
            output_dir=resolve_path(str(_get(run_config, "output-dir")), root),
            min_nodes=_as_int(_get(run_config, "min-nodes"), "min-nodes", 1),
            node_wait_timeout=_as_float(_get(run_config, "node-wait-timeout"), "node-wait-timeout"),
            round_timeout=_as_float(_get(run_config, "round-timeout"), "round-timeout"),
            on_node_failure=policy,
            mlflow_tracking_uri=tracking,
            mlflow_experiment=str(_get(run_config, "mlflow-experiment")),
            secure_aggregation=_as_choice(_get(run_config, "secure-aggregation"), "secure-aggregation", SECURE_AGGREGATION_MODES),
            secagg_clipping_range=_as_float(_get(run_config, "secagg-clipping-range"), "secagg-clipping-range"),
        )
        cfg.simulation_config()  # the core validates rounds, join ratio, device, amp, ...
        return cfg

    def simulation_config(self) -> "SimulationConfig":
        """The in-process runner's config for the same run (validates the shared fields)."""
        from ..core.simulation import SimulationConfig

        return SimulationConfig(
            num_rounds=self.num_rounds,
            join_ratio=self.join_ratio,
            seed=self.seed,
            device=self.device,
            amp=self.amp,
            eval_every=self.eval_every,
            eval_batch_size=self.eval_batch_size,
            evaluate_personalized=self.evaluate_personalized,
            num_threads=self.num_threads or None,
        )

    def as_params(self) -> dict[str, Any]:
        """Flat, MLflow-friendly view (``flower.<field>``; algorithm params separately)."""
        out = {f"flower.{k}": (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out.pop("flower.algorithm_params")
        out["flower.mlflow_tracking_uri"] = str(self.mlflow_tracking_uri)
        return out


# -- a node's identity and data --------------------------------------------------------
@dataclass(frozen=True)
class NodeIdentity:
    """Which hospital a SuperNode is and where its data lives (from its node config)."""

    partition_id: int
    num_partitions: int | None
    data_dir: Path
    num_threads: int = 0


def node_identity(node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> NodeIdentity:
    """Read ``partition-id`` (required), ``num-partitions``, ``data-dir`` (else the run
    config's, else the default) and ``num-threads`` from a SuperNode's node config."""
    if PARTITION_ID_KEY not in node_config:
        raise FlowerConfigError(
            f"This SuperNode has no '{PARTITION_ID_KEY}' in its node config (got {dict(node_config)}); start it with "
            f"--node-config \"{PARTITION_ID_KEY}=0 {NUM_PARTITIONS_KEY}=2\"."
        )
    pid = _as_int(node_config[PARTITION_ID_KEY], PARTITION_ID_KEY, 0)
    num = node_config.get(NUM_PARTITIONS_KEY)
    num_partitions = None if num is None else _as_int(num, NUM_PARTITIONS_KEY, 1)
    if num_partitions is not None and pid >= num_partitions:
        raise FlowerConfigError(f"node config {PARTITION_ID_KEY}={pid} is not below {NUM_PARTITIONS_KEY}={num_partitions}.")
    run_config = run_config or {}
    data_dir = node_config.get(DATA_DIR_KEY) or run_config.get(DATA_DIR_KEY) or RUN_CONFIG_DEFAULTS[DATA_DIR_KEY]
    threads = node_config.get(NUM_THREADS_KEY, run_config.get(NUM_THREADS_KEY, 0))
    return NodeIdentity(pid, num_partitions, resolve_path(str(data_dir)), _as_int(threads, NUM_THREADS_KEY, 0))


def client_partition_path(data_dir: Path, partition_id: int) -> Path:
    """``<data_dir>/clients/client_{partition_id:02d}.npz``, checked to exist."""
    path = Path(data_dir) / CLIENTS_SUBDIR / f"client_{int(partition_id):02d}.npz"
    if not path.is_file():
        present = sorted(p.name for p in (Path(data_dir) / CLIENTS_SUBDIR).glob("client_*.npz"))
        raise FlowerConfigError(
            f"Partition {partition_id}: {path} does not exist (present: {present or 'none'}). Run `make run` to "
            "build the partitions, or point the node's data-dir at them."
        )
    return path


def partition_sizes(data_dir: Path, partition_id: int) -> dict[str, int]:
    """Sample counts of a node's splits, read from the npz without decoding images."""
    with np.load(client_partition_path(data_dir, partition_id), allow_pickle=False) as arrays:
        missing = [f"{s}_labels" for s in ("train", "val", "test") if f"{s}_labels" not in arrays.files]
        if missing:
            raise FlowerConfigError(f"Partition {partition_id}: the npz lacks {missing}.")
        return {f"num-{s}": int(arrays[f"{s}_labels"].shape[0]) for s in ("train", "val", "test")}


#: Partitions loaded before the ClientApp processes are forked (``warm_superexec``), by
#: (path, size, mtime_ns, partition id): a changed file is read again, never served stale.
_PRELOADED: dict[tuple[str, int, int, int], "ClientData"] = {}


def _partition_key(data_dir: Path, partition_id: int) -> tuple[str, int, int, int]:
    path = client_partition_path(data_dir, partition_id)
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, int(partition_id)


def preload_client_data(data_dir: Path, partition_id: int) -> "ClientData":
    """Load a node's partition (on the CPU) into this process, for the ClientApp processes
    forked from it to share: each message then skips reading and decoding the npz."""
    data = load_client_data(data_dir, partition_id)
    _PRELOADED[_partition_key(data_dir, partition_id)] = data
    return data


def load_client_data(data_dir: Path, partition_id: int, device: "torch.device | str" = "cpu") -> "ClientData":
    """This node's ClientData (client id = partition id), via the same ``to_client_data``
    as the in-process runner, so both see identical tensors; the preloaded copy when this
    process was forked from a warm SuperExec and the file is unchanged."""
    from ..core.data import to_client_data
    from ..datasets.npz_dataset import load_npz

    if _PRELOADED and str(device) == "cpu":
        cached = _PRELOADED.get(_partition_key(data_dir, partition_id))
        if cached is not None:
            return cached
    return to_client_data(load_npz(client_partition_path(data_dir, partition_id)), client_id=partition_id, device=device)


def load_data_spec(data_dir: Path) -> "DataSpec":
    """Channels and classes from ``partition_manifest.json`` (``dataset.n_channels``,
    ``dataset.n_classes``), image size from ``global_test.npz`` (28 when absent)."""
    from ..core.protocol import DataSpec

    manifest_path = Path(data_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FlowerConfigError(f"{manifest_path} does not exist; the server reads channels and classes from it.")
    dataset = json.loads(manifest_path.read_text(encoding="utf-8")).get("dataset", {})
    try:
        in_channels, num_classes = int(dataset["n_channels"]), int(dataset["n_classes"])
    except (KeyError, TypeError, ValueError):
        raise FlowerConfigError(f"{manifest_path} lacks dataset.n_channels / dataset.n_classes.") from None
    image_size = 28
    test_path = Path(data_dir) / GLOBAL_TEST_FILE
    if test_path.is_file():
        with np.load(test_path, allow_pickle=False) as arrays:
            if "images" in arrays.files:
                image_size = int(arrays["images"].shape[1 if arrays["images"].ndim == 3 else 2])
    return DataSpec(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def spec_to_config(spec: "DataSpec") -> dict[str, int]:
    return {"in-channels": spec.in_channels, "num-classes": spec.num_classes, "image-size": spec.image_size}


def spec_from_config(config: Mapping[str, Any]) -> "DataSpec":
    from ..core.protocol import DataSpec

    return DataSpec(
        in_channels=int(config["in-channels"]), num_classes=int(config["num-classes"]), image_size=int(config["image-size"])
    )


def build_algorithm_for(name: str, params: Mapping[str, Any], spec: "DataSpec", device: "torch.device") -> "FederatedAlgorithm":
    """``core.algorithms.build_algorithm`` placed on ``device`` (as the in-process runner does)."""
    from ..core.algorithms import build_algorithm

    algorithm = build_algorithm(name, dict(params), spec)
    if getattr(algorithm, "pools_clients", False):
        raise FlowerConfigError(
            f"'{name}' pools every client's data in one place; it has no federated deployment. Use the in-process runner."
        )
    return algorithm.to(device)


# -- message schema (shared by the ClientApp and the ServerApp) ------------------------
#: RecordDict keys of the messages exchanged (see client_app / server_app docstrings).
CONFIG_KEY = "config"
PAYLOAD_KEY = "payload"
UPLOAD_KEY = "upload"
METRICS_KEY = "metrics"
GLOBAL_MODEL_KEY = "global-model"


def configure_logging() -> None:
    """Give this process's root logger a stderr handler (level ``$FEDMIC_LOG_LEVEL``,
    default INFO) unless it has one: ClientApp and ServerApp processes start bare, and
    Flower captures their stderr into the run's log stream."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=os.environ.get("FEDMIC_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Flower HTTP call
