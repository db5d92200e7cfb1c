"""FedMIC (Ren et al., arXiv 2407.02261): dual distillation + Global Parameter Decomposition.

Every client k keeps a personal *teacher* T_k (ResNet-18 by default) and two auxiliary
matrices A_k (student -> teacher features) and B_k (teacher -> student features); only
the compact *student* travels. A round (methods.md 1a, 1b):

1. The client rebuilds the global student from the broadcast (dense, or a compressed
   delta against the previous broadcast when ``downlink_compression`` is on).
2. Teacher+A and student+B train together for ``local_epochs`` with the dual
   distillation of :mod:`fedmic_pipeline.core.distillation` (two optimizers).
3. The client uploads the student's update D = W_local - W_global, encoded by
   :func:`fedmic_pipeline.core.codec.encode_update` at the round's energy threshold
   E(t) (0.95 -> 0.98), optionally with error feedback and fp16 factors.
4. The server decodes every upload, averages the updates *weighted by the clients'
   training-set sizes*, adds the mean to the global student and broadcasts it.

The personalized model of a hospital is its teacher; the global model is the student.

Interpretations recorded here (also returned by ``describe()`` as ``interpretation.*``):

* ``shared_entries``: the student's floating state_dict entries travel -- parameters and
  BN running statistics (their updates are 1-D, sent dense). The integer
  ``num_batches_tracked`` counters do not travel (BN uses momentum, so they are unused);
  FedAvg's dense size used for the compression ratio still includes them.
* ``teacher_init``: every client's teacher starts from the same seeded initialisation
  (differences come from data, as in local-only); A, B likewise.
* ``optimizers``: the teacher's optimizer (teacher + A) persists across rounds, because
  the teacher never leaves the client; the student's (student + B) is created afresh
  every round, as in FedAvg (the student is replaced by the global model each round).
  ``teacher_lr`` defaults to ``lr``.
* ``teacher_width``: a channel multiplier of the published widths (ResNet-18: 64 * w;
  student-sized teacher: (32, 64, 128) * w); 1.0 is the paper's ResNet-18. Smaller widths
  are a CPU compromise, logged like every other parameter.
* ``downlink``: with ``downlink_compression`` the server encodes G_{t+1} - C_t, where C_t
  is the model the clients hold, at the same E(t), and sets C_{t+1} = C_t + decode(.);
  the truncation residual G - C is thereby carried into the next broadcast (server-side
  error feedback). The global model evaluated is C, the model clients actually hold.
* ``downlink_catch_up``: a compressed delta is usable only by a client holding the
  previous broadcast. Under partial participation the server remembers which version each
  hospital holds and every delta it broadcast; a hospital that missed rounds receives the
  deltas it missed, in order (``payload_for``), or the dense C_t when that is smaller, and
  one it has never seen receives C_t dense. Either way it then holds exactly the server's
  C_t (the same additions in the same order), and the bytes counted are the ones it got.
* ``uncompressed``: with ``compress_uplink`` false the dense update travels (an ablation).
* ``dp_order`` (with a ``dp`` block, ``core/privacy.py``): the client clips the *dense*
  student update D to ``clip_norm`` (and, under ``placement: client``, adds its noise)
  before error feedback and the SVD, so the SVD and its residual are post-processing of an
  already private update and keep the guarantee. Noise is full-rank: the energy threshold
  then keeps far more singular values and the upload grows towards (or to) the dense size.
  Under ``placement: server`` the client uploads the SVD of its clipped update without
  noise; the server decodes every upload, re-clips it (error feedback may carry it past
  C), averages uniformly, and adds the noise once to the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..codec import ErrorFeedback, decode_update, encode_update, energy_threshold, validate_energy
from ..data import derive_seed, make_generator
from ..distillation import DistillConfig, ProjectionMode, Projections, train_dual
from ..models import MODEL_NAMES, build_model
from ..privacy import nonnegative_variances
from ..protocol import (
    ClientData,
    ClientState,
    ConfigurationError,
    DataSpec,
    Metrics,
    Payload,
    RoundContext,
    ServerState,
    payload_nbytes,
)
from ..training import (
    apply_delta,
    make_optimizer,
    model_delta,
    payload_to_state,
    set_lr,
    state_to_payload,
    weighted_average,
)
from .base import AlgorithmConfig, BaseAlgorithm, register, require

__all__ = ["CATCH_UP", "META_BASE_VERSION", "META_VERSION", "FedMIC", "FedMICConfig"]

logger = logging.getLogger(__name__)

META_VERSION = "__meta__::version"
META_BASE_VERSION = "__meta__::base_version"
#: Key prefix of one missed broadcast inside a catch-up payload: ``__catchup__::<version>::<entry>``.
CATCH_UP = "__catchup__::"
_TEACHER_TAG = 0x7EAC
_PROJECTION_TAG = 0x9A0B

_DEFAULT_WIDTHS: dict[str, dict[str, Any]] = {
    "resnet18": {"base_width": 64},
    "student_cnn": {"widths": (32, 64, 128), "feature_dim": 128},
}


def _scale(value: Any, w: float) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(max(1, int(round(v * w))) for v in value)
    return max(1, int(round(value * w)))


@dataclass(frozen=True)
class FedMICConfig(AlgorithmConfig):
    """FedMIC's hyper-parameters (defaults: methods.md 1a/1b); see the module docstring."""

    teacher_model: str = "resnet18"
    teacher_width: float = 1.0
    teacher_options: Mapping[str, Any] = field(default_factory=dict)
    teacher_lr: float | None = None
    tau: float = 1.0
    alpha_rep: float = 1.0
    alpha_dec: float = 1.0
    max_adaptive_weight: float = 100.0
    energy_start: float = 0.95
    energy_end: float = 0.98
    compress_uplink: bool = True
    error_feedback: bool = False
    fp16_factors: bool = False
    downlink_compression: bool = False

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "teacher_options", dict(self.teacher_options or {}))
        if isinstance(self.teacher_lr, (str, int)) and not isinstance(self.teacher_lr, bool):
            try:
                object.__setattr__(self, "teacher_lr", float(self.teacher_lr))
            except ValueError:
                raise ConfigurationError(f"teacher_lr must be a number or null, got {self.teacher_lr!r}.") from None
        require(
            self.teacher_model in MODEL_NAMES,
            f"teacher_model must be one of {', '.join(MODEL_NAMES)}, got '{self.teacher_model}'.",
        )
        require(
            math.isfinite(self.teacher_width) and self.teacher_width > 0,
            f"teacher_width must be > 0 (a multiplier of the published widths, e.g. 0.25), got {self.teacher_width}.",
        )
        require(
            self.teacher_lr is None or (math.isfinite(self.teacher_lr) and self.teacher_lr > 0),
            f"teacher_lr must be > 0 or null (= lr), got {self.teacher_lr}.",
        )
        validate_energy(self.energy_start, "energy_start")
        validate_energy(self.energy_end, "energy_end")
        require(
            self.energy_start <= self.energy_end,
            f"energy_start ({self.energy_start}) must be <= energy_end ({self.energy_end}): the threshold rises over rounds.",
        )
        self.distill_config()  # validates tau, alphas, max_adaptive_weight

    def to_params(self) -> dict[str, Any]:
        """The base view plus ``teacher_options.<key>`` flattened, and the resolved teacher kwargs."""
        out = super().to_params()
        options = out.pop("teacher_options", {}) or {}
        out.update({f"teacher_options.{k}": v for k, v in sorted(options.items())})
        out.update({f"teacher_resolved.{k}": v for k, v in sorted(self.teacher_kwargs().items())})
        return out

    def distill_config(self) -> DistillConfig:
        return DistillConfig(
            tau=self.tau, alpha_rep=self.alpha_rep, alpha_dec=self.alpha_dec, max_weight=self.max_adaptive_weight
        )

    def teacher_kwargs(self) -> dict[str, Any]:
        """Constructor options of the teacher: the scaled default widths, then ``teacher_options``."""
        scaled = {k: _scale(v, self.teacher_width) for k, v in _DEFAULT_WIDTHS[self.teacher_model].items()}
        return {**scaled, **self.teacher_options}


