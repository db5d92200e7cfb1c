"""What every algorithm shares: the config base, the registry, and helper base classes.

Registering a method (one file per method under ``core/algorithms/``; ``fedprox.py`` is
the smallest complete one): a frozen dataclass subclassing ``AlgorithmConfig`` whose
``validate`` extends the base one with ``require(condition, message)``, and the class::

    @register("fedprox")
    class FedProx(FedAvg):
        config_class = FedProxConfig

then add the module to the explicit list in ``algorithms/__init__.py``. A registered
class needs only ``config_class`` (a frozen dataclass) and ``__init__(config, spec)``;
subclassing ``BaseAlgorithm`` is optional but gives model building, a reusable work
model, optimizers, seeded batch generators and ``train``. A variant of FedAvg subclasses
``FedAvg`` and overrides its hooks (see ``fedavg.py``); a method that keeps one model
training across rounds and exchanges nothing subclasses ``StatefulModelAlgorithm``.

Config values from YAML are coerced where unambiguous: an int for a float field becomes a
float, and a numeric string becomes a number (PyYAML reads ``1e-3`` as the *string*
"1e-3"; writing ``1.0e-3`` avoids it). Anything else of the wrong type is a
ConfigurationError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..data import round_generator
from ..models import MODEL_NAMES, build_model
from ..privacy import ClientLevelDP, DPConfig
from ..protocol import (
    ClientData,
    ClientState,
    ConfigurationError,
    DataSpec,
    FederatedAlgorithm,
    Metrics,
    Payload,
    RoundContext,
    ServerState,
)
from ..training import (
    LR_SCHEDULES,
    OPTIMIZERS,
    BeforeStep,
    ExtraLoss,
    TrainStats,
    class_log_prior,
    make_optimizer,
    round_lr,
    recalibrate_batchnorm,
    set_lr,
    train_local,
)

__all__ = [
    "ALGORITHMS",
    "AlgorithmConfig",
    "BaseAlgorithm",
    "StatefulModelAlgorithm",
    "build_algorithm",
    "register",
    "require",
]

#: name -> algorithm class; filled by ``@register`` when each module is imported.
ALGORITHMS: dict[str, type[FederatedAlgorithm]] = {}

A = TypeVar("A", bound=type)
#: Training losses: plain cross-entropy, or cross-entropy on prior-adjusted logits.
LOSSES: tuple[str, ...] = ("ce", "logit_adjusted")


def require(condition: bool, message: str) -> None:
    """Raise ConfigurationError(message) unless ``condition``."""
    if not condition:
        raise ConfigurationError(message)


def _coerce(value: Any, kind: str, name: str) -> Any:
    """Coerce a YAML value to the annotated scalar type (see the module docstring)."""
    if kind not in ("float", "int", "bool", "str"):
        return value
    if isinstance(value, bool):
        if kind == "bool":
            return value
        raise ConfigurationError(f"'{name}' must be a {kind}, got the boolean {value}.")
    if kind == "bool":
        raise ConfigurationError(f"'{name}' must be true or false, got {value!r}.")
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigurationError(f"'{name}' must be a string, got {value!r}.")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(f"'{name}' must be a number, got the string {value!r}.") from None
    if not isinstance(value, (int, float)):
        raise ConfigurationError(f"'{name}' must be a {kind}, got {type(value).__name__} {value!r}.")
    if kind == "float":
        return float(value)
    if float(value) != int(value):
        raise ConfigurationError(f"'{name}' must be an integer, got {value!r}.")
    return int(value)


@dataclass(frozen=True)
class AlgorithmConfig:
    """Hyper-parameters every method has; subclasses add their own and extend ``validate``.

    Defaults follow common FedAvg practice for small CNNs: SGD, lr 0.01, momentum 0.9,
    batch 32, one local epoch per round. For FedAvg-family methods the optimizer (and its
    momentum buffer) is created afresh in every round, as in McMahan et al.: optimizer
    state never travels and would be stale after aggregation.

    The learning recipe (``conf/base/parameters_federated_training.yml`` says what was
    measured for each choice): ``lr_schedule`` 'cosine' decays the rate over rounds to
    ``lr_final_fraction`` of ``lr`` (``training.round_lr``); ``loss`` 'logit_adjusted'
    trains on logits shifted by ``logit_adjust_tau`` times the client's log label prior
    (``training.class_log_prior``), 'ce' is plain cross-entropy; ``bn_recalibrate``
    recomputes BatchNorm statistics on the local training images after each local update
    (``training.recalibrate_batchnorm``), so eval mode matches the trained weights.
    """

    model: str = "student_cnn"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_epochs: int = 1
    batch_size: int = 32
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.1
    loss: str = "ce"
    logit_adjust_tau: float = 1.0
    bn_recalibrate: bool = False
    dp: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), str(kind), f.name))
        object.__setattr__(self, "model_options", dict(self.model_options or {}))
        self.validate()

    def validate(self) -> None:
        """Check every value; raise ConfigurationError naming the fix. Extend in subclasses."""
        require(self.model in MODEL_NAMES, f"model must be one of {', '.join(MODEL_NAMES)}, got '{self.model}'.")
        require(
            self.optimizer.lower() in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'."
        )
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}.")
        require(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}.")
        require(self.weight_decay >= 0.0, f"weight_decay must be >= 0, got {self.weight_decay}.")
        require(self.local_epochs >= 1, f"local_epochs must be >= 1, got {self.local_epochs}.")
        require(self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}.")
        require(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'.",
        )
        require(
            0.0 < self.lr_final_fraction <= 1.0,
            f"lr_final_fraction must be in (0, 1] (the last round's lr as a share of lr), got {self.lr_final_fraction}.",
        )
        require(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'.")
        require(self.logit_adjust_tau >= 0.0, f"logit_adjust_tau must be >= 0, got {self.logit_adjust_tau}.")
        if self.dp is not None:
            object.__setattr__(self, "dp", dataclasses.asdict(DPConfig.from_params(self.dp)))

    def dp_config(self) -> DPConfig | None:
        """The validated ``dp`` block, or None when differential privacy is off."""
        return None if self.dp is None else DPConfig(**self.dp)

    def to_params(self) -> dict[str, Any]:
        """Flat, JSON/MLflow-friendly view (model options as ``model_options.<key>``)."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key == "model_options":
                out.update({f"model_options.{k}": v for k, v in sorted(value.items())})
            elif key == "dp":
                out.update(DPConfig(**value).to_params() if value is not None else {})
            else:
                out[key] = value
        return out


