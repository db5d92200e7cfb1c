"""FedAvg (McMahan et al. 2017): local SGD from the global model, sample-weighted mean.

Round: the server broadcasts the full state_dict of the global model (parameters AND
BatchNorm running statistics and counters, so every client starts from the same
normalisation); each sampled client loads it into a work model, trains ``local_epochs``
with a fresh optimizer, and uploads its full state_dict; the server replaces the global
state by the mean of the uploads weighted by the clients' training-set sizes (see
``training.weighted_average`` for the integer BN counters).

The personalized model of FedAvg is the global model itself (FedAvg has no local part).
Clients are stateless, so ``init_client`` returns an empty dict.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext, ServerState
from ..training import payload_to_state, state_to_payload, weighted_average
from .base import AlgorithmConfig, BaseAlgorithm, register

__all__ = ["FedAvg", "FedAvgConfig"]


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has only the common hyper-parameters."""


@register("fedavg")
class FedAvg(BaseAlgorithm):
    config_class = FedAvgConfig

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        model = self.new_model(seed)
        return {"model": model}, state_to_payload(model)

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        return {}

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        model = self.scratch_model()
        payload_to_state(model, payload)
        stats = self.train(model, data, ctx)
        return state_to_payload(model), state, stats.as_metrics()

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        mean = weighted_average(uploads)
        payload_to_state(server_state["model"], mean)
        return mean, server_state

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["model"]

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return server_state["model"]