@register("fedmic")
class FedMIC(BaseAlgorithm):
    """See the module docstring. FedKD subclasses this with one shared projection."""

    config_class = FedMICConfig
    supports_dp = True
    projection_mode: ClassVar[ProjectionMode] = "bidirectional"
    interpretations: ClassVar[dict[str, str]] = {
        "shared_entries": "float state_dict entries (params + BN running stats); int counters stay",
        "teacher_init": "same seeded init for every client's teacher and projections",
        "optimizers": "teacher(+A) optimizer persists; student(+B) optimizer fresh each round",
        "teacher_width": "channel multiplier of published widths (1.0 = ResNet-18 as published)",
        "downlink": "server encodes G - C_clients at E(t); residual carried into the next broadcast",
        "downlink_catch_up": "a client that missed rounds gets the missed deltas in order, or C_t dense if smaller",
        "rank_rule": "factored iff r*(m+n) < m*n elements; conv as out x (in*kh*kw)",
        "aggregation": "decoded updates averaged weighted by n_k / sum n",
        "personalized_model": "teacher",
        "distill": "w=min(1/(CE_T+CE_S), max_adaptive_weight) detached; tau^2 KL batchmean; MSE mean",
    }
    #: Recorded in ``describe()`` only when a ``dp`` block is on.
    dp_interpretations: ClassVar[dict[str, str]] = {
        "dp_order": "clip (+ client noise) on the dense student update, then error feedback and SVD (post-processing)",
        "dp_server": "server decodes, re-clips each update, uniform mean, noise once on the sum",
    }

    def __init__(self, config: FedMICConfig | None = None, spec: DataSpec | None = None) -> None:
        super().__init__(config, spec)
        c: FedMICConfig = self.config  # type: ignore[assignment]
        # Fail before training on a bad teacher option; read both feature sizes once.
        teacher = build_model(c.teacher_model, self.spec, seed=0, **c.teacher_kwargs())
        student = build_model(c.model, self.spec, seed=0, **c.model_options)
        for what, model in (("teacher", teacher), ("student", student)):
            if not (hasattr(model, "features") and hasattr(model, "classifier") and hasattr(model, "feature_dim")):
                raise ConfigurationError(f"{self.name}: the {what} model must expose features/classifier/feature_dim.")
        self._teacher_dim = int(teacher.feature_dim)  # type: ignore[arg-type]
        self._student_dim = int(student.feature_dim)  # type: ignore[arg-type]
        self._shapes = {k: v.shape for k, v in student.state_dict().items() if v.is_floating_point()}

    # -- helpers -------------------------------------------------------------------------
    @property
    def cfg(self) -> FedMICConfig:
        return self.config  # type: ignore[return-value]

    def shared_keys(self) -> list[str]:
        """The student's state_dict entries that travel (floating tensors)."""
        return list(self._shapes)

    def energy(self, ctx: RoundContext) -> float:
        """E(t) for this round (0-based ``ctx.round`` of ``ctx.num_rounds``)."""
        return energy_threshold(ctx.round, ctx.num_rounds, self.cfg.energy_start, self.cfg.energy_end)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["projection_mode"] = self.projection_mode
        out.update({f"interpretation.{k}": v for k, v in self.interpretations.items()})
        if self.privacy is not None:
            out.update({f"interpretation.{k}": v for k, v in self.dp_interpretations.items()})
        return out

    def _global_payload(self, state: Mapping[str, torch.Tensor]) -> Payload:
        return {k: state[k].detach().clone() for k in self.shared_keys()}

    # -- protocol ------------------------------------------------------------------------
    def init_server(self, seed: int) -> tuple[ServerState, Payload]:
        model = self.new_model(seed)
        payload = state_to_payload(model, self.shared_keys())
        server_state: ServerState = {"model": model, "version": 0, "downlink_stats": None}
        if self.cfg.downlink_compression:
            view_model = self.new_model(seed)
            server_state["view_model"] = view_model
            server_state["broadcasts"] = {}  # version -> the encoded delta that made it (catch-up)
            server_state["client_versions"] = {}  # hospital -> the version it holds
            payload[META_VERSION] = torch.tensor(0, dtype=torch.int64)
        return server_state, payload

    def payload_for(self, client_id: int, payload: Payload, server_state: ServerState) -> Payload:
        """The broadcast, or what this hospital needs to catch up (``downlink_catch_up``)."""
        if not self.cfg.downlink_compression:
            return payload
        version = int(server_state["version"])
        held = server_state["client_versions"].get(client_id)
        server_state["client_versions"][client_id] = version
        if version == 0 or held == version - 1:
            return payload
        dense = {k: v.detach().clone() for k, v in server_state["view_model"].state_dict().items() if k in self._shapes}
        dense[META_VERSION] = torch.tensor(version, dtype=torch.int64)
        if held is None:
            return dense
        missed = {
            f"{CATCH_UP}{v}::{key}": tensor
            for v in range(held + 1, version + 1)
            for key, tensor in server_state["broadcasts"][v].items()
        }
        missed[META_BASE_VERSION] = torch.tensor(held, dtype=torch.int64)
        missed[META_VERSION] = torch.tensor(version, dtype=torch.int64)
        return missed if payload_nbytes(missed) < payload_nbytes(dense) else dense

    def init_client(self, client_id: int, data: ClientData, seed: int) -> ClientState:
        c = self.cfg
        teacher = self.new_model(derive_seed(seed, _TEACHER_TAG), name=c.teacher_model, **c.teacher_kwargs())
        projections = Projections(
            self._student_dim, self._teacher_dim, self.projection_mode, generator=make_generator(seed, _PROJECTION_TAG)
        ).to(self.device)
        teacher_opt = make_optimizer(
            list(teacher.parameters()) + projections.teacher_side_parameters(),
            c.optimizer,
            c.teacher_lr if c.teacher_lr is not None else c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
        )
        return {
            "teacher": teacher,
            "projections": projections,
            "teacher_optimizer": teacher_opt,
            "error_feedback": ErrorFeedback() if c.error_feedback else None,
            "view": None,  # the global student as this client last reconstructed it (downlink only)
            "version": None,
        }

    def _receive(self, state: ClientState, payload: Payload) -> Payload:
        """The global student's shared entries, rebuilt from a dense payload, one delta, or
        the missed deltas of a catch-up applied in order (exactly the server's additions)."""
        if META_BASE_VERSION in payload:
            base = int(payload[META_BASE_VERSION])
            if state.get("version") != base:
                raise RuntimeError(
                    f"{self.name}: the broadcast is a delta against version {base} but this client holds "
                    f"version {state.get('version')}: the server's record of what each hospital holds is wrong."
                )
            if any(k.startswith(CATCH_UP) for k in payload):
                versions = sorted({int(k[len(CATCH_UP):].split("::", 1)[0]) for k in payload if k.startswith(CATCH_UP)})
                bodies = [
                    {k[len(f"{CATCH_UP}{v}::"):]: t for k, t in payload.items() if k.startswith(f"{CATCH_UP}{v}::")}
                    for v in versions
                ]
            else:
                bodies = [{k: v for k, v in payload.items() if not k.startswith("__meta__::")}]
            view = state["view"]
            for body in bodies:
                view = apply_delta(view, decode_update(body, self._shapes))
            state["view"] = view
            state["version"] = int(payload[META_VERSION])
            return view
        body = {k: v for k, v in payload.items() if not k.startswith("__meta__::")}
        missing = [k for k in self.shared_keys() if k not in body]
        if missing:
            raise KeyError(f"{self.name}: the broadcast lacks {missing[:3]}")
        if self.cfg.downlink_compression:
            state["view"] = {k: v.detach().clone() for k, v in body.items()}
            state["version"] = int(payload[META_VERSION]) if META_VERSION in payload else 0
        return body

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        c = self.cfg
        global_state = self._receive(state, payload)
        student = self.scratch_model()
        payload_to_state(student, global_state)
        projections: Projections = state["projections"]
        student_opt = self.make_optimizer(list(student.parameters()) + projections.student_side_parameters())
        set_lr(student_opt, self.round_lr(ctx))
        set_lr(state["teacher_optimizer"], self.round_lr(ctx, c.teacher_lr if c.teacher_lr is not None else c.lr))
        metrics = self.local_distillation(state, student, student_opt, data, ctx)
        self.recalibrate(state["teacher"], data)
        self.recalibrate(student, data)
        keys = self.shared_keys()
        delta = model_delta(state_to_payload(student, keys), global_state, keys)
        if self.privacy is not None:
            delta, dp_metrics = self.privacy.privatize(delta, ctx, data.client_id)
            metrics.update(dp_metrics)
        ef: ErrorFeedback | None = state.get("error_feedback")
        corrected = ef.add(delta) if ef is not None else delta
        energy = self.energy(ctx)
        if c.compress_uplink:
            upload, stats = encode_update(corrected, energy, fp16_factors=c.fp16_factors)
            if ef is not None:
                ef.update(corrected, decode_update(upload, self._shapes))
                metrics["codec/residual_norm"] = ef.norm()
            metrics.update(stats.as_metrics(per_layer=False))
            logger.debug(
                "%s client %d round %d: E=%.4f, %d -> %d bytes (x%.2f), matrix rel. error %.4f",
                self.name, data.client_id, ctx.round, energy, stats.dense_bytes, stats.encoded_bytes,
                stats.compression_ratio, stats.rel_error_matrices,
            )  # fmt: skip
        else:
            upload = {k: v.detach().clone() for k, v in corrected.items()}
        return upload, state, metrics

    def local_distillation(
        self, state: ClientState, student: nn.Module, student_opt: torch.optim.Optimizer, data: ClientData, ctx: RoundContext
    ) -> Metrics:
        """The round's local epochs: teacher+A and student+B trained together by dual distillation."""
        c = self.cfg
        return train_dual(
            state["teacher"], student, state["projections"], data, c.local_epochs, c.batch_size,
            state["teacher_optimizer"], student_opt, self.client_generator(ctx, data.client_id),
            c.distill_config(), ctx, logit_offset=self.logit_offset(data),
        )  # fmt: skip

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        keys = self.shared_keys()
        model: nn.Module = server_state["model"]
        if self.cfg.compress_uplink:
            deltas = [(decode_update(p, self._shapes), n) for p, n in uploads]
        else:
            deltas = [({k: p[k] for k in keys}, n) for p, n in uploads]
        if self.privacy is None:
            mean = weighted_average(deltas)  # sample-weighted, accumulated in float64
            new_state = apply_delta(state_to_payload(model, keys), mean)
        else:
            mean = self.privacy.combine([d for d, _ in deltas], ctx, keys)
            new_state = nonnegative_variances(apply_delta(state_to_payload(model, keys), mean))
            server_state["privacy"] = self.privacy.spent(ctx, server_state.get("privacy")).as_dict()
        payload_to_state(model, new_state)
        server_state["version"] = int(server_state["version"]) + 1
        if not self.cfg.downlink_compression:
            return self._global_payload(new_state), server_state
        view_model: nn.Module = server_state["view_model"]
        view = state_to_payload(view_model, keys)
        encoded, stats = encode_update(model_delta(new_state, view, keys), self.energy(ctx), self.cfg.fp16_factors)
        payload_to_state(view_model, apply_delta(view, decode_update(encoded, self._shapes)))
        broadcasts = server_state["broadcasts"]
        broadcasts[server_state["version"]] = dict(encoded)
        oldest_held = min(server_state["client_versions"].values(), default=0)
        for old in [v for v in broadcasts if v <= oldest_held]:  # every known hospital is past it
            del broadcasts[old]
        encoded[META_BASE_VERSION] = torch.tensor(server_state["version"] - 1, dtype=torch.int64)
        encoded[META_VERSION] = torch.tensor(server_state["version"], dtype=torch.int64)
        server_state["downlink_stats"] = stats.as_metrics(prefix="downlink/", per_layer=False)
        return encoded, server_state

    def after_server_pretraining(self, server_state: ServerState, payload: Payload) -> Payload:
        """With downlink compression the server holds the student twice (its own and the
        view the hospitals reconstruct); both start from the pretrained weights."""
        pretrained = self.global_model(server_state).state_dict()
        for key in ("model", "view_model"):
            if key in server_state:
                server_state[key].load_state_dict(pretrained)
        return super().after_server_pretraining(server_state, payload)

    def global_model(self, server_state: ServerState) -> nn.Module | None:
        return server_state["view_model"] if self.cfg.downlink_compression else server_state["model"]

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return state["teacher"]
