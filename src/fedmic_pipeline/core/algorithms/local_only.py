"""Local-only: every hospital trains its own model on its own data; nothing is shared.

The lower reference. All clients start from the same initial weights (the run seed), so
that differences come from data, not initialisation. Each client keeps its model and
optimizer across rounds (a round is ``local_epochs`` more epochs of one continuous local
training run). Payloads and uploads are empty, so 0 bytes travel; there is no global
model (``global_model`` returns None) and the personalized model is the local model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext, ServerState
from .base import AlgorithmConfig, BaseAlgorithm, register

__all__ = ["LocalOnly", "LocalOnlyConfig"]


@dataclass(frozen=True)
class LocalOnlyConfig(AlgorithmConfig):
    """Only the common hyper-parameters."""


@register("local_only")
class LocalOnly(BaseAlgorithm):
    config_class = LocalOnlyConfig

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        return {}, {}

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        model = self.new_model(seed)
        return {"model": model, "optimizer": self.make_optimizer(model.parameters())}

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
        return None

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return state["model"]
