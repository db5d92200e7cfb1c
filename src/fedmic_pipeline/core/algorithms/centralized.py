"""Centralized: one model trained on the pooled training data of all hospitals.

An upper reference, not a federated method: it assumes the data could be pooled. It sets
``pools_clients = True``, so ``run_simulation`` concatenates every client's splits into one
"client" (id ``POOLED_CLIENT_ID`` = -1) that takes part in every round, whatever the
join ratio. A round is ``local_epochs`` epochs over the pooled data, with one model and
one optimizer persisting across rounds (ordinary continuous training).

The data centre and the "server" are the same place, so the pooled client's state and the
server state hold the SAME model object and nothing travels: payloads and uploads are
empty and the bytes are 0 (the cost of moving the raw data is not a model-exchange cost
and is not counted). This in-process sharing is why centralized runs only in the
simulation, never over a transport. The global model and every hospital's personalized
model are that one model. Training and the empty exchange are ``StatefulModelAlgorithm``'s,
shared with local-only; only where the state lives differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientData, ClientState, ConfigurationError, Payload, ServerState
from .base import AlgorithmConfig, StatefulModelAlgorithm, register

__all__ = ["Centralized", "CentralizedConfig"]


@dataclass(frozen=True)
class CentralizedConfig(AlgorithmConfig):
    """Only the common hyper-parameters."""


@register("centralized")
class Centralized(StatefulModelAlgorithm):
    config_class = CentralizedConfig
    pools_clients = True

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        self._shared: ServerState = self.training_state(seed)
        return self._shared, {}

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        shared = getattr(self, "_shared", None)
        if shared is None:
            raise ConfigurationError("centralized: init_server must run before init_client (in-process only).")
        return shared  # the same dict: data centre == server

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["model"]
