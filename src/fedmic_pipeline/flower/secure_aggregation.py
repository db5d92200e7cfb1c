"""SecAgg+ for the FedAvg family over the Flower deployment: the server learns only the sum.

Run config ``secure-aggregation = "secaggplus"`` (default ``"none"``) makes every round's
training exchange Flower's own SecAgg+ protocol (Bell et al. 2020) instead of one
``train`` message per node:

* server: ``SecAggPlusClients`` is the round engine's ``Transport``. Its ``train`` runs
  one ``flwr.server.workflow.SecAggPlusWorkflow`` (setup, share keys, collect masked
  vectors, unmask) over the run's real ``Grid``; the workflow hands the strategy the
  sample-weighted mean of the nodes' vectors and nothing else. ``evaluate`` (global-model
  confusion counts) is the plain path of ``server_app.FlowerClients``.
* client: ``secaggplus_when_requested`` wraps the ClientApp's ``train`` handler with
  ``flwr.client.mod.secaggplus_mod`` for messages that carry the SecAgg+ config; the
  handler still trains with the core's ``client_update`` and, under SecAgg+, answers the
  dense update ``W_local - W_global`` of the floating entries in the legacy ``FitRes``
  layout (``fit_reply``), which the mod quantizes, masks and sends instead.

Why the legacy workflow inside a Message-API ServerApp: flwr 1.41 has no Message-API
SecAgg+ for ``flwr.serverapp`` Grid apps (``flwr.serverapp.strategy`` has none); its one
implementation is ``SecAggPlusWorkflow``, which takes a ``LegacyContext`` and a legacy
``Strategy``. Its stages only call ``strategy.configure_fit`` / ``aggregate_fit`` and
``grid.send_and_receive``, so one round of it runs inside the project's ServerApp with a
per-round ``LegacyContext`` and a strategy that only hands over the sampled nodes and
takes the sum (``_SecAggRound``): the core's RoundEngine keeps sampling, the evaluation
schedule, validation selection, byte counts and the summary, exactly as without SecAgg+.

What the server sets the global model from: ``W_global + mean_k(n_k (W_k - W_global)) /
sum n_k`` over the floating entries (parameters and BN running statistics; variances
clamped at 0), i.e. FedAvg's aggregate up to SecAgg+'s quantization (``2 *
secagg-clipping-range / 2**22`` per entry before weighting, stochastic rounding). The
integer BN counters stay the server's, as in the DP path of ``core/algorithms/fedavg``
(a counter's delta is a step count, not a summable model quantity). Every answering
client's ``ClientUpdate`` then carries that same aggregate -- what Flower itself does
with the legacy results -- so the core's unchanged ``FedAvg.aggregate`` returns it.

Limits (refused by ``check_supported`` with the reason): FedMIC uploads low-rank SVD
factors of its update that the server decodes client by client before averaging; a sum
of factors is not the factors of a sum, so secure summation cannot carry them. The same
holds for any method whose ``aggregate`` is not FedAvg's sample-weighted mean of the
uploads (FedBN, SCAFFOLD, FedKD, local-only) and for client-level DP, whose uniform
mean and server-side noise are a different aggregate. ``secagg_cost`` measures what a
dense-update variant costs next to FedMIC's compressed upload. SecAgg+ needs at least
two answering nodes per round; with ``reconstruction_threshold`` 2/3 of the shares it
tolerates n - round(2n/3) drop-outs in a round of n nodes (none with two).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from . import task
from .messaging import NodeFailureError
from .records import message_wire_nbytes

__all__ = [
    "MODES",
    "SecAggPlusClients",
    "SecureAggregationUnsupported",
    "check_supported",
    "fit_payload",
    "fit_reply",
    "is_secure_train",
    "secaggplus_when_requested",
]

logger = logging.getLogger(__name__)

MODES = task.SECURE_AGGREGATION_MODES
#: Fraction of a node's shares needed to rebuild its secrets (Flower's examples use 2 of 3).
RECONSTRUCTION_THRESHOLD = 2 / 3
#: fitins.config keys this module adds to the round's message config.
PAYLOAD_KEYS_KEY = "payload-keys"
CLIP_KEY = "secagg-clipping-range"
MAX_WEIGHT_KEY = "secagg-max-weight"
_FIT_CONFIG = "fitins.config"
_FIT_PARAMETERS = "fitins.parameters"


class SecureAggregationUnsupported(task.FlowerConfigError):
    """The algorithm's upload is not a dense update that secure summation can carry."""


