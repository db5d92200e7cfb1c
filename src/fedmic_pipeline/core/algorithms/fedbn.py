"""FedBN (Li et al., ICLR 2021): FedAvg with local normalization layers.

Every state_dict entry of a normalization layer -- BatchNorm weight and bias, running mean
and variance, the batch counter (and GroupNorm/LayerNorm/InstanceNorm affine parameters,
were a model to use them) -- stays on its client: it never travels in either direction
and so is not counted in bytes. All other entries are averaged as in FedAvg, weighted by
the clients' training-set sizes. The personalized model of a hospital is the global
non-normalization weights with its own normalization layers; this is how FedBN handles
feature shift between hospitals (different scanners).

Interpretations recorded here:

* ``fedbn.global_model``: FedBN has no meaningful single global model: its normalization
  layers never leave the clients, so the server's copy would normalise with its initial
  statistics. ``global_model`` therefore returns None (as local-only), and only the
  personalized models are evaluated. ``payload_bytes_dense`` still reports FedAvg's full
  state_dict size, so the bytes saved by keeping BN local are visible.
* ``fedbn.init``: a client's normalization layers start from the shared seeded
  initialisation (BN: weight 1, bias 0, mean 0, var 1) and are updated only locally.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import state_nbytes
from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext, ServerState
from ..training import payload_to_state, state_to_payload, weighted_average
from .base import AlgorithmConfig, register
from .fedavg import FedAvg

__all__ = ["NORM_LAYERS", "FedBN", "FedBNConfig", "norm_keys"]

#: Module types whose every state_dict entry stays local.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def norm_keys(model: nn.Module) -> list[str]:
    """The state_dict keys that belong to normalization layers (parameters and buffers)."""
    keys: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            prefix = f"{module_name}." if module_name else ""
            keys.extend(prefix + k for k in module.state_dict())
    return keys


@dataclass(frozen=True)
class FedBNConfig(AlgorithmConfig):
    """Only the common hyper-parameters."""


@register("fedbn")
class FedBN(FedAvg):
    config_class = FedBNConfig
    #: Its own aggregate (shared keys only, local norms) does not take the DP round yet.
    supports_dp = False

    def _split_keys(self, model: nn.Module) -> tuple[list[str], list[str]]:
        local = set(norm_keys(model))
        shared = [k for k in model.state_dict() if k not in local]
        return shared, [k for k in model.state_dict() if k in local]

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        model = self.new_model(seed)
        shared, _ = self._split_keys(model)
        return {"model": model, "shared_keys": shared}, state_to_payload(model, shared)

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        model = self.new_model(seed)
        _, local = self._split_keys(model)
        return {"norm": state_to_payload(model, local)}

    def local_update(
        self, model: nn.Module, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        """FedAvg's local training over the received weights with this client's own
        normalization layers; only the non-normalization entries are uploaded."""
        payload_to_state(model, state["norm"])
        stats = self.train(model, data, ctx)
        shared, local = self._split_keys(model)
        state["norm"] = state_to_payload(model, local)
        return state_to_payload(model, shared), state, stats.as_metrics()

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        mean = weighted_average(uploads, keys=server_state["shared_keys"])
        payload_to_state(server_state["model"], mean)
        return mean, server_state

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return None

    def payload_bytes_dense(self, server_state: ServerState) -> int:
        return state_nbytes(server_state["model"])

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        """A model with the global shared weights and this client's normalization layers.

        Built afresh per call (the scratch model is overwritten by training), so each
        returned model stays valid while others are built.
        """
        model = self.new_model(seed=0)
        payload_to_state(model, state_to_payload(server_state["model"], server_state["shared_keys"]))
        payload_to_state(model, state["norm"])
        return model
