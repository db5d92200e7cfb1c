"""Client-level differential privacy for federated averaging (DP-FedAvg, McMahan et al. 2018).

What is protected: the *whole dataset of one hospital*. Neighbouring federations differ by
one hospital being present or absent; every model update that leaves a hospital is a
randomised function of its data whose influence is bounded, so whatever the server, an
eavesdropper or a user of the released model learns is (epsilon, delta)-DP with respect
to that hospital. A round of DP-FedAvg:

1. each sampled hospital computes its update D_k = W_local - W_global over every floating
   entry that would travel (weights and BatchNorm running statistics) and scales it to
   L2 norm at most ``clip_norm`` C: ``clip_update``;
2. the Gaussian mechanism adds N(0, (noise_multiplier * C)^2) to every coordinate, either
   on each hospital before it uploads (``placement: client``, "local" DP: the server is
   not trusted, and the mean carries sqrt(m) times more noise) or once on the server, on
   the sum of the clipped updates (``placement: server``, "central" DP, as in DP-FedAvg:
   the server is trusted to add it, and re-clips every update it receives so the bound
   holds whatever a client sent);
3. the server adds the *uniform* mean over the m sampled hospitals to the global model.
   Uniform, not weighted by sample counts: a weight n_k / n would let a large hospital
   move the model by more than C, which is exactly the influence clipping bounds. With
   equal sizes, noise 0 and a clip that never binds, the result is FedAvg's.

Accounting: each round is one sampled Gaussian mechanism with sampling rate
q = m / K (clients per round / hospitals) and multiplier ``noise_multiplier``; Opacus'
``RDPAccountant`` composes T rounds and converts to (epsilon, delta). The engine samples a
fixed number of hospitals without replacement; it is accounted as Poisson sampling with
the same rate, the usual approximation in DP-FedAvg practice. ``target_epsilon`` instead
of a multiplier: the smallest multiplier whose epsilon after the run's T rounds is within
0.01 below the target (Opacus' ``get_noise_multiplier``). ``delta`` defaults to 1e-5: the
protected unit is a hospital, so delta must be far below 1 / K (a mechanism that publishes
one random hospital's data whole is (0, 1/K)-DP); 1e-5 is that for any federation under
~10^5 hospitals, and a delta >= 1 / K is refused. (The record-level convention
delta = 1 / total samples would also qualify here, but it ties the guarantee to dataset size.)

What is *not* covered: the metrics the hospitals report in the clear (training loss and
accuracy, validation confusion counts, ``num_train``), and the clip indicator
``dp/clipped`` they report for tuning C. Those travel beside the updates, as in every
method of this project; a deployment that needs them private must drop or noise them.

Post-processing keeps the guarantee: anything computed from the noisy updates alone (the
mean, FedMIC's SVD of a noised update and its error-feedback residual, clamping a
BatchNorm variance that noise made negative back to 0) is still (epsilon, delta)-DP.

Noise is drawn from seeded CPU generators (run seed, round, hospital, purpose), so a DP run
is reproducible and resumable like every other run. torch + numpy + Opacus' accountant
(imported only when a budget is computed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import make_generator
from .protocol import ConfigurationError, Metrics, Payload, RoundContext, reject_unknown_keys

__all__ = [
    "DEFAULT_DELTA",
    "PLACEMENTS",
    "ClientLevelDP",
    "DPConfig",
    "PrivacySpent",
    "calibrate_noise_multiplier",
    "clip_update",
    "epsilon_per_round",
    "gaussian_noise_like",
    "nonnegative_variances",
    "privacy_of_run",
    "rdp_epsilon",
    "sampling_rate",
    "update_norm",
]

PLACEMENTS: tuple[str, ...] = ("client", "server")
DEFAULT_DELTA = 1e-5
#: Absolute tolerance of the calibration: epsilon lands in [target - 0.01, target].
CALIBRATION_TOLERANCE = 0.01
#: Purpose tags of the noise streams (see ``data.round_generator``).
_CLIENT_NOISE = 0xD1
_SERVER_NOISE = 0xD5
#: The "client id" of the server's noise stream (the pooled client is -1).
_SERVER_STREAM = -7
#: BatchNorm buffers whose value can never be negative (post-processing clamps them).
_VARIANCE_SUFFIX = "running_var"


# ---- configuration ----------------------------------------------------------------------------

def _number(value: Any, name: str) -> float:
    """A finite-or-not float from YAML, which reads ``1e-5`` as the string '1e-5'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigurationError(f"dp.{name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise ConfigurationError(f"dp.{name} must be a number, got the string {value!r}.") from None
    if math.isnan(number):
        raise ConfigurationError(f"dp.{name} must be a number, got {value!r}.")
    return number


@dataclass(frozen=True)
class DPConfig:
    """The ``dp`` block of a method's parameters (see the module docstring).

    ``clip_norm`` 0.5: the L2 norm of the student's update on the default partition is
    0.3-0.5 after the first round of plain FedAvg (13.7 in the first, when BatchNorm's
    running statistics jump from their initial 0 / 1 to the data's; the weights alone move
    by 0.01-0.12). Under DP the global statistics lag, every BatchNorm update stays above
    it and the clip alone stalls training (docs/results/privacy.md); with GroupNorm it
    rarely binds. Give ``noise_multiplier`` or ``target_epsilon``, not both.
    """

    placement: str = "server"
    clip_norm: float = 0.5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_params(cls, params: Any) -> DPConfig:
        """The validated config of a ``dp`` mapping; unknown keys and bad values are refused."""
        if isinstance(params, DPConfig):
            return params
        if not isinstance(params, Mapping):
            raise ConfigurationError(
                f"dp must be a mapping with the keys {', '.join(f.name for f in dataclasses.fields(cls))}, got {params!r}."
            )
        reject_unknown_keys(params, [f.name for f in dataclasses.fields(cls)], "dp")
        values: dict[str, Any] = dict(params)
        if "placement" in values and not isinstance(values["placement"], str):
            raise ConfigurationError(f"dp.placement must be one of {', '.join(PLACEMENTS)}, got {values['placement']!r}.")
        for name in ("clip_norm", "delta"):
            if name in values:
                values[name] = _number(values[name], name)
        for name in ("noise_multiplier", "target_epsilon"):
            if values.get(name) is not None:
                values[name] = _number(values[name], name)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigurationError(
                f"dp.placement must be 'client' (each hospital noises its own update) or 'server' "
                f"(the server noises the sum once), got {self.placement!r}."
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigurationError(
                f"dp.clip_norm must be a finite number > 0 (the L2 bound of each hospital's update, e.g. 0.5), got {self.clip_norm}."
            )
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigurationError(
                "dp needs exactly one of noise_multiplier (the Gaussian noise std as a multiple of clip_norm) and "
                f"target_epsilon (the multiplier is then calibrated for the run), got noise_multiplier="
                f"{self.noise_multiplier} and target_epsilon={self.target_epsilon}: set exactly one of them."
            )
        if self.noise_multiplier is not None and not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigurationError(f"dp.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}.")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ConfigurationError(f"dp.target_epsilon must be a finite number > 0 (e.g. 1, 4, 8), got {self.target_epsilon}.")
        if not 0.0 < self.delta < 1.0:
            raise ConfigurationError(f"dp.delta must be in (0, 1), far below 1 / number of hospitals (default 1e-5), got {self.delta}.")

    def to_params(self) -> dict[str, Any]:
        """Flat ``dp.<key>`` entries for ``describe()`` (MLflow's ``resolved.dp.*``)."""
        return {f"dp.{key}": value for key, value in dataclasses.asdict(self).items()}


# ---- clipping and noise ------------------------------------------------------------------------

def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all entries of ``update`` together, accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Payload, float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (unchanged when already within it),
    and its norm before clipping."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return {k: v.detach().clone() for k, v in update.items()}, norm
    return {k: (v.detach().double() * scale).to(v.dtype) for k, v in update.items()}, norm


def gaussian_noise_like(update: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Payload:
    """Independent N(0, std^2) for every coordinate of ``update``, drawn on the CPU from
    ``generator`` (the same numbers on every device) in the update's key order."""
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=torch.float64) * std).to(device=v.device, dtype=v.dtype)
        for k, v in update.items()
    }


