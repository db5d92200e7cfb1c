"""FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 locally.

The term covers the trainable parameters only (BatchNorm running statistics are not
optimised, so a proximal pull on them means nothing). mu = 0.01 by default, the value the
project's baselines use (methods.md section 3). With mu = 0 the term is skipped, which
makes FedProx exactly FedAvg. Aggregation, payloads and bytes are FedAvg's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext
from ..training import parameter_keys, payload_to_state, state_to_payload
from .base import AlgorithmConfig, register, require
from .fedavg import FedAvg

__all__ = ["FedProx", "FedProxConfig"]


@dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    mu: float = 0.01

    def validate(self) -> None:
        super().validate()
        require(self.mu >= 0.0, f"mu must be >= 0 (FedProx's proximal weight; 0.01 is the default), got {self.mu}.")


@register("fedprox")
class FedProx(FedAvg):
    config_class = FedProxConfig

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        model = self.scratch_model()
        payload_to_state(model, payload)
        mu = self.config.mu  # type: ignore[attr-defined]
        extra = None
        if mu > 0:
            names = parameter_keys(model)
            anchors = [payload[k].detach() for k in names]

            def proximal(m: nn.Module, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
                params = [p for p in m.parameters() if p.requires_grad]  # parameter_keys' order
                return 0.5 * mu * torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)]).sum()

            extra = proximal
        stats = self.train(model, data, ctx, extra_loss=extra)
        return state_to_payload(model), state, stats.as_metrics()
