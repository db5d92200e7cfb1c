"""The one protocol every federated algorithm follows.

A round is: the server sends a payload, each sampled client runs `client_update` on its
own data and private state and returns an upload, the server `aggregate`s the uploads
(weighted by sample counts) into the next payload. Payloads and uploads are flat dicts of
tensors, so the in-process simulation passes them in memory, a transport such as Flower
carries them as records, and `payload_nbytes` counts exactly what would travel. Anything
private (teacher, auxiliary matrices, control variates, local BN statistics, optimizer
state) lives in the client state, which never leaves the client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Payload = dict[str, torch.Tensor]
ClientState = dict[str, Any]
ServerState = dict[str, Any]
Metrics = dict[str, float]


class ConfigurationError(ValueError):
    """A parameter is invalid; raised before any training starts, naming the fix."""


def reject_unknown_keys(given: Mapping[str, Any], valid: Sequence[str], block: str) -> None:
    """A ConfigurationError naming the keys of parameter block ``block`` that nothing reads
    (a typo would otherwise silently keep the default) and the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigurationError(f"Unknown {block} parameter(s) {unknown}; valid: {', '.join(valid)}.")


@dataclass
class ClientData:
    """One hospital's tensors, resident on the compute device for the whole run.

    Images are float32 in [0, 1], shape (N, C, H, W); labels are int64, shape (N,).
    `train_is_synthetic` flags rows that came from the synthetic set (never in val/test).
    """

    client_id: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    device_id: int = 0
    train_is_synthetic: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


@dataclass(frozen=True)
class DataSpec:
    """What the models need to know about the dataset."""

    in_channels: int
    num_classes: int
    image_size: int = 28


@dataclass(frozen=True)
class RoundContext:
    """The facts of one round that every client and the server may use; built once per
    round by the round engine (``core/engine.py``) and never changed.

    ``sampled`` / ``num_clients``: who takes part this round out of how many (FedMIC's
    downlink deltas need everyone); ``total_train_samples``: the federation's training
    size (SCAFFOLD's control-variate weights). They are None where a caller (a unit test,
    a one-client helper) has no federation; methods then fall back to what they can see.
    ``amp_dtype``: the autocast dtype under ``use_amp`` (None = the device default).
    """

    round: int
    num_rounds: int
    seed: int
    device: torch.device
    use_amp: bool = False
    amp_dtype: torch.dtype | None = None
    sampled: tuple[int, ...] | None = None
    num_clients: int | None = None
    total_train_samples: int | None = None


def payload_nbytes(payload: Payload) -> int:
    """Exact bytes of the tensors in a payload (the wire format without framing)."""
    return int(sum(t.numel() * t.element_size() for t in payload.values()))


class FederatedAlgorithm(ABC):
    """Base class of all methods; see the module docstring for the round protocol."""

    name: str = "abstract"
    #: Where the algorithm builds its models; set by the runner through `to()` before
    #: `init_server`. Defaults to the CPU so an algorithm that never reads it still works.
    device: torch.device = torch.device("cpu")
    #: True only for the centralized reference: the runner pools every client's data into
    #: one in-process "client" instead of running a federation (see simulation.py).
    pools_clients: bool = False

    def to(self, device: torch.device | str) -> "FederatedAlgorithm":
        """Choose the device for models built afterwards (called by the runner, once)."""
        self.device = torch.device(device)
        return self

    @abstractmethod
    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        """Create the server state and the first payload broadcast to clients."""

    @abstractmethod
    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        """Create a client's private state (models, optimizers, aux matrices, ...)."""

    @abstractmethod
    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        """Train locally from `payload`; return the upload, the new private state, metrics."""

    def client_updates(
        self, jobs: Sequence[tuple[ClientState, ClientData, Payload]], ctx: RoundContext
    ) -> list[tuple[Payload, ClientState, Metrics]]:
        """Several clients' ``client_update`` of one round, in order, where one process holds
        them all (the in-process simulation). The default runs them one after another; a
        method whose local step can train many clients at once (``core/vectorized.py``)
        overrides it and falls back to this where it cannot."""
        return [self.client_update(state, data, payload, ctx) for state, data, payload in jobs]

    @abstractmethod
    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        """Combine (upload, n_train_samples) pairs into the next payload."""

    def payload_for(self, client_id: int, payload: Payload, server_state: ServerState) -> Payload:
        """What client ``client_id`` is sent this round: the broadcast ``payload`` for every
        method but one whose downlink depends on what the client already holds (FedMIC's
        compressed deltas, for a hospital that missed rounds). Called by the server for
        each client it sends to, just before sending."""
        return payload

    def after_server_pretraining(self, server_state: ServerState, payload: Payload) -> Payload:
        """The first broadcast once the server has trained its shared model in place before
        round 1 (``core/pretraining.py``): every payload entry that is a state of the shared
        model is taken from it again, the rest (control variates, versions) kept. A method
        holding more copies of the shared model overrides this to update them too."""
        model = self.global_model(server_state)
        if model is None:
            return payload
        state = model.state_dict()
        return {key: state[key].detach().clone() if key in state else value for key, value in payload.items()}

    @abstractmethod
    def global_model(self, server_state: ServerState) -> nn.Module | None:
        """The shared model evaluated on the global test set (None for local-only)."""

    @abstractmethod
    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        """The model a hospital would use, evaluated on its local test split."""

    def payload_bytes_dense(self, server_state: ServerState) -> int:
        """Bytes FedAvg would send for the same shared model (the compression baseline)."""
        model = self.global_model(server_state)
        return 0 if model is None else int(sum(p.numel() * p.element_size() for p in model.state_dict().values()))