def _why_not_summable(name: str, algorithm: Any) -> str | None:
    """Why ``algorithm``'s uploads cannot be securely summed, or None when they can."""
    from ..core.algorithms.fedavg import FedAvgExchange

    if name == "fedmic":
        return (
            "its upload is low-rank SVD factors (U, S, V per layer, plus error-feedback codec state) that the server "
            "must decode one client at a time before averaging; the sum of the factors is not the factors of the sum, "
            "and SecAgg+ reveals only the sum"
        )
    if not isinstance(algorithm, FedAvgExchange) or type(algorithm).aggregate is not FedAvgExchange.aggregate:
        return "its aggregate is not FedAvg's sample-weighted mean of dense uploads, the only one SecAgg+ computes"
    if algorithm.privacy is not None:
        return (
            "client-level DP aggregates a uniform mean of clipped updates (noised at the server), not SecAgg+'s "
            "weighted sum"
        )
    return None


def check_supported(mode: str, name: str, algorithm: Any) -> None:
    """Refuse, before any round, a ``secure-aggregation`` mode the algorithm cannot run."""
    if mode not in MODES:
        raise task.FlowerConfigError(f"run config 'secure-aggregation' must be one of {MODES}, got {mode!r}.")
    if mode == "none":
        return
    reason = _why_not_summable(name, algorithm)
    if reason is not None:
        raise SecureAggregationUnsupported(
            f"secure-aggregation = \"{mode}\" cannot run '{name}': {reason}. Use a FedAvg-family method (fedavg, "
            f"fedprox, moon, ditto) without client-level DP under SecAgg+, or run '{name}' with secure-aggregation = "
            "\"none\" (docs/flower_security.md, 'Secure aggregation', measures the cost of a dense variant)."
        )


# -- client side ------------------------------------------------------------------------------
def is_secure_train(message: Message) -> bool:
    """Whether a train message is SecAgg+'s collect-masked-vectors stage (carries FitIns)."""
    return RECORD_KEY_CONFIGS in message.content and _FIT_CONFIG in message.content


def secaggplus_when_requested(message: Message, context: Context, call_next: Any) -> Message:
    """Client-side mod on ``train``: Flower's ``secaggplus_mod`` for SecAgg+ messages (all
    four stages; only the collect stage reaches the handler), the handler itself otherwise."""
    if RECORD_KEY_CONFIGS not in message.content:
        return call_next(message, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(message, context, call_next)


def fit_config(message: Message) -> ConfigRecord:
    """The round's message config (``server_app.message_config`` plus this module's keys)."""
    return message.content[_FIT_CONFIG]


def fit_payload(message: Message, device: Any) -> dict[str, Any]:
    """The broadcast payload from the legacy ``fitins.parameters`` (keys from the config)."""
    import torch
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    keys = json.loads(str(fit_config(message)[PAYLOAD_KEYS_KEY]))
    parameters = compat.arrayrecord_to_parameters(message.content[_FIT_PARAMETERS], keep_input=True)
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(keys):
        raise task.FlowerConfigError(f"SecAgg+ fit message: {len(arrays)} arrays for {len(keys)} payload keys.")
    return {k: torch.from_numpy(np.array(a)).to(device) for k, a in zip(keys, arrays, strict=True)}


def fit_reply(
    upload: Mapping[str, Any], payload: Mapping[str, Any], metrics: dict[str, Any], num_train: int, config: Any
) -> RecordDict:
    """The legacy ``FitRes`` content that ``secaggplus_mod`` masks: the dense update of the
    floating entries (payload order), the node's weight and its plaintext metrics (the same
    scalars as without SecAgg+, plus how many entries SecAgg+ will clip)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from ..core.protocol import payload_nbytes
    from ..core.training import model_delta

    delta = model_delta(dict(upload), dict(payload), [k for k, v in payload.items() if v.is_floating_point()])
    ratio = num_train / float(config[MAX_WEIGHT_KEY])
    clip = float(config[CLIP_KEY])
    arrays = [d.detach().cpu().contiguous().numpy() for d in delta.values()]
    metrics = {
        **metrics,
        "payload-nbytes": payload_nbytes(delta),
        "secagg-clipped-entries": int(sum(int((np.abs(a) * ratio > clip).sum()) for a in arrays)),
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(num_train), metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# -- server side ------------------------------------------------------------------------------
@dataclass
class StageCost:
    """One ``send_and_receive`` of the workflow: bytes per node each way and its seconds."""

    sent: dict[int, int]
    received: dict[int, int]
    seconds: float


@dataclass
class MessengerGrid:
    """The Grid that ``SecAggPlusWorkflow`` sees: its ``send_and_receive`` goes through the
    run's ``NodeMessenger.exchange`` (0.25 s polls where Flower's own sleeps 3 s between
    pulls -- four stages a round made that 12 s -- and a node that left is noticed at once),
    counting each stage's bytes (``records.message_wire_nbytes``) and seconds."""

    messenger: Any
    stages: list[StageCost] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.messenger.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        by_node = {int(m.metadata.dst_node_id): m for m in messages}
        t0 = time.perf_counter()
        exchange = self.messenger.exchange(by_node, float("inf") if timeout is None else timeout)
        self.failures.update(exchange.failures)  # dropped out of this stage: the workflow carries on without them
        received = {nid: int(message_wire_nbytes(r)) for nid, r in exchange.replies.items()}
        self.stages.append(StageCost(dict(exchange.wire_sent), received, time.perf_counter() - t0))
        return list(exchange.replies.values())


