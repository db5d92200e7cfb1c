"""Fitting the generator's sampler after federated training: where to draw z, how much noise.

Two measured weaknesses of sampling a VAE with z ~ N(0, I) and returning the decoder's
mean (issue: FedSSG generator): the prior N(0, I) is not where the encoder put the images
of a (class, device) cell (the "holes" of the aggregate posterior), and the mean has none of
the device's white acquisition noise, which the latent cannot hold. Both are fixed with
statistics each hospital computes once with the final global generator, on its own train
split, and uploads as sums (no image, no per-image value leaves it):

* **Latent cells** (ex-post density estimation, Ghosh et al. 2020): per class, the count,
  the sum of posterior means mu(x) and the sum of mu mu^T. The server pools the sums over
  the hospitals into a Gaussian per (class, device) cell. The cell covariance is shrunk
  towards the covariance pooled over every cell with weight L / (n + L) (L = latent size),
  so a cell of a few images still gets a usable full-rank Gaussian. A cell nobody holds
  (the plan's cross-device cells) uses its class pooled over devices: the encoder is
  conditioned on the device, so its latent describes the image, not the device.
* **Device noise**: per image and channel the robust noise estimate of Immerkaer (1996),
  1.4826 * median|x * M| / 6 with the Laplacian-difference kernel M, both of the real image
  and of its reconstruction. The sampler adds white noise of std
  sqrt(max(0, mean var_real - mean var_reconstruction)) per device: the high-frequency
  energy the decoder's mean lacks. The median ignores sparse edges, so a noise-free device
  gets (almost) no noise.

Upload size per hospital: C * (1 + L + L^2) + 3 * channels floats (2.2 KB at C=2, L=16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..protocol import ClientData
from .generator import ConditionalSampler, ConditionalVAE

__all__ = ["client_sampler_statistics", "fit_flow_noise", "fit_sampler", "robust_noise_variance"]

_MAD_TO_STD = 1.4826
_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_KERNEL_NORM = 6.0  # the L2 norm of _KERNEL: white noise of std s gives filtered std 6 s


def robust_noise_variance(images: torch.Tensor) -> torch.Tensor:
    """(N, C) squared Immerkaer-MAD noise std of images (N, C, H, W) in [0, 1]."""
    channels = images.shape[1]
    kernel = _KERNEL.to(images).view(1, 1, 3, 3).repeat(channels, 1, 1, 1)
    filtered = F.conv2d(images, kernel, groups=channels).flatten(2).abs()
    std = _MAD_TO_STD * filtered.median(dim=2).values / _KERNEL_NORM
    return std.pow(2)


@torch.no_grad()
def client_sampler_statistics(model: ConditionalVAE, data: ClientData, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """One hospital's sums (module docstring), from its train split and the global model."""
    model.eval()
    x, y = data.train_x, data.train_y
    latent, channels = model.latent_dim, model.in_channels
    count = torch.zeros(model.num_classes, dtype=torch.float64)
    total = torch.zeros(model.num_classes, latent, dtype=torch.float64)
    outer = torch.zeros(model.num_classes, latent, latent, dtype=torch.float64)
    noise = torch.zeros(2, channels, dtype=torch.float64)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        cond = model.condition(yb, torch.full_like(yb, int(data.device_id)))
        mu, _ = model.encode(xb, cond)
        mu = mu.double().cpu()
        onehot = F.one_hot(yb.cpu(), model.num_classes).double()
        count += onehot.sum(0)
        total += onehot.T @ mu
        outer += torch.einsum("nc,ni,nj->cij", onehot, mu, mu)
        noise[0] += robust_noise_variance(xb).double().sum(0).cpu()
        noise[1] += robust_noise_variance(model.decode(mu.float().to(xb.device), cond)).double().sum(0).cpu()
    return {"count": count, "sum": total, "outer": outer, "noise": noise, "device": torch.tensor(int(data.device_id))}


