"""Federated training of the conditional generator: FedAvg over the hospitals' own images.

No real image leaves a client: each sampled hospital loads the broadcast generator into a
work copy, trains it for ``local_epochs`` on its OWN local training split (each image
conditioned on its label and the hospital's single imaging device), and uploads the
weights; the server replaces the global generator by the mean of the uploads weighted by
the clients' training-set sizes (``training.weighted_average``, never uniform).

Why through the project's runner: ``FedAvgGenerator`` is a ``FederatedAlgorithm`` run by
``simulation.run_simulation``, so client sampling, seeded per-(round, client) batch
streams, validation before the first round, per-round log lines and the exact bytes up
and down are the same machinery as every classifier method. The runner's evaluation
hooks assume a classifier, so ``train_generator_federated`` passes no global test set and
``evaluate_personalized=False`` (quality is measured separately, by ``quality.py``).
The round itself is ``algorithms.fedavg.FedAvgExchange`` (the classifiers' FedAvg
exchange); this module adds only the generator's local update (the VAE's ELBO or the flow's
velocity regression) and the row-weighted embeddings.
It is deliberately NOT registered in ``algorithms.ALGORITHMS``: it is not a classification
method and must not appear in the method comparisons.

Interpretations (recorded in the training summary):
* only the local TRAIN split is used: a hospital's validation/test images never shape the
  generator, so no synthetic sample can be a near-copy of an image some test set holds;
* the optimizer (Adam by default) is created afresh every round, as FedAvg does for SGD:
  optimizer state never travels and would be stale after aggregation;
* embedding rows are averaged per row (``row_weighted_embeddings``, default on): the row of
  device d (class c) is the mean over the clients weighted by how many of their images
  have device d (class c), not by their total size. Why: a device row only receives
  gradients at the hospitals that own that device, so plain FedAvg dilutes its update by
  the other hospitals' weight every round (device 0 was owned by 11% of the training
  images, so its embedding moved at a ninth of the speed). The counts travel with the
  upload (a few floats, counted in the bytes); they are the same class x device counts
  a client reports for the synthesis plan. Every other tensor is plain FedAvg;
* the reparameterisation noise is drawn from a generator seeded by (seed, round, client,
  tag), separate from the batch-order stream, so everything is reproducible for a seed
  (and thread count) on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import iterate_batches, make_generator, round_generator
from ..algorithms.fedavg import FedAvgExchange
from ..protocol import ClientData, ClientState, ConfigurationError, DataSpec, Metrics, Payload, RoundContext
from ..protocol import ServerState, reject_unknown_keys
from ..simulation import SimulationConfig, run_simulation
from ..training import make_optimizer, payload_to_state, state_to_payload, weighted_average
from .flow import ConditionalFlow, flow_matching_loss
from .generator import RECON_LOSSES, ConditionalSampler, ConditionalVAE, build_generator, vae_loss
from .sampler import fit_flow_noise, fit_sampler

#: Upload entries with the client's per-class and per-device sample counts (row weights).
CLASS_COUNTS = "__counts__.class"
DEVICE_COUNTS = "__counts__.device"

__all__ = ["FedAvgGenerator", "GeneratorTrainingConfig", "GeneratorTrainingResult", "train_generator_federated"]

logger = logging.getLogger(__name__)

#: Purpose tag of the reparameterisation-noise stream (data.py uses 1 and 2).
VAE_NOISE = 11


@dataclass(frozen=True)
class GeneratorTrainingConfig:
    """Hyper-parameters of the generator and its federated training (see the module docstring).

    ``kl_warmup_rounds``: beta rises linearly from beta/R_w to beta over the first R_w
    rounds (0 = constant beta), a common guard against the KL term switching the latent
    off before the decoder has learnt anything.
    """

    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 64
    lr: float = 2.0e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    join_ratio: float = 1.0
    beta: float = 1.0
    kl_warmup_rounds: int = 0
    recon_loss: str = "mse"
    obs_sigma: float = 0.06
    row_weighted_embeddings: bool = True
    fit_latent: bool = False
    device_noise: bool = False
    cond_dropout: float = 0.0
    model_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_options", dict(self.model_options or {}))
        checks = [
            (isinstance(self.rounds, int) and self.rounds >= 0, f"rounds must be an integer >= 0, got {self.rounds!r}."),
            (isinstance(self.local_epochs, int) and self.local_epochs >= 1, f"local_epochs must be >= 1, got {self.local_epochs!r}."),
            (isinstance(self.batch_size, int) and self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size!r}."),
            (math.isfinite(float(self.lr)) and float(self.lr) > 0, f"lr must be > 0, got {self.lr!r}."),
            (0.0 < float(self.join_ratio) <= 1.0, f"join_ratio must be in (0, 1], got {self.join_ratio!r}."),
            (float(self.beta) >= 0.0, f"beta must be >= 0, got {self.beta!r}."),
            (isinstance(self.kl_warmup_rounds, int) and self.kl_warmup_rounds >= 0, "kl_warmup_rounds must be an integer >= 0."),
            (self.recon_loss in RECON_LOSSES, f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}."),
            (float(self.obs_sigma) > 0.0, f"obs_sigma must be > 0, got {self.obs_sigma!r}."),
            (float(self.weight_decay) >= 0.0, f"weight_decay must be >= 0, got {self.weight_decay!r}."),
            (0.0 <= float(self.cond_dropout) < 1.0, f"cond_dropout must be in [0, 1), got {self.cond_dropout!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"synthetic.generator: {message}")
        for flag in ("row_weighted_embeddings", "fit_latent", "device_noise"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"synthetic.generator: {flag} must be true or false.")
        for name in ("lr", "join_ratio", "beta", "obs_sigma", "weight_decay", "cond_dropout"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> GeneratorTrainingConfig:
        """From the ``synthetic.generator`` parameter block; unknown keys are errors."""
        reject_unknown_keys(params, list(cls.__dataclass_fields__), "synthetic.generator")
        return cls(**dict(params))

    def beta_at(self, round_idx: int) -> float:
        if self.kl_warmup_rounds <= 0:
            return self.beta
        return self.beta * min(1.0, (round_idx + 1) / self.kl_warmup_rounds)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.model_options).items()}
        return out


class FedAvgGenerator(FedAvgExchange):
    """FedAvg of a generator (the VAE or the flow): FedAvg's exchange (stateless clients, full
    state_dict down and up) with the architecture's local loss and row-weighted embeddings
    (module docstring)."""

    name = "fedavg_generator"

    def __init__(self, config: GeneratorTrainingConfig, spec: DataSpec, num_devices: int) -> None:
        self.config = config
        self.spec = spec
        self.num_devices = int(num_devices)
        self._scratch: nn.Module | None = None
        probe = build_generator(spec, self.num_devices, seed=0, **config.model_options)  # bad options fail now
        if not isinstance(probe, ConditionalVAE) and config.fit_latent:
            raise ConfigurationError(
                "synthetic.generator: fit_latent refits the VAE's latent sampler; the flow_matching generator has no "
                "latent. Set it to false, or use model_options.architecture: vae."
            )
        if isinstance(probe, ConditionalVAE) and config.cond_dropout > 0:
            raise ConfigurationError(
                "synthetic.generator: cond_dropout trains the flow_matching generator's unconditional velocity for "
                "guidance; the VAE has none. Set it to 0, or use model_options.architecture: flow_matching."
            )

    def new_model(self, seed: int) -> nn.Module:
        """NHWC weights (``channels_last``, as in federated training): 1.2x faster convolutions on the CPU."""
        model = build_generator(self.spec, self.num_devices, seed=seed, **self.config.model_options)
        return model.to(self.device, memory_format=torch.channels_last)

    def scratch_model(self) -> nn.Module:
        if self._scratch is None or next(self._scratch.parameters()).device != self.device:
            self._scratch = self.new_model(0)
        return self._scratch

    def local_update(
        self, model: nn.Module, state: ClientState, data: ClientData, payload: Payload, ctx: RoundContext
    ) -> tuple[Payload, ClientState, Metrics]:
        c = self.config
        model.train()
        optimizer = make_optimizer(model.parameters(), c.optimizer, c.lr, weight_decay=c.weight_decay)
        batches = round_generator(ctx.seed, ctx.round, data.client_id)
        noise_gen = make_generator(ctx.seed, ctx.round, data.client_id, VAE_NOISE)
        beta = c.beta_at(ctx.round)
        x, y = data.train_x, data.train_y
        sums: dict[str, float] = {}
        seen = steps = 0
        for _ in range(c.local_epochs):
            for xb, yb in iterate_batches(x, y, c.batch_size, batches):
                devices = torch.full_like(yb, int(data.device_id))
                loss, parts = self._loss(model, xb, yb, devices, noise_gen, beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = int(yb.shape[0])
                for key, value in {"loss": loss.detach(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * n
                seen += n
                steps += 1
        metrics = {key: total / max(seen, 1) for key, total in sums.items()}
        metrics.update({"beta": beta, "num_samples": float(seen), "num_steps": float(steps)})
        upload = state_to_payload(model)
        if c.row_weighted_embeddings:
            # the flow's tables end with a "no condition" row that every image may train
            class_rows, device_rows = model.class_embedding.num_embeddings, model.device_embedding.num_embeddings
            upload[CLASS_COUNTS] = torch.bincount(y.cpu(), minlength=class_rows).to(torch.float32)
            upload[DEVICE_COUNTS] = torch.zeros(device_rows, dtype=torch.float32)
            upload[DEVICE_COUNTS][int(data.device_id)] = float(y.shape[0])
            if class_rows > model.num_classes:
                upload[CLASS_COUNTS][-1] = upload[DEVICE_COUNTS][-1] = float(y.shape[0])
        return upload, state, metrics

    def _loss(
        self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, devices: torch.Tensor, noise_gen: torch.Generator, beta: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The architecture's training loss and its logged parts (VAE: recon and KL; flow: none)."""
        if isinstance(model, ConditionalFlow):
            return flow_matching_loss(model, xb, yb, devices, noise_gen, self.config.cond_dropout), {}
        noise = torch.randn((yb.shape[0], model.latent_dim), generator=noise_gen).to(xb.device)
        c = self.config
        loss, rec, kl = vae_loss(model, xb, yb, devices, noise, beta=beta, recon=c.recon_loss, obs_sigma=c.obs_sigma)
        return loss, {"recon": rec, "kl": kl}

    def aggregate(
        self, server_state: ServerState, uploads: list[tuple[Payload, int]], ctx: RoundContext
    ) -> tuple[Payload, ServerState]:
        model = server_state["model"]
        keys = list(model.state_dict())
        mean = weighted_average(uploads, keys=keys)
        if self.config.row_weighted_embeddings:
            current = model.state_dict()
            for key, counts_key in (("class_embedding.weight", CLASS_COUNTS), ("device_embedding.weight", DEVICE_COUNTS)):
                mean[key] = _row_weighted_mean([(u[key], u[counts_key]) for u, _ in uploads], current[key])
        payload_to_state(model, mean)
        return mean, server_state


