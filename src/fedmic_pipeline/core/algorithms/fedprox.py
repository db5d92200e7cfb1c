"""FedProx (Li et al. 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 locally.

The term covers the trainable parameters only (BatchNorm running statistics are not
optimised, so a proximal pull on them means nothing). mu = 0.01 by default, the value the
project's baselines use (methods.md section 3). With mu = 0 the term is skipped, which
makes FedProx exactly FedAvg. Aggregation, payloads and bytes are FedAvg's: the method is
FedAvg with another ``local_objective`` (``training.proximal_term``, shared with Ditto).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..protocol import ClientState, Payload, RoundContext
from ..training import ExtraLoss, proximal_term
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

    def local_objective(self, model: nn.Module, payload: Payload, state: ClientState, ctx: RoundContext) -> ExtraLoss | None:
        return proximal_term(model, payload, self.config.mu)  # type: ignore[attr-defined]

    def stacked_proximal_mu(self) -> float | None:
        return self.config.mu if type(self).local_objective is FedProx.local_objective else None  # type: ignore[attr-defined]
