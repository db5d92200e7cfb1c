"""Resumable federated runs: what a checkpoint holds, how it is fingerprinted and checked.

Why: 20+ rounds of FedMIC take tens of minutes on a shared CPU. A crash, a killed job or
a pre-empted machine should cost at most ``checkpoint_every`` rounds, and the resumed run
must end *bit-identical* to an uninterrupted one (same history, same models): only then
can a resumed run stand in for the uninterrupted one in DVC and MLflow.

What a checkpoint holds (``build_checkpoint``) -- everything the next round reads:

* the payload the server broadcasts next and the server state (global model, SCAFFOLD's
  control variate, FedMIC's version counter and downlink view, ...);
* every client's private state: models, optimizers with their buffers (FedMIC's
  teacher optimizer persists across rounds), control variates, error-feedback residuals;
* the history so far (the metrics table of the finished rounds);
* the torch / numpy / python global RNG states. The runner itself never reads a global
  RNG (client sampling and batch orders are seeded from (seed, round, client), see
  simulation.py), but a model or a future algorithm may (dropout), so they are kept;
* the wall-clock seconds spent so far, so ``wall_time_s`` stays the run's total.

Why a pickle (``torch.save`` / ``torch.load(weights_only=False)``): client states are
arbitrary Python objects -- modules, optimizers whose parameter groups reference those
very modules' parameters, ``ErrorFeedback`` objects. One ``torch.save`` of the whole dict
keeps those shared references (pickle memo) and tensor strides (channels-last weights,
which change float results), which per-algorithm ``state_dict`` code would have to
rebuild by hand for each of ten methods. A checkpoint is a local, private file that the
run itself wrote, so unpickling it is acceptable; never load one from an untrusted
source, because unpickling can execute code.

The fingerprint (``run_fingerprint``) is what must not change between the interrupted and
the resumed run: the algorithm and its resolved hyper-parameters, the runner settings
(all but the progress bar), the data spec, a sha256 of every client's tensors and of the
global test set (so a re-drawn partition or another synthetic set is caught even when all
parameters agree), plus whatever the caller adds (``extra``, e.g. the dataset flag).
``check_checkpoint`` compares it key by key and names every mismatch.

No file paths here: the core builds, checks and (de)serialises checkpoint *dicts*; the
Kedro layer decides where they live and writes them atomically.

An algorithm must keep all mutable run state in its server and client states (the
protocol's rule); attributes of the algorithm object itself are not checkpointed. Work
buffers such as ``BaseAlgorithm.scratch_model`` are overwritten before every use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import resolve_amp, resolve_device
from .protocol import ClientData, ClientState, ConfigurationError, DataSpec, FederatedAlgorithm, Payload, ServerState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KIND",
    "RUNTIME_ONLY_KEYS",
    "CheckpointError",
    "CheckpointMismatchError",
    "build_checkpoint",
    "capture_rng_state",
    "check_checkpoint",
    "data_digest",
    "deserialize_checkpoint",
    "fingerprint_digest",
    "restore_rng_state",
    "run_fingerprint",
    "serialize_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "fedmic_pipeline.simulation_checkpoint"
#: Bumped whenever the layout below changes; older files are refused with a clear error.
CHECKPOINT_FORMAT = 3
#: SimulationConfig fields that cannot change any result, left out of the fingerprint.
RUNTIME_ONLY_KEYS: tuple[str, ...] = ("progress",)
_MAX_SHOWN = 120  # characters of a value shown in a mismatch message


class CheckpointError(ConfigurationError):
    """A checkpoint cannot be used: not a checkpoint, another format, or inconsistent."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with other parameters or data.

    ``mismatches`` lists the dotted fingerprint keys that differ (e.g. ``algorithm.lr``,
    ``simulation.num_rounds``, ``data.client_03``).
    """

    def __init__(self, message: str, mismatches: Sequence[str]) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches)


# ---------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-comparable builtins (tuples -> lists, unknown objects -> str, sorted keys)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _hash_tensor(h: Any, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        h.update(b"none")
        return
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.reshape(-1).view(np.uint8))  # the raw bytes, no copy; empty splits hash their shape only


def data_digest(
    clients: Sequence[ClientData], global_test: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, str]:
    """sha256 of each client's tensors (``client_<id>``) and of the global test set.

    Hashes the tensors the run actually trains on -- after synthetic or augmented rows were
    appended -- so any change of the data is caught, whatever produced it. Per client, so
    a mismatch message names the hospital whose data changed.
    """
    out: dict[str, str] = {}
    for client in sorted(clients, key=lambda c: c.client_id):
        h = hashlib.sha256(f"{client.client_id}:{client.device_id}".encode())
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "train_is_synthetic"):
            h.update(name.encode())
            _hash_tensor(h, getattr(client, name))
        out[f"client_{client.client_id:02d}"] = h.hexdigest()
    if global_test is not None:
        h = hashlib.sha256(b"global_test")
        _hash_tensor(h, global_test[0])
        _hash_tensor(h, global_test[1])
        out["global_test"] = h.hexdigest()
    return out


def _algorithm_params(algorithm: FederatedAlgorithm) -> dict[str, Any]:
    describe = getattr(algorithm, "describe", None)
    if callable(describe):
        return dict(describe())
    config = getattr(algorithm, "config", None)
    params = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {"algorithm": algorithm.name, **params}


def run_fingerprint(
    algorithm: FederatedAlgorithm,
    config: Any,
    spec: DataSpec,
    clients: Sequence[ClientData],
    global_test: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run (see the module docstring).

    ``config`` is the run's ``SimulationConfig``; the resolved device and AMP mode are
    added, because 'auto' may mean CUDA on one machine and the CPU on another.
    """
    simulation = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_ONLY_KEYS}
    device = resolve_device(config.device)
    simulation["resolved_device"] = device.type
    simulation["resolved_amp"] = resolve_amp(config.amp, device)
    return _plain(
        {
            "algorithm": _algorithm_params(algorithm),
            "simulation": simulation,
            "data_spec": dataclasses.asdict(spec),
            "data": data_digest(clients, global_test),
            "extra": dict(extra or {}),
        }
    )


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """One sha256 of a fingerprint (for logs and file listings)."""
    return hashlib.sha256(json.dumps(_plain(fingerprint), sort_keys=True).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


_ABSENT = object()  # a key one fingerprint has and the other lacks


def _show(value: Any) -> str:
    text = "<absent>" if value is _ABSENT else repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


# ---------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The process-wide RNG states (torch CPU, CUDA when initialised, numpy, python)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what ``capture_rng_state`` saw (CUDA only when the device count matches)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning("The checkpoint holds CUDA RNG states for %d device(s); not restored here.", len(cuda))


# ---------------------------------------------------------------------------------------
# Build, check, (de)serialise
# ---------------------------------------------------------------------------------------


def build_checkpoint(
    *,
    fingerprint: Mapping[str, Any],
    rounds_completed: int,
    num_rounds: int,
    algorithm_name: str,
    payload: Payload,
    server_state: ServerState,
    client_states: Mapping[int, ClientState],
    history: Sequence[Mapping[str, Any]],
    elapsed_s: float,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict after ``rounds_completed`` rounds (``selection``: the
    ``ValidationSelector``'s state, so a resumed run selects as an uninterrupted one).

    It references the run's live objects (models, optimizers): serialise it at once
    (``serialize_checkpoint``) -- the next round changes them in place.
    """
    if len(history) != rounds_completed:
        raise CheckpointError(f"A checkpoint after round {rounds_completed} needs as many history records, got {len(history)}.")
    return {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "algorithm": algorithm_name,
        "rounds_completed": int(rounds_completed),
        "num_rounds": int(num_rounds),
        "fingerprint": dict(fingerprint),
        "fingerprint_sha256": fingerprint_digest(fingerprint),
        "payload": payload,
        "server_state": server_state,
        "client_states": dict(client_states),
        "history": list(history),
        "selection": dict(selection or {}),
        "rng": capture_rng_state(),
        "elapsed_s": float(elapsed_s),
        "torch_version": torch.__version__,
    }


def check_checkpoint(
    checkpoint: Mapping[str, Any], fingerprint: Mapping[str, Any], client_ids: Sequence[int] | None = None
) -> None:
    """Raise unless ``checkpoint`` can continue the run described by ``fingerprint``.

    Refuses another file kind or format (``CheckpointError``) and any fingerprint key that
    differs (``CheckpointMismatchError`` naming each key with both values), so a resume
    with other parameters or data fails before any round instead of silently mixing runs.
    """
    if not isinstance(checkpoint, Mapping) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError("This is not a fedmic_pipeline training checkpoint (no 'kind' marker).")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"Checkpoint format {checkpoint.get('format')!r} is not the supported {CHECKPOINT_FORMAT}: it was written by "
            "another version of this project. Start the run afresh (training.resume: false)."
        )
    old, new = _flatten(checkpoint["fingerprint"]), _flatten(_plain(fingerprint))
    differing = sorted(k for k in set(old) | set(new) if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    if differing:
        lines = [f"  {k}: checkpoint {_show(old.get(k, _ABSENT))}, now {_show(new.get(k, _ABSENT))}" for k in differing]
        raise CheckpointMismatchError(
            f"The checkpoint ({checkpoint.get('algorithm')}, {checkpoint.get('rounds_completed')} of "
            f"{checkpoint.get('num_rounds')} rounds done) was written by a run with other settings or data; "
            f"{len(differing)} difference(s):\n" + "\n".join(lines) + "\nResume with the original parameters and data, "
            "or start afresh without resuming (training.resume: false), which overwrites the checkpoint.",
            differing,
        )
    done, history = int(checkpoint["rounds_completed"]), checkpoint["history"]
    if len(history) != done or not 0 <= done <= int(checkpoint["num_rounds"]):
        raise CheckpointError(f"Inconsistent checkpoint: {done} rounds completed but {len(history)} history records.")
    if client_ids is not None and sorted(checkpoint["client_states"]) != sorted(client_ids):
        raise CheckpointError(
            f"The checkpoint holds states of clients {sorted(checkpoint['client_states'])}, this run has {sorted(client_ids)}."
        )
    if checkpoint.get("torch_version") != torch.__version__:
        logger.warning(
            "The checkpoint was written with torch %s, this is %s: the resumed rounds may differ in the last bits.",
            checkpoint.get("torch_version"), torch.__version__,
        )  # fmt: skip


#: First line of a checkpoint file; the second is the sha256 of the rest (``torch.save`` bytes).
_SEALED = b"fedmic-checkpoint sha256\n"


def serialize_checkpoint(checkpoint: Mapping[str, Any]) -> bytes:
    """The checkpoint as bytes: ``torch.save`` (a pickle, see the module docstring) sealed
    with its sha256, so a truncated or altered file is refused instead of resuming from
    silently different weights (the zip inside does not checksum uncompressed tensors)."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    body = buffer.getvalue()
    return _SEALED + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def deserialize_checkpoint(data: bytes, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Bytes from ``serialize_checkpoint`` back to a checkpoint dict.

    ``weights_only=False`` because the file holds modules and optimizers; only load files
    this project wrote itself (unpickling can execute code).
    """
    if not data.startswith(_SEALED):
        raise CheckpointError(
            "This is not a sealed fedmic_pipeline checkpoint (an older format, or another file): delete it and start "
            "afresh (training.resume=false)."
        )
    digest, body = data[len(_SEALED) : len(_SEALED) + 64].decode("ascii", "replace"), data[len(_SEALED) + 65 :]
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(
            "The checkpoint's bytes do not match the sha256 it was sealed with: it is truncated or was altered after "
            "it was written. Delete it and start afresh (training.resume=false)."
        )
    try:
        checkpoint = torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say what it is and what to do
        raise CheckpointError(
            f"The checkpoint cannot be read ({type(exc).__name__}: {exc}); delete it and start afresh."
        ) from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError("This is not a fedmic_pipeline training checkpoint (no 'kind' marker).")
    return checkpoint
