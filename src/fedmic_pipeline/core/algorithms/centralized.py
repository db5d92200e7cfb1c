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
model are that one model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientData, ClientState, ConfigurationError, Metrics, Payload, RoundContext, ServerState
from .base import AlgorithmConfig, BaseAlgorithm, register

__all__ = ["Centralized", "CentralizedConfig"]


@dataclass(frozen=True)
class CentralizedConfig(AlgorithmConfig):
    """Only the common hyper-parameters."""


@register("centralized")
class Centralized(BaseAlgorithm):
    config_class = CentralizedConfig
    pools_clients = True

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        model = self.new_model(seed)
        self._shared: ServerState = {"model": model, "optimizer": self.make_optimizer(model.parameters())}
        return self._shared, {}

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        shared = getattr(self, "_shared", None)
        if shared is None:
            raise ConfigurationError("centralized: init_server must run before init_client (in-process only).")
        return shared  # the same dict: data centre == server

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        stats = self.train(state["model"], data, ctx, optimizer=state["optimizer"])
        return {}, state, stats.as_metrics()

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        return {}, server_state

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["model"]

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return state["model"]
