"""Local-only: every hospital trains its own model on its own data; nothing is shared.

The lower reference. All clients start from the same initial weights (the run seed), so
that differences come from data, not initialisation. Each client keeps its model and
optimizer across rounds (a round is ``local_epochs`` more epochs of one continuous local
training run). Payloads and uploads are empty, so 0 bytes travel; there is no global
model (``global_model`` returns None) and the personalized model is the local model.
Training and the empty exchange are ``StatefulModelAlgorithm``'s (shared with centralized);
this class says only where the state lives.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientData, ClientState, Payload, ServerState
from .base import AlgorithmConfig, StatefulModelAlgorithm, register

__all__ = ["LocalOnly", "LocalOnlyConfig"]


@dataclass(frozen=True)
class LocalOnlyConfig(AlgorithmConfig):
    """Only the common hyper-parameters."""


@register("local_only")
class LocalOnly(StatefulModelAlgorithm):
    config_class = LocalOnlyConfig

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        return {}, {}

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        return self.training_state(seed)

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return None