def _row_weighted_mean(pairs: list[tuple[torch.Tensor, torch.Tensor]], current: torch.Tensor) -> torch.Tensor:
    """Row r = sum_k n_kr W_k[r] / sum_k n_kr over the uploads; rows nobody trained keep ``current``."""
    weights = torch.stack([n.double().to(current.device) for _, n in pairs])  # (K, rows)
    stacked = torch.stack([w.double().to(current.device) for w, _ in pairs])  # (K, rows, dim)
    total = weights.sum(dim=0)
    out = (weights[:, :, None] * stacked).sum(dim=0) / total.clamp(min=1.0)[:, None]
    return torch.where(total[:, None] > 0, out, current.double()).to(current.dtype)


@dataclass
class GeneratorTrainingResult:
    """The trained generator and what its training did (JSON-ready ``summary``)."""

    model: ConditionalSampler
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def _check_devices(clients: Sequence[ClientData], num_devices: int, held_out_device: int | None) -> None:
    bad = [(c.client_id, c.device_id) for c in clients if not 0 <= int(c.device_id) < num_devices]
    if bad:
        raise ConfigurationError(
            f"Clients with a device id outside [0, {num_devices - 1}] (client, device): {bad}. Re-run data_partition, "
            "or pass num_devices = the number of device profiles."
        )
    if held_out_device is not None:
        leaking = [c.client_id for c in clients if int(c.device_id) == int(held_out_device)]
        if leaking:
            raise ConfigurationError(
                f"Clients {leaking} hold the held-out device {held_out_device}; the partition is inconsistent with "
                "devices.held_out. Re-run data_partition."
            )


