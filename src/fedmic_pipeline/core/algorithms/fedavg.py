"""FedAvg (McMahan et al. 2017): local SGD from the global model, sample-weighted mean.

Round: the server broadcasts the full state_dict of the global model (parameters AND
BatchNorm running statistics and counters, so every client starts from the same
normalisation); each sampled client loads it into a work model, trains ``local_epochs``
with a fresh optimizer, and uploads its full state_dict; the server replaces the global
state by the mean of the uploads weighted by the clients' training-set sizes (see
``training.weighted_average`` for the integer BN counters).

The personalized model of FedAvg is the global model itself (FedAvg has no local part).
Clients are stateless, so ``init_client`` returns an empty dict.

Why two classes: ``FedAvgExchange`` is that round for any model family (the conditional
generator of ``synthesis/federated.py`` uses it too) and leaves the local update open;
``FedAvg`` fills it with the classifier's ``train``. Its family (FedProx, MOON, Ditto)
states only what differs, through two hooks, in the style of FLamby's and pfl-research's
FedProx: ``local_objective`` (the term added to the local cross-entropy) and
``after_local_update`` (the client's bookkeeping and extra work once the upload is
taken, e.g. MOON's previous model, Ditto's personal task).

Client-level differential privacy (a ``dp`` block, ``core/privacy.py``) is one wrapper
around that round, so FedAvg, FedProx, MOON and Ditto get it unchanged: after the local
update the client uploads its clipped (and, under ``placement: client``, noised) update
W_local - W_global over the floating entries instead of its state, and the server adds
the uniform mean (``ClientLevelDP.combine``, noised once under ``placement: server``) to
the global model, whose integer BatchNorm counters stay the server's. The hooks see the
raw trained model, so MOON's previous model and Ditto's personal task are untouched.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..privacy import ClientLevelDP, nonnegative_variances
from ..protocol import ClientData, ClientState, FederatedAlgorithm, Metrics, Payload, RoundContext, ServerState
from ..training import (
    ExtraLoss,
    TrainStats,
    apply_delta,
    autocast,
    model_delta,
    payload_to_state,
    state_to_payload,
    weighted_average,
)
from ..vectorized import can_stack, train_stacked
from .base import AlgorithmConfig, BaseAlgorithm, register

__all__ = ["FedAvg", "FedAvgConfig", "FedAvgExchange"]


class FedAvgExchange(FederatedAlgorithm):
    """FedAvg's round for any model family; a subclass gives the models and the local update."""

    #: Client-level DP of the round (``core/privacy.py``); None = plain FedAvg.
    privacy: ClientLevelDP | None = None

    @abstractmethod
    def new_model(self, seed: int) -> nn.Module:
        """A freshly initialised model on ``self.device`` (the server's, at ``init_server``)."""

    @abstractmethod
    def scratch_model(self) -> nn.Module:
        """A reusable work model on ``self.device``; every entry is overwritten by the payload."""

    @abstractmethod
    def local_update(
        self, model: nn.Module, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        """Train ``model`` (holding ``payload``) on the client; return the upload, state, metrics."""

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
        upload, state, metrics = self.local_update(model, state, data, payload, ctx)
        if self.privacy is None:
            return upload, state, metrics
        update, dp_metrics = self.privacy.privatize(model_delta(upload, payload), ctx, data.client_id)
        return update, state, {**metrics, **dp_metrics}

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        if self.privacy is not None:
            return self.aggregate_private(server_state, uploads, ctx)
        mean = weighted_average(uploads)
        payload_to_state(server_state["model"], mean)
        return mean, server_state

    def aggregate_private(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        """The DP round's server side: the global model plus the uniform mean of the clipped
        updates (noised by ``combine`` under the server placement), the round's budget kept
        in ``server_state['privacy']``."""
        assert self.privacy is not None
        model = server_state["model"]
        current = state_to_payload(model)
        keys = [k for k, v in current.items() if v.is_floating_point()]
        mean = self.privacy.combine([upload for upload, _ in uploads], ctx, keys)
        new_state = nonnegative_variances(apply_delta(current, mean))
        payload_to_state(model, new_state)
        server_state["privacy"] = self.privacy.spent(ctx, server_state.get("privacy")).as_dict()
        return new_state, server_state

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["model"]

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return server_state["model"]


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has only the common hyper-parameters."""


@register("fedavg")
class FedAvg(BaseAlgorithm, FedAvgExchange):
    config_class = FedAvgConfig
    supports_dp = True

    def local_update(
        self, model: nn.Module, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        stats = self.train(model, data, ctx, extra_loss=self.local_objective(model, payload, state, ctx))
        upload = state_to_payload(model)
        return upload, state, self.after_local_update(state, data, payload, upload, stats, ctx)

    def local_objective(self, model: nn.Module, payload: Payload, state: ClientState, ctx: RoundContext) -> ExtraLoss | None:
        """The term added to the cross-entropy of this local update, built before training
        ``model`` (which holds ``payload``); FedAvg adds none."""
        return None

    def after_local_update(
        self, state: ClientState, data: ClientData, payload: Payload, upload: Payload, stats: TrainStats, ctx: RoundContext
    ) -> Metrics:
        """The client's work once its ``upload`` is taken (``state`` may be updated in place);
        returns the round's metrics, FedAvg's being the local training's."""
        return stats.as_metrics()

    def stacked_proximal_mu(self) -> float | None:
        """The proximal weight of the local objective when ``train_stacked`` can compute it
        (FedAvg: none, 0), or None when a subclass's objective is something else (MOON)."""
        return 0.0 if type(self).local_objective is FedAvg.local_objective else None

    def client_updates(
        self, jobs: Sequence[tuple[ClientState, ClientData, Payload]], ctx: RoundContext
    ) -> list[tuple[Payload, ClientState, Metrics]]:
        """The round's local updates trained together (``core/vectorized.train_stacked``),
        each then recalibrated, uploaded and finished by ``after_local_update`` exactly as
        ``local_update`` does; one after another where that cannot apply (another optimizer
        or model, an overridden local update, DP, a single client)."""
        mu = self.stacked_proximal_mu()
        batchable = (
            len(jobs) > 1
            and mu is not None
            and self.privacy is None
            and type(self).local_update is FedAvg.local_update
            and type(self).client_update is FedAvgExchange.client_update
            and self.config.optimizer == "sgd"
            and can_stack(self.scratch_model())
        )
        if not batchable:
            return super().client_updates(jobs, ctx)
        models = self._work_models(len(jobs))
        for model, (_, _, payload) in zip(models, jobs, strict=True):
            payload_to_state(model, payload)
        c = self.config
        datas = [data for _, data, _ in jobs]
        all_stats = train_stacked(
            models,
            datas,
            epochs=c.local_epochs,
            batch_size=c.batch_size,
            lr=self.round_lr(ctx),
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            generators=[self.client_generator(ctx, d.client_id) for d in datas],
            logit_offsets=[self.logit_offset(d) for d in datas],
            proximal_mu=mu,
            autocast=lambda: autocast(ctx),
        )
        results = []
        for model, (state, data, payload), stats in zip(models, jobs, all_stats, strict=True):
            self.recalibrate(model, data)
            upload = state_to_payload(model)
            results.append((upload, state, self.after_local_update(state, data, payload, upload, stats, ctx)))
        return results

    def _work_models(self, count: int) -> list[nn.Module]:
        """``count`` reusable work models (every entry is overwritten from a payload)."""
        pool = getattr(self, "_stack_pool", [])
        pool = [m for m in pool if next(m.parameters()).device == self.device]
        pool.extend(self.new_model(seed=0) for _ in range(count - len(pool)))
        self._stack_pool = pool
        return pool[:count]