def _round_strategy(proxies: Mapping[int, Any], fit_ins: Any) -> Any:
    """A legacy Strategy for one SecAgg+ round: ``configure_fit`` sends ``fit_ins`` to the
    engine's sampled nodes; ``aggregate_fit`` keeps the unmasked mean and the per-node
    plaintext metrics. Nothing else is called by ``SecAggPlusWorkflow``."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class _SecAggRound(Strategy):
        def __init__(self) -> None:
            self.proxies = dict(proxies)
            self.mean: list[np.ndarray] | None = None
            self.results: dict[int, tuple[int, dict[str, Any]]] = {}

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return [(proxy, fit_ins) for proxy in proxies.values()]

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
            if not results:
                return None, {}
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.results = {int(proxy.node_id): (int(res.num_examples), dict(res.metrics)) for proxy, res in results}
            return results[0][1].parameters, {}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    return _SecAggRound()


class SecAggPlusClients:
    """The round engine's ``Transport`` under SecAgg+: ``train`` is one SecAgg+ round,
    ``evaluate`` the plain ``FlowerClients``' (wrapped, not subclassed, so the ClientApp can
    import this module without the ServerApp's)."""

    def __init__(self, plain: Any) -> None:
        self.plain = plain
        self.messenger, self.cfg, self.spec = plain.messenger, plain.cfg, plain.spec

    @property
    def partitions(self) -> Mapping[int, Any]:
        return self.plain.partitions

    def evaluate(self, ctx: Any, server_state: Any, selector: Any) -> Any:
        return self.plain.evaluate(ctx, server_state, selector)

    def _run_workflow(
        self, ctx: Any, broadcast: Mapping[str, Any], nodes: Mapping[int, int], max_weight: float
    ) -> tuple[Any, MessengerGrid]:
        """One ``SecAggPlusWorkflow`` over the run's Grid, with a ``LegacyContext`` of its own
        holding the round number and the broadcast; returns its strategy and the metered Grid."""
        from flwr.common import FitIns, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        from .server_app import message_config

        config = {
            **message_config(self.cfg, self.spec, ctx),
            PAYLOAD_KEYS_KEY: json.dumps(list(broadcast)),
            CLIP_KEY: self.cfg.secagg_clipping_range,
            MAX_WEIGHT_KEY: max_weight,
        }
        parameters = ndarrays_to_parameters([t.detach().cpu().contiguous().numpy() for t in broadcast.values()])
        grid = MessengerGrid(self.messenger)
        run_id = int(getattr(getattr(self.messenger.grid, "run", None), "run_id", 0) or 0)
        proxies = {nid: GridClientProxy(nid, self.messenger.grid, run_id) for nid in nodes}
        strategy = _round_strategy(proxies, FitIns(parameters, config))
        server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context = LegacyContext(server_context, strategy=strategy)
        for proxy in strategy.proxies.values():
            context.client_manager.register(proxy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: ctx.round + 1})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
        workflow = SecAggPlusWorkflow(
            num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD, max_weight=max_weight,
            clipping_range=self.cfg.secagg_clipping_range, timeout=self.cfg.round_timeout,
        )  # fmt: skip
        workflow(grid, context)
        return strategy, grid

    def train(self, ctx: Any, payloads: Mapping[int, dict[str, Any]]) -> Any:
        """One SecAgg+ round over the sampled live nodes; every answering node's
        ``ClientUpdate`` carries the securely aggregated model (module docstring)."""
        from ..core.engine import ClientUpdate, RoundUpdates
        from ..core.privacy import nonnegative_variances
        from ..core.training import apply_delta

        stage = f"round {ctx.round + 1} (SecAgg+ train)"
        targets, skipped = self.plain.live_targets(ctx)
        if len(targets) < 2:
            self.messenger.handle_failures(stage, skipped, remaining=len(targets))
            raise NodeFailureError(
                f"SecAgg+ needs at least 2 live nodes in {stage}; sampled {list(ctx.sampled)}, live {targets}."
            )
        broadcast = payloads[targets[0]]
        if any(payloads[p] is not broadcast for p in targets):
            raise SecureAggregationUnsupported(
                "SecAgg+ needs one broadcast payload per round; this method sends per-node payloads."
            )
        float_keys = [k for k, v in broadcast.items() if v.is_floating_point()]
        nodes = {self.partitions[p].node_id: p for p in targets}
        max_weight = float(max(self.partitions[p].num_train for p in targets))
        strategy, grid = self._run_workflow(ctx, broadcast, nodes, max_weight)
        answered = sorted(nodes[nid] for nid in strategy.results)
        failures = {
            **skipped,
            **{p: grid.failures.get(nid, "it dropped out of the SecAgg+ round") for nid, p in nodes.items() if p not in answered},
        }
        if strategy.mean is None:
            failures = failures or {p: "the SecAgg+ round halted (too few nodes answered a stage)" for p in targets}
            self.messenger.handle_failures(stage, failures, remaining=0)
            raise NodeFailureError(f"The SecAgg+ round halted in {stage}; see the ServerApp log.")
        self.messenger.handle_failures(stage, failures, remaining=len(answered))
        mean = {k: _tensor_like(a, broadcast[k]) for k, a in zip(float_keys, strategy.mean, strict=True)}
        aggregate = nonnegative_variances(apply_delta(broadcast, mean))
        updates = []
        for nid, (num_examples, metrics) in sorted(strategy.results.items(), key=lambda item: nodes[item[0]]):
            pid, node = nodes[nid], self.partitions[nodes[nid]]
            if num_examples != node.num_train:
                raise NodeFailureError(
                    f"Partition {pid} weighted its SecAgg+ vector by {num_examples}, not its {node.num_train} samples."
                )
            if metrics.get("secagg-clipped-entries"):
                logger.warning("Partition %d: %d update entries clipped by SecAgg+ (raise secagg-clipping-range).",
                               pid, metrics["secagg-clipped-entries"])  # fmt: skip
            updates.append(ClientUpdate(pid, aggregate, node.num_train, {"node_id": nid, **metrics}))
        transport = self._secagg_transport(grid, nodes, targets, answered, failures)
        return RoundUpdates(updates=updates, sent=targets, transport=transport)

    def _secagg_transport(
        self, grid: MessengerGrid, nodes: Mapping[int, int], targets: list[int], answered: list[int],
        failures: Mapping[int, str],
    ) -> dict[str, Any]:  # fmt: skip
        """The plain transport's record fields, summed over the four stages, plus per stage."""
        pid_node = {p: n for n, p in nodes.items()}
        up = [sum(s.received.get(pid_node[p], 0) for s in grid.stages) for p in answered]
        down = [sum(s.sent.get(pid_node[p], 0) for s in grid.stages) for p in targets]
        names = ("setup", "share_keys", "collect_masked_vectors", "unmask")
        return {
            "secure_aggregation": "secaggplus",
            "participants": answered,
            "failed": [
                {"partition_id": p, "node_id": self.partitions[p].node_id, "reason": r} for p, r in sorted(failures.items())
            ],
            "num_failed": len(failures),
            "wire_bytes_up": up,
            "wire_bytes_down": down,
            "wire_bytes_up_total": sum(up),
            "wire_bytes_down_total": sum(down),
            "wire_bytes_eval_total": 0,
            "secagg_stages": [
                {"stage": name, "seconds": s.seconds, "bytes_down": sum(s.sent.values()), "bytes_up": sum(s.received.values())}
                for name, s in zip(names, grid.stages, strict=False)
            ],
        }


def _tensor_like(array: np.ndarray, like: Any) -> Any:
    """``array`` as a tensor of ``like``'s dtype and device (SecAgg+ dequantizes to float64)."""
    import torch

    return torch.from_numpy(np.asarray(array)).to(device=like.device, dtype=like.dtype)