def train_generator_federated(
    clients: Sequence[ClientData],
    spec: DataSpec,
    num_devices: int,
    config: GeneratorTrainingConfig,
    seed: int,
    held_out_device: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
) -> GeneratorTrainingResult:
    """Train the generator by FedAvg over ``clients`` for ``config.rounds`` rounds.

    Each client's ``device_id`` is the imaging device of all its images. With
    ``config.rounds == 0`` the initial (untrained) generator is returned; the synthetic
    stage uses that when it is disabled. Raises ConfigurationError before any training
    when devices or the config are invalid.
    """
    _check_devices(clients, int(num_devices), held_out_device)
    algorithm = FedAvgGenerator(config, spec, num_devices)
    if config.rounds == 0:
        algorithm.to(device)
        server_state, _ = algorithm.init_server(seed)
        model = server_state["model"].cpu().eval()
        return GeneratorTrainingResult(model, [], {"rounds": 0, "trained": False, "config": config.as_dict(), "seed": seed})
    sim = SimulationConfig(
        num_rounds=config.rounds,
        join_ratio=config.join_ratio,
        seed=int(seed),
        device=device,
        amp="off",
        eval_every=config.rounds,
        evaluate_global=False,  # a generator, not a classifier: nothing to validate or select
        evaluate_personalized=False,
        num_threads=num_threads,
    )
    result = run_simulation(algorithm, clients, spec, sim)
    history = [
        {
            "round": r["round"],
            "sampled": r["sampled"],
            "loss": r["train_loss"],
            "recon": _weighted(r, "recon"),
            "kl": _weighted(r, "kl"),
            "beta": r["client_metrics"][0]["beta"] if r["client_metrics"] else None,
            "bytes_up_total": r["bytes_up_total"],
            "bytes_down_total": r["bytes_down_total"],
            "train_time_s": r["train_time_s"],
        }
        for r in result.history
    ]
    totals = result.totals()
    model = result.global_model()
    sampler = None
    if isinstance(model, ConditionalFlow) and config.device_noise:
        sampler = fit_flow_noise(model, clients, seed=int(seed))
    elif config.fit_latent or config.device_noise:
        sampler = fit_sampler(model, clients, config.fit_latent, config.device_noise)
    summary = {
        "trained": True,
        "rounds": config.rounds,
        "seed": int(seed),
        "config": config.as_dict(),
        "clients": [{"client_id": c.client_id, "device_id": int(c.device_id), "num_train": c.num_train} for c in clients],
        "bytes_up_total": totals["bytes_up_total"],
        "bytes_down_total": totals["bytes_down_total"],
        "final_loss": history[-1]["loss"],
        "final_recon": history[-1]["recon"],
        "final_kl": history[-1]["kl"],
        "wall_time_s": result.wall_time_s,
        "sampler": sampler,
        "data_used": "each client's local train split only (never val/test)",
    }
    return GeneratorTrainingResult(model.cpu().eval(), history, summary)


def _weighted(record: Mapping[str, Any], key: str) -> float | None:
    metrics = record["client_metrics"]
    total = sum(m["num_train"] for m in metrics)
    if not metrics or total == 0 or any(key not in m for m in metrics):
        return None
    return float(sum(m[key] * m["num_train"] for m in metrics) / total)