def nonnegative_variances(state: Payload) -> Payload:
    """BatchNorm running variances that noise pushed below 0, set to 0 (post-processing)."""
    return {k: v.clamp_min(0.0) if k.endswith(_VARIANCE_SUFFIX) and v.is_floating_point() else v for k, v in state.items()}


# ---- accounting ---------------------------------------------------------------------------------

def sampling_rate(clients_per_round: int | None, num_clients: int | None) -> float:
    """q = m / K, or 1.0 (no amplification, the safe side) when either is unknown."""
    if not clients_per_round or not num_clients:
        return 1.0
    return min(1.0, clients_per_round / num_clients)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` sampled Gaussian mechanisms (Opacus' RDPAccountant); 0 for no
    round, infinity without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(accountant.get_epsilon(delta=delta))


def epsilon_per_round(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> list[float]:
    """Epsilon spent after each of rounds 1 .. ``rounds``."""
    return [rdp_epsilon(noise_multiplier, sample_rate, t, delta) for t in range(1, rounds + 1)]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest multiplier (to Opacus' search tolerance) whose epsilon after ``rounds``
    rounds is at most ``target_epsilon`` and within ``CALIBRATION_TOLERANCE`` of it."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds,
            accountant="rdp", epsilon_tolerance=CALIBRATION_TOLERANCE,
        ))  # fmt: skip
    except ValueError as exc:
        raise ConfigurationError(
            f"dp.target_epsilon {target_epsilon} cannot be reached over {rounds} rounds at sampling rate "
            f"{sample_rate:.3g} and delta {delta:g} ({exc}): raise target_epsilon or delta, or run fewer rounds."
        ) from None


@dataclass(frozen=True)
class PrivacySpent:
    """The budget of a run: what was configured, what it resolved to, what was spent."""

    placement: str
    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    delta: float
    rounds: int
    epsilon: float
    epsilon_per_round: tuple[float, ...]
    target_epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["epsilon_per_round"] = list(self.epsilon_per_round)
        return out


# ---- the mechanism the algorithms call -----------------------------------------------------------

class ClientLevelDP:
    """Clip, noise and account the updates of one method (see the module docstring).

    The hooks an algorithm calls: ``privatize`` on each hospital's dense update before it
    is encoded or uploaded, ``combine`` on the server instead of the weighted mean, and
    ``spent`` after each aggregation (the server state keeps the result, so checkpoints
    and resumed runs carry it). The noise multiplier is resolved on first use from the
    round's context (T = ``num_rounds``, q = sampled / hospitals) and cached: it is a pure
    function of those and the config, identical on the server and every client.
    """

    def __init__(self, config: DPConfig) -> None:
        self.config = config
        self._multipliers: dict[tuple[float, int], float] = {}

    @staticmethod
    def rate(ctx: RoundContext) -> float:
        return sampling_rate(len(ctx.sampled) if ctx.sampled else None, ctx.num_clients)

    def noise_multiplier(self, ctx: RoundContext) -> float:
        """The configured multiplier, or the one calibrated to ``target_epsilon`` for this run."""
        c = self.config
        if ctx.num_clients and c.delta >= 1.0 / ctx.num_clients:
            raise ConfigurationError(
                f"dp.delta {c.delta:g} is not below 1 / {ctx.num_clients} hospitals: a mechanism that publishes one "
                "random hospital's data whole meets it. Use a delta far below 1 / number of hospitals (default 1e-5)."
            )
        if c.noise_multiplier is not None:
            return c.noise_multiplier
        key = (self.rate(ctx), ctx.num_rounds)
        if key not in self._multipliers:
            self._multipliers[key] = calibrate_noise_multiplier(c.target_epsilon, c.delta, key[0], key[1])  # type: ignore[arg-type]
        return self._multipliers[key]

    def privatize(self, update: Mapping[str, torch.Tensor], ctx: RoundContext, client_id: int) -> tuple[Payload, Metrics]:
        """A hospital's dense update clipped to ``clip_norm``, plus its own noise under the
        client placement; the metric ``dp/clipped`` says whether the clip bound."""
        c = self.config
        sigma = self.noise_multiplier(ctx)
        clipped, norm = clip_update(update, c.clip_norm)
        if c.placement == "client" and sigma > 0:
            noise = gaussian_noise_like(clipped, sigma * c.clip_norm, make_generator(ctx.seed, ctx.round, client_id, _CLIENT_NOISE))
            clipped = {k: v + noise[k] for k, v in clipped.items()}
        return clipped, {"dp/clipped": float(norm > c.clip_norm)}

    def combine(self, updates: Sequence[Mapping[str, torch.Tensor]], ctx: RoundContext, keys: Iterable[str] | None = None) -> Payload:
        """The uniform mean of the hospitals' updates (over ``keys``, default the first's);
        under the server placement each is re-clipped first and the sum gets the noise once."""
        if not updates:
            raise ValueError("Cannot combine zero updates.")
        c = self.config
        names = list(updates[0]) if keys is None else list(keys)
        central = c.placement == "server"
        total = {k: torch.zeros(updates[0][k].shape, dtype=torch.float64, device=updates[0][k].device) for k in names}
        for update in updates:
            part = clip_update({k: update[k] for k in names}, c.clip_norm)[0] if central else update
            for k in names:
                total[k] += part[k].to(device=total[k].device, dtype=torch.float64)
        sigma = self.noise_multiplier(ctx)
        if central and sigma > 0:
            generator = make_generator(ctx.seed, ctx.round, _SERVER_STREAM, _SERVER_NOISE)
            noise = gaussian_noise_like(total, sigma * c.clip_norm, generator)
            total = {k: v + noise[k] for k, v in total.items()}
        dtype = {k: updates[0][k].dtype for k in names}
        return {k: (v / len(updates)).to(dtype[k]) for k, v in total.items()}

    def spent(self, ctx: RoundContext, earlier: Mapping[str, Any] | None = None) -> PrivacySpent:
        """The budget after round ``ctx.round`` (0-based) of this run; ``earlier``: the
        previous round's ``PrivacySpent.as_dict()`` (the server state's), whose per-round
        epsilons are kept instead of recomputed."""
        c = self.config
        sigma = self.noise_multiplier(ctx)
        q = self.rate(ctx)
        kept = list((earlier or {}).get("epsilon_per_round") or [])
        if len(kept) != ctx.round:
            kept = epsilon_per_round(sigma, q, ctx.round, c.delta)
        per_round = [*kept, rdp_epsilon(sigma, q, ctx.round + 1, c.delta)]
        return PrivacySpent(
            placement=c.placement, clip_norm=c.clip_norm, noise_multiplier=sigma, sample_rate=q, delta=c.delta,
            rounds=ctx.round + 1, epsilon=per_round[-1], epsilon_per_round=tuple(per_round), target_epsilon=c.target_epsilon,
        )  # fmt: skip


def privacy_of_run(dp_params: Mapping[str, Any], clients_per_round: int | None, num_clients: int | None, rounds: int, planned_rounds: int | None = None) -> PrivacySpent:
    """The budget of a finished run from what its summary records (the method's ``dp.*``
    parameters, the hospitals sampled per round, their number, the rounds run and planned):
    the same numbers the run's server state holds, for the tracking and audit layers."""
    config = DPConfig.from_params(dp_params)
    q = sampling_rate(clients_per_round, num_clients)
    planned = planned_rounds or rounds
    if config.noise_multiplier is not None:
        sigma = config.noise_multiplier
    else:
        sigma = calibrate_noise_multiplier(config.target_epsilon, config.delta, q, planned)  # type: ignore[arg-type]
    per_round = epsilon_per_round(sigma, q, rounds, config.delta)
    return PrivacySpent(
        placement=config.placement, clip_norm=config.clip_norm, noise_multiplier=sigma, sample_rate=q, delta=config.delta,
        rounds=rounds, epsilon=per_round[-1] if per_round else 0.0, epsilon_per_round=tuple(per_round),
        target_epsilon=config.target_epsilon,
    )  # fmt: skip
