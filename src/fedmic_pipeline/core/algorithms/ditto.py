"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): fair and robust personalization.

Each round a sampled client does two things from the received global model w:

1. the *global* task, exactly FedAvg's local training from w (inherited unchanged); the
   result is uploaded and averaged (sample-weighted), so bytes are FedAvg's;
2. the *personal* task (FedAvg's ``after_local_update`` hook): its private model v_k is
   trained for ``personal_epochs`` on CE(v_k) + lambda/2 ||v_k - w||^2 (lambda = 0.1),
   i.e. pulled towards the global model it received this round. v_k never leaves the
   client and is its personalized model; its metrics are those prefixed ``personal_``.

Interpretations recorded here:

* ``ditto.personal_init``: v_k starts as a copy of the first global model the client
  receives (Ditto's v_k^0 = w^0); until then the personalized model is the global model.
* ``ditto.prox_scope``: the proximal term covers trainable parameters only (BN running
  statistics are not optimised); v_k's BN statistics are its own.
* ``ditto.personal_optimizer``: the personal model's optimizer persists across rounds
  (v_k is one continuous local training run, as in local-only); the global task's
  optimizer is fresh every round (FedAvg).
* ``ditto.personal_batches``: the personal task draws its batch order from a separate
  seeded stream (seed, round, client, tag), so the two tasks do not see identical batch
  sequences, and ``personal_epochs`` defaults to ``local_epochs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..data import round_generator
from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext, ServerState
from ..training import TrainStats, payload_to_state, proximal_term, set_lr, train_local
from .base import AlgorithmConfig, register, require
from .fedavg import FedAvg

__all__ = ["Ditto", "DittoConfig"]

_PERSONAL_BATCHES = 0xD177


@dataclass(frozen=True)
class DittoConfig(AlgorithmConfig):
    lam: float = 0.1
    personal_epochs: int = 0  # 0 -> local_epochs

    def validate(self) -> None:
        super().validate()
        require(math.isfinite(self.lam) and self.lam >= 0, f"lam must be >= 0 (Ditto's lambda; the project uses 0.1), got {self.lam}.")
        require(self.personal_epochs >= 0, f"personal_epochs must be >= 0 (0 = local_epochs), got {self.personal_epochs}.")


@register("ditto")
class Ditto(FedAvg):
    config_class = DittoConfig

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        return {"personal": None, "optimizer": None}

    def after_local_update(
        self, state: ClientState, data: ClientData, payload: Payload, upload: Payload, stats: TrainStats, ctx: RoundContext
    ) -> Metrics:
        """The personal task, once the global task (FedAvg's local update) gave ``upload``."""
        c: DittoConfig = self.config  # type: ignore[assignment]
        personal: nn.Module | None = state.get("personal")
        if personal is None:
            personal = self.new_model(seed=0)
            payload_to_state(personal, payload)
            state["personal"] = personal
            state["optimizer"] = self.make_optimizer(personal.parameters())
        set_lr(state["optimizer"], self.round_lr(ctx))
        p_stats = train_local(
            personal,
            data,
            epochs=c.personal_epochs or c.local_epochs,
            batch_size=c.batch_size,
            optimizer=state["optimizer"],
            generator=round_generator(ctx.seed, ctx.round, data.client_id, _PERSONAL_BATCHES),
            ctx=ctx,
            extra_loss=proximal_term(personal, payload, c.lam),
            logit_offset=self.logit_offset(data),
        )
        self.recalibrate(personal, data)
        return {**stats.as_metrics(), **p_stats.as_metrics(prefix="personal_")}

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        personal = state.get("personal")
        return personal if personal is not None else server_state["model"]
