"""A (class, device)-conditional flow-matching UNet: the sharper alternative to the VAE.

Why flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023): the VAE's samples
are its decoder's mean, so the fine texture that tells a sharp scanner from a blurred one is
lost (measured: FD 99-123 on the two sharp devices against 1.5-6 on the noisy and blurred
ones, k-NN recall 0.23). A flow model integrates a learnt velocity field from Gaussian noise
to the data, so it draws the texture and the acquisition noise instead of averaging them
out, and its objective is one plain regression, stable under FedAvg with small clients
(unlike a GAN's two-player game). Its price is compute: every training step and every
sampling step is a full UNet pass, which on this 2-core CPU is minutes rather than the VAE's
seconds (docs/results/fedssg/generators.md has the figures side by side).

Objective: a data image x1 (scaled to [-1, 1]), noise x0 ~ N(0, I) and a time t ~ U(0, 1)
give the point x_t = (1 - t) x0 + t x1 on the straight path between them; the network
v(x_t, t, class, device) regresses the path's velocity x1 - x0 (mean squared error over
pixels). Sampling integrates dx/dt = v from t = 0 to 1 with Heun's second-order method in
``sample_steps`` steps (2 network passes per step but the last), starting from noise of std
``temperature``; the result is clamped to [0, 1].

Classifier-free guidance (Ho & Salimans 2022): with probability ``cond_dropout`` a training
image's (class, device) is replaced by a learnt "no condition" pair (the last row of each
embedding table), so the one network also learns the unconditional velocity; sampling with
``guidance`` w > 1 follows v_null + w (v_cond - v_null), which strengthens what the condition
changes (the device's noise and blur, the class's findings) at the cost of diversity and of
twice the network passes. Why it matters here: every hospital owns ONE device, so a client
never sees two devices side by side and FedAvg averages device-specific drift of the shared
weights into a mixture (measured: noisy-looking samples for the sharp scanner, smooth ones
for the noisy clinic at w = 1).

``guidance_on`` says what the guidance strengthens. ``class_and_device`` (the first design):
training drops both labels together and the guided direction is v(c, d) - v(none, none), so
the device's acquisition character is amplified w times along with the finding (measured at
w = 6: the normal samples of the high-contrast device are blotchy, and a classifier trained
on the samples recalls 0.59 of that device's real pneumonia). ``class``: training drops the
class label only, keeping the device, and sampling follows
v(none, d) + w (v(c, d) - v(none, d)): the finding is strengthened within the device, whose
character stays at the conditional model's strength (the device-noise top-up restores its
noise either way). Measured, ``class`` is worse (docs/results/fedssg/guidance_target.md:
validation FD 17.9 at its best guidance against 13.6): unguided, the high-contrast device's
samples lose its contrast, so the device guidance is what makes that device recognisable.

Device noise (``synthetic.generator.device_noise``, ``sampler.fit_flow_noise``): at the CPU
sizes the flow smooths a noisy device's white noise away (high-frequency energy of its
samples 0.07 against 0.15 for the real images), so after training the server measures, per
device, the robust noise variance of its own samples against the hospitals' summed real
ones and tops the samples up with white noise of the difference.

Network at 28x28 (widths (w1, w2), default (16, 32), about 0.1M parameters for one channel):
conv3x3 -> ResBlock(w1) @28 -> stride-2 conv -> ResBlock(w1 -> w2) @14 -> stride-2 conv ->
ResBlock(w2) @7 -> nearest x2 + skip -> ResBlock(2 w2 -> w2) @14 -> nearest x2 + skip ->
ResBlock(w2 + w1 -> w1) @28 -> GroupNorm, SiLU, conv3x3 (zero-initialised, so the first
velocity is 0). Every ResBlock is GroupNorm, SiLU, conv3x3, FiLM(condition), GroupNorm, SiLU,
conv3x3 plus its input. The condition is MLP([sinusoidal(t), E_class, E_device]) and
drives the FiLM layers as in the VAE (``generator.FiLM``), so class and device factor
apart the same way. GroupNorm rather than BatchNorm: it keeps no running statistics, so
FedAvg averages only weights. Nearest-neighbour upsampling followed by a 3x3 conv, never a
transposed conv: no checkerboard (Odena et al. 2016). Any image size divisible by 4 and
1 or 3 channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..protocol import ConfigurationError
from .generator import ConditionalSampler, FiLM

__all__ = ["ConditionalFlow", "FLOW_ARCHITECTURE", "GUIDANCE_TARGETS", "flow_matching_loss"]

#: ``guidance_on`` option -> which labels classifier-free guidance drops (module docstring).
GUIDANCE_TARGETS = ("class_and_device", "class")

FLOW_ARCHITECTURE = "conditional_flow"
_TIME_FEATURES = 32


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3-FiLM-GroupNorm-SiLU-conv3x3 plus a (1x1 when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = FiLM(cond_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.film(self.conv1(F.silu(self.norm1(x))), cond)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _time_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (frequencies 1 ... 1000, as in transformer positions)."""
    half = _TIME_FEATURES // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(1000.0) / (half - 1)))
    angles = 1000.0 * t[:, None].float() * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ConditionalFlow(ConditionalSampler):
    """The (class, device)-conditional velocity UNet described in the module docstring."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_devices: int,
        image_size: int = 28,
        widths: tuple[int, int] = (16, 32),
        embed_dim: int = 32,
        sample_steps: int = 16,
        guidance: float = 1.0,
        guidance_on: str = "class_and_device",
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ConfigurationError(f"The generator needs an image size divisible by 4, got {image_size}.")
        if guidance_on not in GUIDANCE_TARGETS:
            raise ConfigurationError(f"generator option guidance_on must be one of {', '.join(GUIDANCE_TARGETS)}, got {guidance_on!r}.")
        self.guidance_on = guidance_on
        if num_devices < 1 or num_classes < 2 or embed_dim < 1 or sample_steps < 1 or not guidance > 0:
            raise ConfigurationError(
                f"Bad flow generator sizes: num_devices={num_devices}, num_classes={num_classes}, "
                f"embed_dim={embed_dim}, sample_steps={sample_steps}, guidance={guidance}."
            )
        w1, w2 = (int(w) for w in widths)
        self.in_channels, self.num_classes, self.num_devices = in_channels, num_classes, num_devices
        self.image_size, self.sample_steps, self.guidance = image_size, int(sample_steps), float(guidance)
        cond_dim = 2 * embed_dim
        # one extra row each: the "no condition" pair of classifier-free guidance
        self.class_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.device_embedding = nn.Embedding(num_devices + 1, embed_dim)
        self.cond_mlp = nn.Sequential(nn.Linear(_TIME_FEATURES + 2 * embed_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.conv_in = nn.Conv2d(in_channels, w1, 3, padding=1)
        self.down1 = ResBlock(w1, w1, cond_dim)
        self.pool1 = nn.Conv2d(w1, w1, 3, stride=2, padding=1)
        self.down2 = ResBlock(w1, w2, cond_dim)
        self.pool2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid = ResBlock(w2, w2, cond_dim)
        self.up2 = ResBlock(2 * w2, w2, cond_dim)
        self.up1 = ResBlock(w2 + w1, w1, cond_dim)
        self.norm_out = nn.GroupNorm(_groups(w1), w1)
        self.conv_out = nn.Conv2d(w1, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # per-device white-noise top-up (sampler.fit_flow_noise; zeros = none), in the state dict
        self.register_buffer("noise_std", torch.zeros(num_devices, in_channels))

    def condition(self, classes: torch.Tensor, devices: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if classes.shape != devices.shape or classes.ndim != 1:
            raise ValueError(f"classes and devices must be 1-D of equal length, got {tuple(classes.shape)}, {tuple(devices.shape)}.")
        return self.cond_mlp(torch.cat([_time_features(t), self.class_embedding(classes), self.device_embedding(devices)], dim=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        """The velocity v(x_t, t | class, device), same shape as ``x_t`` (images in [-1, 1])."""
        cond = self.condition(classes, devices, t)
        h1 = self.down1(self.conv_in(x_t), cond)
        h2 = self.down2(self.pool1(h1), cond)
        h = self.mid(self.pool2(h2), cond)
        h = self.up2(torch.cat([F.interpolate(h, size=h2.shape[-2:], mode="nearest"), h2], dim=1), cond)
        h = self.up1(torch.cat([F.interpolate(h, size=h1.shape[-2:], mode="nearest"), h1], dim=1), cond)
        return self.conv_out(F.silu(self.norm_out(h)))

    # -- sampling (generator.ConditionalSampler.sample) --------------------------------------
    def start_points(self, classes: torch.Tensor, devices: torch.Tensor, generator: torch.Generator, temperature: float) -> torch.Tensor:
        shape = (classes.numel(), self.in_channels, self.image_size, self.image_size)
        return torch.randn(shape, generator=generator, dtype=torch.float32) * float(temperature)

    def render(self, start: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        """Integrate the ODE from the noise images and map [-1, 1] back to [0, 1]."""
        return self._integrate(start, classes, devices).add_(1.0).mul_(0.5).clamp_(0.0, 1.0)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        """v_cond, or the guided v_null + w (v_cond - v_null) in one doubled batch."""
        if self.guidance == 1.0:
            return self(x, t, classes, devices)
        n = x.shape[0]
        null_c, null_d = self.drop_condition(classes, devices, torch.ones_like(classes, dtype=torch.bool))
        both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([classes, null_c]), torch.cat([devices, null_d]))
        v_cond, v_null = both[:n], both[n:]
        return v_null + self.guidance * (v_cond - v_null)

    def drop_condition(self, classes: torch.Tensor, devices: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels with the rows in ``drop`` replaced by "no condition" (``guidance_on``
        says which labels): the same rule in training and in the guided sampler."""
        classes = torch.where(drop, torch.full_like(classes, self.num_classes), classes)
        if self.guidance_on == "class_and_device":
            devices = torch.where(drop, torch.full_like(devices, self.num_devices), devices)
        return classes, devices

    def _integrate(self, x: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        """Heun's method from t = 0 (noise) to t = 1 (data) in ``sample_steps`` equal steps."""
        dt = 1.0 / self.sample_steps
        for step in range(self.sample_steps):
            t = torch.full((x.shape[0],), step * dt, device=x.device)
            v = self._velocity(x, t, classes, devices)
            x_euler = x + dt * v
            if step == self.sample_steps - 1:
                x = x_euler
            else:
                x = x + 0.5 * dt * (v + self._velocity(x_euler, t + dt, classes, devices))
        return x


def flow_matching_loss(
    model: ConditionalFlow,
    x: torch.Tensor,
    classes: torch.Tensor,
    devices: torch.Tensor,
    generator: torch.Generator,
    cond_dropout: float = 0.0,
) -> torch.Tensor:
    """Mean squared error between v(x_t, t) and the straight path's velocity x1 - x0.

    ``x`` are images in [0, 1]; the noise x0, the times t and which rows lose their condition
    (probability ``cond_dropout``, for guidance) come from ``generator`` (a CPU generator), so
    the caller seeds them."""
    x1 = x * 2.0 - 1.0
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
    t = torch.rand((x1.shape[0],), generator=generator).to(x1.device)
    drop = (torch.rand((x1.shape[0],), generator=generator) < cond_dropout).to(x1.device)
    classes, devices = model.drop_condition(classes, devices, drop)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1.0 - tb) * x0 + tb * x1
    return F.mse_loss(model(x_t, t, classes, devices), x1 - x0)