def register(name: str) -> Callable[[A], A]:
    """Class decorator: add an algorithm to ``ALGORITHMS`` under ``name`` (sets ``cls.name``)."""

    def decorate(cls: A) -> A:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ValueError(
                f"Algorithm name '{name}' is registered twice ({ALGORITHMS[name].__qualname__}, {cls.__qualname__})."
            )
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(f"{cls.__qualname__} needs a dataclass `config_class` to be registered.")
        cls.name = name  # type: ignore[attr-defined]
        ALGORITHMS[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def build_algorithm(name: str, params: Mapping[str, Any] | None, spec: DataSpec) -> FederatedAlgorithm:
    """Instantiate a registered algorithm from a parameter mapping, validating everything.

    Unknown names and unknown keys raise ConfigurationError listing the valid ones.
    """
    if name not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm '{name}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))}.")
    cls = ALGORITHMS[name]
    config_class = cls.config_class  # type: ignore[attr-defined]
    given = dict(params or {})
    valid = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigurationError(f"Unknown parameter(s) {unknown} for algorithm '{name}'. Valid parameters: {', '.join(valid)}.")
    try:
        config = config_class(**given)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    return cls(config, spec)


class BaseAlgorithm(FederatedAlgorithm):
    """Helpers for methods built on one model family; see the module docstring."""

    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: Build models with channels-last conv weights (1.6x faster on CPU; see build_model).
    channels_last: ClassVar[bool] = True
    #: Whether the method applies a ``dp`` block (its round calls ``self.privacy``'s hooks).
    supports_dp: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig | None = None, spec: DataSpec | None = None) -> None:
        if spec is None:
            raise ConfigurationError(f"{type(self).__name__} needs a DataSpec (channels and classes).")
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ConfigurationError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config
        self.spec = spec
        self._scratch: nn.Module | None = None
        dp = config.dp_config()
        if dp is not None and not self.supports_dp:
            supported = sorted(n for n, cls in ALGORITHMS.items() if getattr(cls, "supports_dp", False))
            raise ConfigurationError(
                f"{self.name} does not support the dp block (client-level differential privacy is implemented for "
                f"{', '.join(supported)}): remove `dp` from its parameters, and keep it out of algorithm_params.common, "
                "which every method reads; put it in the block of a method that supports it."
            )
        self.privacy: ClientLevelDP | None = ClientLevelDP(dp) if dp is not None else None
        # Build once on the CPU now, so a bad model option fails before any training.
        build_model(config.model, spec, seed=0, **config.model_options)

    # -- models ---------------------------------------------------------------------
    def new_model(self, seed: int, name: str | None = None, **options: Any) -> nn.Module:
        """A freshly initialised model on ``self.device`` (default: the config's model)."""
        model_name = name or self.config.model
        opts = options if name is not None else {**self.config.model_options, **options}
        return build_model(model_name, self.spec, seed=seed, channels_last=self.channels_last, **opts).to(self.device)

    def scratch_model(self) -> nn.Module:
        """One reusable work model on ``self.device`` whose every entry the caller overwrites
        (e.g. from a payload): saves rebuilding a model for each client of each round."""
        if self._scratch is None or next(self._scratch.parameters()).device != self.device:
            self._scratch = self.new_model(seed=0)
        return self._scratch

    # -- training -------------------------------------------------------------------
    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        c = self.config
        return make_optimizer(params, c.optimizer, c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def round_lr(self, ctx: RoundContext, base_lr: float | None = None) -> float:
        """This round's learning rate under the config's schedule (``base_lr`` default: lr)."""
        c = self.config
        return round_lr(c.lr if base_lr is None else base_lr, c.lr_schedule, ctx.round, ctx.num_rounds, c.lr_final_fraction)

    def logit_offset(self, data: ClientData) -> torch.Tensor | None:
        """The client's logit-adjustment offset, or None under plain cross-entropy."""
        if self.config.loss != "logit_adjusted":
            return None
        return class_log_prior(data.train_y, self.spec.num_classes, self.config.logit_adjust_tau)

    @staticmethod
    def client_generator(ctx: RoundContext, client_id: int) -> torch.Generator:
        """The batch-order generator of ``client_id`` in this round (seed, round, client)."""
        return round_generator(ctx.seed, ctx.round, client_id)

    def train(
        self,
        model: nn.Module,
        data: ClientData,
        ctx: RoundContext,
        optimizer: torch.optim.Optimizer | None = None,
        extra_loss: ExtraLoss | None = None,
        before_step: BeforeStep | None = None,
    ) -> TrainStats:
        """``train_local`` with the config's epochs/batch size, a fresh optimizer unless one
        is given (either way at this round's scheduled rate), the config's loss and this
        client's seeded generator for the round."""
        c = self.config
        optimizer = optimizer if optimizer is not None else self.make_optimizer(model.parameters())
        set_lr(optimizer, self.round_lr(ctx))
        stats = train_local(
            model,
            data,
            epochs=c.local_epochs,
            batch_size=c.batch_size,
            optimizer=optimizer,
            generator=self.client_generator(ctx, data.client_id),
            ctx=ctx,
            extra_loss=extra_loss,
            before_step=before_step,
            logit_offset=self.logit_offset(data),
        )
        self.recalibrate(model, data)
        return stats

    def recalibrate(self, model: nn.Module, data: ClientData) -> None:
        """``recalibrate_batchnorm`` on the client's training images, when configured."""
        if self.config.bn_recalibrate:
            recalibrate_batchnorm(model, data.train_x, batch_size=max(self.config.batch_size, 256))

    def describe(self) -> dict[str, Any]:
        """The algorithm name and its resolved parameters (for MLflow/DVC params)."""
        return {"algorithm": self.name, **self.config.to_params()}


class StatefulModelAlgorithm(BaseAlgorithm):
    """A method whose clients keep one model and its optimizer across rounds and exchange
    nothing (local-only, centralized): a round is ``local_epochs`` more epochs of one
    continuous training run, payloads and uploads are empty (0 bytes), and a client's
    personalized model is its model. Subclasses say where that state lives
    (``init_server``, ``init_client``) and what the global model is."""

    def training_state(self, seed: int) -> dict[str, Any]:
        """A freshly initialised model and its optimizer: the state that persists."""
        model = self.new_model(seed)
        return {"model": model, "optimizer": self.make_optimizer(model.parameters())}

    def client_update(
        self, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        stats = self.train(state["model"], data, ctx, optimizer=state["optimizer"])
        return {}, state, stats.as_metrics()

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        return {}, server_state

    def personalized_model(self, state: ClientState, server_state: ServerState) -> nn.Module:
        return state["model"]
