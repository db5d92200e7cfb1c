"""SCAFFOLD (Karimireddy et al. 2020): control variates correct the client drift.

Per round, with global model x and server control variate c sent DOWN together, a
sampled client i with control variate c_i (private, starts at 0):

* trains from x with every gradient replaced by g + c - c_i (``before_step`` hook, after
  backward, before the optimizer step) for K local steps, giving y_i;
* updates its control variate by the paper's option II:
  c_i+ = c_i - c + (x - y_i) / (K * lr);
* uploads y_i (full state_dict) and Delta c_i = c_i+ - c_i.

The server sets x <- x + server_lr * (sum_i p_i y_i - x) with p_i = n_i / sum_S n (the
project's sample weighting; BN running statistics are plainly averaged), and
c <- c + sum_{i in S} (n_i / n_all) Delta c_i, where n_all is the training size of ALL
clients (``ctx.total_train_samples``, set by the round engine). That keeps c the
sample-weighted mean of all c_i, consistent with the weighted model average; the paper's
uniform version (|S|/N mean) is the special case of equal client sizes. Without the
extra (e.g. another runner), n_all falls back to the round's clients, which is exact
under full participation.

Interpretations recorded here: control variates cover trainable parameters only (BN
buffers are not optimised); option II uses the nominal lr, which is exact for plain SGD
(momentum 0, the default here, as in the paper) and an approximation with momentum or
weight decay; server_lr = 1.0 as in the paper's experiments.

Bytes: the control variate travels in both directions, under keys ``control.<name>``,
so down = state_dict + parameters and up = state_dict + parameters (about twice FedAvg),
and ``payload_nbytes`` counts it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..protocol import ClientData, ClientState, Metrics, Payload, RoundContext, ServerState
from ..training import parameter_keys, payload_to_state, state_to_payload, weighted_average, weighted_sum
from .base import AlgorithmConfig, BaseAlgorithm, register, require

__all__ = ["CONTROL_PREFIX", "Scaffold", "ScaffoldConfig"]

CONTROL_PREFIX = "control."


@dataclass(frozen=True)
class ScaffoldConfig(AlgorithmConfig):
    momentum: float = 0.0
    server_lr: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(self.server_lr > 0, f"server_lr must be > 0 (1.0 is the paper's), got {self.server_lr}.")


def _split(payload: Payload) -> tuple[Payload, Payload]:
    """(model entries, control entries without the prefix)."""
    model = {k: v for k, v in payload.items() if not k.startswith(CONTROL_PREFIX)}
    control = {k[len(CONTROL_PREFIX) :]: v for k, v in payload.items() if k.startswith(CONTROL_PREFIX)}
    return model, control


@register("scaffold")
class Scaffold(BaseAlgorithm):
    config_class = ScaffoldConfig

    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        model = self.new_model(seed)
        control = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
        return {"model": model, "control": control}, self._payload(model, control)

    @staticmethod
    def _payload(model: nn.Module, control: Payload) -> Payload:
        payload = state_to_payload(model)
        payload.update({CONTROL_PREFIX + k: v.clone() for k, v in control.items()})
        return payload

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        return {"c_i": None}  # zeros, created lazily on the device at the first update

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        x, c = _split(payload)
        model = self.scratch_model()
        payload_to_state(model, x)
        names = parameter_keys(model)
        c_i = state.get("c_i") or {k: torch.zeros_like(c[k]) for k in names}
        correction = [c[k] - c_i[k] for k in names]

        def correct(m: nn.Module) -> None:
            grads = [p.grad for p in m.parameters() if p.requires_grad]  # parameter_keys' order
            torch._foreach_add_(grads, correction)

        stats = self.train(model, data, ctx, before_step=correct)
        y = state_to_payload(model)
        scale = 1.0 / (stats.num_steps * self.config.lr)
        new_c_i = {k: c_i[k] - c[k] + (x[k] - y[k]) * scale for k in names}
        upload = dict(y)
        upload.update({CONTROL_PREFIX + k: new_c_i[k] - c_i[k] for k in names})
        return upload, {"c_i": new_c_i}, stats.as_metrics()

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        model: nn.Module = server_state["model"]
        parts = [(_split(p), n) for p, n in uploads]
        mean = weighted_average([(m, n) for (m, _), n in parts])
        server_lr = self.config.server_lr  # type: ignore[attr-defined]
        if server_lr != 1.0:
            x = model.state_dict()
            for k in parameter_keys(model):
                mean[k] = x[k] + server_lr * (mean[k] - x[k])
        payload_to_state(model, mean)
        n_all = float(ctx.total_train_samples or sum(n for _, n in uploads))
        delta_c = weighted_sum([dc for (_, dc), _ in parts], [n / n_all for _, n in parts])
        control = {k: v + delta_c[k] for k, v in server_state["control"].items()}
        server_state["control"] = control
        return self._payload(model, control), server_state

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["model"]

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return server_state["model"]
