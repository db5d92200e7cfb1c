"""MOON (Li, He, Song, CVPR 2021): model-contrastive federated learning.

FedAvg plus a local contrastive term that pulls the local representation z towards the
global model's z_glob (positive) and away from the client's previous local model's
z_prev (negative):

    l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) )
    loss  = CE + mu * l_con,         sim = cosine similarity, mu = 1, tau = 0.5

Payloads, aggregation (sample-weighted) and bytes are FedAvg's: the method is FedAvg with
the contrastive term as its ``local_objective`` and, in ``after_local_update``, the
trained model kept as the next round's negative.

Interpretations recorded here:

* ``moon.representation``: z is the model's ``features(x)`` (the student's dense
  ``head`` after the conv body plays the role of MOON's projection head), so MOON runs on
  exactly the same network as every other baseline; no extra head is added.
* ``moon.first_round``: a client with no previous local model (its first participation)
  has no negative; the contrastive term is skipped there (with z_prev = z_glob it would be
  the constant log 2 anyway). The previous model is the client's model *after* its last
  local training (one model, MOON's buffer size 1), kept in the client state.
* ``moon.reference_mode``: the frozen global and previous models compute their
  representations without gradients and with batch statistics (train-mode BN, on
  throw-away work copies), like the local model they are compared to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..protocol import ClientData, ClientState, DataSpec, Metrics, Payload, RoundContext
from ..training import ExtraLoss, TrainStats, payload_to_state
from .base import AlgorithmConfig, register, require
from .fedavg import FedAvg

__all__ = ["Moon", "MoonConfig", "model_contrastive_loss"]


@dataclass(frozen=True)
class MoonConfig(AlgorithmConfig):
    mu: float = 1.0
    tau: float = 0.5

    def validate(self) -> None:
        super().validate()
        require(math.isfinite(self.mu) and self.mu >= 0, f"mu must be >= 0 (MOON's contrastive weight; the paper uses 1), got {self.mu}.")
        require(math.isfinite(self.tau) and self.tau > 0, f"tau must be > 0 (MOON's temperature; the paper uses 0.5), got {self.tau}.")


def model_contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over the batch of -log softmax([sim(z,z_glob), sim(z,z_prev)] / tau)[0]."""
    pos = F.cosine_similarity(z, z_glob, dim=1)
    neg = F.cosine_similarity(z, z_prev, dim=1)
    logits = torch.stack([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


@register("moon")
class Moon(FedAvg):
    config_class = MoonConfig

    def __init__(self, config: MoonConfig | None = None, spec: DataSpec | None = None) -> None:
        super().__init__(config, spec)
        self._global_ref: nn.Module | None = None
        self._prev_ref: nn.Module | None = None

    def _ref(self, attr: str) -> nn.Module:
        model = getattr(self, attr)
        if model is None or next(model.parameters()).device != self.device:
            model = self.new_model(seed=0)
            model.requires_grad_(False)
            setattr(self, attr, model)
        return model

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        return {"previous": None}  # the client's last local model (state_dict), private

    def local_objective(self, model: nn.Module, payload: Payload, state: ClientState, ctx: RoundContext) -> ExtraLoss | None:
        c: MoonConfig = self.config  # type: ignore[assignment]
        previous = state.get("previous")
        if c.mu <= 0 or previous is None:
            return None
        glob = self._ref("_global_ref")
        prev = self._ref("_prev_ref")
        payload_to_state(glob, payload)
        payload_to_state(prev, previous)
        glob.train()
        prev.train()

        def contrastive(m: nn.Module, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
            assert h is not None, "MOON needs a model with features()/classifier"
            with torch.no_grad():
                z_glob = glob.features(x)
                z_prev = prev.features(x)
            return c.mu * model_contrastive_loss(h.float(), z_glob.float(), z_prev.float(), c.tau)

        return contrastive

    def after_local_update(
        self, state: ClientState, data: ClientData, payload: Payload, upload: Payload, stats: TrainStats, ctx: RoundContext
    ) -> Metrics:
        state["previous"] = {k: v.clone() for k, v in upload.items()}
        return {**stats.as_metrics(), "contrastive": stats.objective - stats.loss}