def _covariance(n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    mean = total / n.clamp(min=1.0)[..., None]
    return (outer - n[..., None, None] * mean[..., :, None] * mean[..., None, :]) / (n - 1.0).clamp(min=1.0)[..., None, None]


@torch.no_grad()
def fit_sampler(
    model: ConditionalVAE, clients: Sequence[ClientData], fit_latent: bool = True, device_noise: bool = True
) -> dict[str, Any]:
    """Pool every hospital's statistics and write the sampler buffers of ``model``."""
    stats = [client_sampler_statistics(model, c) for c in clients]
    n_cls, n_dev, latent = model.num_classes, model.num_devices, model.latent_dim
    count = torch.zeros(n_cls, n_dev, dtype=torch.float64)
    total = torch.zeros(n_cls, n_dev, latent, dtype=torch.float64)
    outer = torch.zeros(n_cls, n_dev, latent, latent, dtype=torch.float64)
    noise = torch.zeros(n_dev, 2, model.in_channels, dtype=torch.float64)
    for s in stats:
        d = int(s["device"])
        count[:, d] += s["count"]
        total[:, d] += s["sum"]
        outer[:, d] += s["outer"]
        noise[d] += s["noise"]
    summary: dict[str, Any] = {"latent_fitted": False, "device_noise_std": None}
    if fit_latent and count.sum() > latent:
        pooled = _covariance(count.sum((0, 1)), total.sum((0, 1)), outer.sum((0, 1)))
        class_n, class_total, class_outer = count.sum(1), total.sum(1), outer.sum(1)
        eye = torch.eye(latent, dtype=torch.float64)
        means = torch.zeros(n_cls, n_dev, latent, dtype=torch.float64)
        scales = torch.zeros(n_cls, n_dev, latent, latent, dtype=torch.float64)
        fitted = torch.zeros(n_cls, n_dev)
        for c in range(n_cls):
            for d in range(n_dev):
                n, t, o = (count[c, d], total[c, d], outer[c, d]) if count[c, d] > 0 else (class_n[c], class_total[c], class_outer[c])
                if n <= 0:
                    continue
                shrink = latent / (float(n) + latent)
                cov = (1.0 - shrink) * _covariance(n, t, o) + shrink * pooled
                means[c, d] = t / n
                scales[c, d] = torch.linalg.cholesky(cov + 1e-6 * eye)
                fitted[c, d] = 1.0
        model.latent_mean.copy_(means.float())
        model.latent_scale.copy_(scales.float())
        model.latent_fitted.copy_(fitted)
        summary["latent_fitted"] = True
        summary["latent_cells_with_own_data"] = int((count > 0).sum())
    if device_noise:
        images = count.sum(0).clamp(min=1.0)[:, None]
        extra = (noise[:, 0] - noise[:, 1]) / images
        model.noise_std.copy_(extra.clamp(min=0.0).sqrt().float())
        summary["device_noise_std"] = (model.noise_std * 255.0).round(decimals=2).tolist()
    summary["upload_floats_per_client"] = n_cls * (1 + latent + latent * latent) + 2 * model.in_channels + 1
    return summary


@torch.no_grad()
def fit_flow_noise(model: ConditionalSampler, clients: Sequence[ClientData], seed: int, per_device: int = 128) -> dict[str, Any]:
    """Device noise for the flow generator: the white noise its samples lack, per device.

    Each hospital uploads, per channel, the sum of the robust noise variance of its real
    train images and their class counts (C + channels floats, no per-image value). The server,
    which holds the generator, draws ``per_device`` samples per device in that device's class
    mix (from a generator seeded by ``seed``) and measures theirs; the flow then adds white
    noise of std sqrt(max(0, var_real - var_synthetic)) to that device's samples. Why the
    flow needs it at all: at the CPU sizes it smooths the white noise of the noisy device
    away (measured: high-frequency energy 0.07 against 0.15 for the real images).
    """
    n_dev, n_cls, channels = model.num_devices, model.num_classes, model.in_channels
    real = torch.zeros(n_dev, channels, dtype=torch.float64)
    images = torch.zeros(n_dev, dtype=torch.float64)
    class_counts = torch.zeros(n_dev, n_cls, dtype=torch.float64)
    for c in clients:
        d = int(c.device_id)
        real[d] += robust_noise_variance(c.train_x).double().sum(0).cpu()
        images[d] += c.train_x.shape[0]
        class_counts[d] += torch.bincount(c.train_y.cpu(), minlength=n_cls).double()
    model.noise_std.zero_()
    gen = torch.Generator().manual_seed(int(seed))
    extra = torch.zeros(n_dev, channels, dtype=torch.float64)
    for d in range(n_dev):
        if images[d] == 0:
            continue
        classes = torch.multinomial(class_counts[d].float(), per_device, replacement=True, generator=gen)
        synthetic = model.sample(classes, torch.full_like(classes, d), gen)
        extra[d] = real[d] / images[d] - robust_noise_variance(synthetic).double().mean(0)
    model.noise_std.copy_(extra.clamp(min=0.0).sqrt().float())
    return {
        "latent_fitted": False,
        "device_noise_std": (model.noise_std * 255.0).round(decimals=2).tolist(),
        "samples_per_device": int(per_device),
        "upload_floats_per_client": n_cls + channels + 1,
    }
