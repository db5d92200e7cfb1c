"""A small conditional VAE that draws images of a given (class, imaging device).

Why a VAE and not a GAN or a diffusion model: the generator is trained federatedly
(FedAvg over ten hospitals, some with a few dozen images) on a shared 2-core CPU in about
a minute. A VAE has one stable likelihood objective that averages well across clients;
a GAN's two-player game is notoriously unstable under FedAvg and with tiny local sets;
diffusion models need far more compute (and ``diffusers`` is not a dependency). The price
is blur: a VAE's samples are the decoder's mean, so fine texture and the acquisition
*noise* of a device are under-represented (gamma, contrast, blur, resolution and intensity
shift are reproduced). The quality report measures exactly this.

Conditioning (FedSSG, methods.md section 2): the condition is the pair (class c, device
d). Each has a learned embedding; their concatenation e = [E_c(c), E_d(d)] drives FiLM
layers (Perez et al. 2017): after every conv block of the encoder AND the decoder, a
linear map of e gives a per-channel scale gamma and shift beta, and the block's output h
becomes ``h * (1 + gamma) + beta``. Why FiLM rather than concatenating one-hot maps to
the input: the device differences are global tone/blur changes, which per-channel
modulation expresses directly and cheaply at every depth; and class and device factor
apart, so a (class, device) pair that is rare in the federation still gets the class
features learnt from every device. The ``1 +`` makes a zero FiLM output the identity.
The FiLM maps are initialised with small weights, so the conditioning starts near
identity and is learnt.

Architecture at 28x28 (default widths (32, 64), latent 16, embeddings 8+8, about 0.29M
parameters for 1 channel): encoder conv4x4/2 (28->14) -FiLM-SiLU, conv4x4/2 (14->7)
-FiLM-SiLU, linear to (mu, log var); decoder linear [z, e] -> 64x7x7 -FiLM-SiLU, transposed
conv4x4/2 (7->14) -FiLM-SiLU, conv3x3 -FiLM-SiLU, transposed conv4x4/2 (14->28) -FiLM (per
output channel: the device's tone curve), sigmoid. Known artefact: the last transposed
conv draws faint checkerboard patterns (Odena et al. 2016). Two alternatives were measured
on PneumoniaMNIST (10 rounds x 2 epochs, one seed each) and were worse in the reference
encoder's space: nearest upsampling + conv3x3 (overall FD 158 vs 96, blurrier) and a conv3x3
after the last transposed conv (FD 151, CAS 0.52 vs 0.71). No normalisation layers:
BatchNorm statistics of small, single-device clients would be averaged into nonsense by
FedAvg, and FiLM already sets the per-channel scale.

Loss (per image, averaged over the batch): reconstruction + beta * KL(q(z|x,c,d) || N(0,I)),
with the reconstruction either the Gaussian negative log-likelihood with a fixed pixel
std ``obs_sigma`` (``mse``: sum of squared errors / (2 obs_sigma^2), the project default)
or the Bernoulli cross-entropy summed over pixels (``bce``). Why not BCE by default: on
grey-level targets its curvature is that of a Gaussian with std ~0.5, so the KL term wins,
the latent is switched off (measured: KL ~4 nats per image) and every sample is the class
mean; obs_sigma = 0.06 keeps ~30-45 nats in the latent and gave the best CAS.

Images are float tensors in [0, 1] of shape (N, C, H, W) with C = 1 or 3, H = W =
``image_size`` (a multiple of 4). Sampling is deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..protocol import ConfigurationError, DataSpec

__all__ = [
    "GENERATOR_ARCHITECTURE",
    "RECON_LOSSES",
    "ConditionalSampler",
    "ConditionalVAE",
    "build_generator",
    "generator_from_record",
    "generator_record",
    "ARCHITECTURES",
    "DECODERS",
    "images_to_uint8",
    "state_sha256",
    "vae_loss",
]

GENERATOR_ARCHITECTURE = "conditional_vae"
RECON_LOSSES: tuple[str, ...] = ("bce", "mse")
DECODERS: tuple[str, ...] = ("transpose", "upsample")
_NOISE_CHUNK = 512
_FILM_INIT_STD = 0.1


class FiLM(nn.Module):
    """Per-channel ``h * (1 + gamma(e)) + beta(e)`` from a condition embedding ``e``."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.normal_(self.proj.weight, std=_FILM_INIT_STD)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=1)
        shape = (h.shape[0], -1) + (1,) * (h.ndim - 2)
        return h * (1.0 + gamma.view(shape)) + beta.view(shape)


class ConditionalSampler(nn.Module):
    """What both generators share when sampling: one image per (class, device) pair.

    A subclass draws its starting points (``start_points``: the VAE's latents, the flow's
    noise images) and renders a chunk of them (``render``: decode, or integrate the ODE) into
    images in [0, 1]; it owns ``in_channels``, ``image_size``, ``num_classes``,
    ``num_devices`` and a ``noise_std`` (devices, channels) buffer (zeros = no top-up).
    """

    in_channels: int
    image_size: int
    num_classes: int
    num_devices: int

    def start_points(self, classes: torch.Tensor, devices: torch.Tensor, generator: torch.Generator, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def render(self, start: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        classes: torch.Tensor | np.ndarray | list[int],
        devices: torch.Tensor | np.ndarray | list[int],
        generator: torch.Generator,
        temperature: float = 1.0,
        batch_size: int = 1024,
    ) -> torch.Tensor:
        """Draw one image per (class, device) pair: float32 (N, C, H, W) in [0, 1] on the CPU.

        The starting points of all N rows are drawn from ``generator`` (a CPU generator)
        first, then the seed of the device-noise top-up (when fitted), so the result depends
        only on the generator's state and the pairs, never on ``batch_size``. Runs in eval
        mode and restores the previous mode.
        """
        classes_t = torch.as_tensor(np.asarray(classes), dtype=torch.int64).reshape(-1)
        devices_t = torch.as_tensor(np.asarray(devices), dtype=torch.int64).reshape(-1)
        if classes_t.shape != devices_t.shape:
            raise ValueError(f"sample: {classes_t.numel()} classes but {devices_t.numel()} devices.")
        if classes_t.numel() and (int(classes_t.min()) < 0 or int(classes_t.max()) >= self.num_classes):
            raise ValueError(f"sample: classes must be in [0, {self.num_classes - 1}].")
        if devices_t.numel() and (int(devices_t.min()) < 0 or int(devices_t.max()) >= self.num_devices):
            raise ValueError(f"sample: devices must be in [0, {self.num_devices - 1}].")
        start = self.start_points(classes_t, devices_t, generator, temperature)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if bool(self.noise_std.any()) else None
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = [
                self.render(start[i : i + batch_size].to(dev), classes_t[i : i + batch_size].to(dev), devices_t[i : i + batch_size].to(dev)).cpu()
                for i in range(0, classes_t.numel(), batch_size)
            ]
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros((0, self.in_channels, self.image_size, self.image_size), dtype=torch.float32)
        images = torch.cat(out).float()
        return images if noise_seed is None else add_device_noise(images, devices_t, self.noise_std.cpu(), noise_seed)


class ConditionalVAE(ConditionalSampler):
    """The (class, device)-conditional VAE described in the module docstring."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_devices: int,
        image_size: int = 28,
        latent_dim: int = 16,
        widths: tuple[int, int] = (32, 64),
        embed_dim: int = 8,
        decoder: str = "transpose",
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ConfigurationError(f"generator decoder must be one of {', '.join(DECODERS)}, got {decoder!r}.")
        if image_size % 4 != 0:
            raise ConfigurationError(f"The generator needs an image size divisible by 4, got {image_size}.")
        if num_devices < 1 or num_classes < 2 or latent_dim < 1 or embed_dim < 1:
            raise ConfigurationError(
                f"Bad generator sizes: num_devices={num_devices}, num_classes={num_classes}, "
                f"latent_dim={latent_dim}, embed_dim={embed_dim}."
            )
        w1, w2 = (int(w) for w in widths)
        self.in_channels, self.num_classes, self.num_devices = in_channels, num_classes, num_devices
        self.image_size, self.latent_dim = image_size, latent_dim
        self._grid = image_size // 4
        cond_dim = 2 * embed_dim
        self.class_embedding = nn.Embedding(num_classes, embed_dim)
        self.device_embedding = nn.Embedding(num_devices, embed_dim)

        self.enc_conv1 = nn.Conv2d(in_channels, w1, 4, stride=2, padding=1)
        self.enc_film1 = FiLM(cond_dim, w1)
        self.enc_conv2 = nn.Conv2d(w1, w2, 4, stride=2, padding=1)
        self.enc_film2 = FiLM(cond_dim, w2)
        self.enc_out = nn.Linear(w2 * self._grid * self._grid, 2 * latent_dim)

        self.dec_in = nn.Linear(latent_dim + cond_dim, w2 * self._grid * self._grid)
        self.dec_film0 = FiLM(cond_dim, w2)
        self.decoder = decoder
        if decoder == "transpose":
            self.dec_up1 = nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1)
            self.dec_film1 = FiLM(cond_dim, w1)
            self.dec_conv = nn.Conv2d(w1, w1, 3, padding=1)
            self.dec_film2 = FiLM(cond_dim, w1)
            self.dec_up2 = nn.ConvTranspose2d(w1, in_channels, 4, stride=2, padding=1)
        else:
            # nearest-neighbour doubling then a 3x3 convolution: every output pixel sees
            # the same number of kernel taps, so no checkerboard (Odena et al. 2016)
            self.dec_up1 = nn.Conv2d(w2, w1, 3, padding=1)
            self.dec_film1 = FiLM(cond_dim, w1)
            self.dec_conv = nn.Conv2d(w1, w1, 3, padding=1)
            self.dec_film2 = FiLM(cond_dim, w1)
            self.dec_up2 = nn.Conv2d(w1, w1, 3, padding=1)
            self.dec_film3 = FiLM(cond_dim, w1)
            self.dec_out = nn.Conv2d(w1, in_channels, 3, padding=1)
        self.dec_film_out = FiLM(cond_dim, in_channels)
        # The sampler (module docstring, "Sampling"): zeros until fit_sampler() fills them
        # after training; they travel in the state dict, so the sha256 covers them.
        self.register_buffer("latent_mean", torch.zeros(num_classes, num_devices, latent_dim))
        self.register_buffer("latent_scale", torch.zeros(num_classes, num_devices, latent_dim, latent_dim))
        self.register_buffer("latent_fitted", torch.zeros(num_classes, num_devices))
        self.register_buffer("noise_std", torch.zeros(num_devices, in_channels))

    # -- conditioning -------------------------------------------------------------------
    def condition(self, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        """The embedding e = [E_c(class), E_d(device)], shape (B, 2 * embed_dim)."""
        if classes.shape != devices.shape or classes.ndim != 1:
            raise ValueError(f"classes and devices must be 1-D of equal length, got {tuple(classes.shape)}, {tuple(devices.shape)}.")
        return torch.cat([self.class_embedding(classes), self.device_embedding(devices)], dim=1)

    # -- the two halves -----------------------------------------------------------------
    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log variance) of q(z | x, class, device)."""
        h = F.silu(self.enc_film1(self.enc_conv1(x), cond))
        h = F.silu(self.enc_film2(self.enc_conv2(h), cond))
        mu, logvar = self.enc_out(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode_logits(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid decoder output (N, C, H, W)."""
        h = self.dec_in(torch.cat([z, cond], dim=1)).view(z.shape[0], -1, self._grid, self._grid)
        h = F.silu(self.dec_film0(h, cond))
        if self.decoder == "transpose":
            h = F.silu(self.dec_film1(self.dec_up1(h), cond))
            h = F.silu(self.dec_film2(self.dec_conv(h), cond))
            return self.dec_film_out(self.dec_up2(h), cond)
        h = F.silu(self.dec_film1(self.dec_up1(F.interpolate(h, scale_factor=2.0, mode="nearest")), cond))
        h = F.silu(self.dec_film2(self.dec_conv(h), cond))
        h = F.silu(self.dec_film3(self.dec_up2(F.interpolate(h, scale_factor=2.0, mode="nearest")), cond))
        return self.dec_film_out(self.dec_out(h), cond)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (the decoder's mean), (N, C, H, W)."""
        return torch.sigmoid(self.decode_logits(z, cond))

    def forward(
        self, x: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction logits, mu, logvar); ``noise`` ~ N(0, I) of shape (B, latent)
        is passed in so the caller controls (and seeds) the reparameterisation."""
        cond = self.condition(classes, devices)
        mu, logvar = self.encode(x, cond)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decode_logits(z, cond), mu, logvar

    # -- sampling (ConditionalSampler.sample) ------------------------------------------------
    def start_points(self, classes: torch.Tensor, devices: torch.Tensor, generator: torch.Generator, temperature: float) -> torch.Tensor:
        """z ~ N(0, temperature^2 I), moved into the fitted (class, device) Gaussians where fitted."""
        z = torch.randn((classes.numel(), self.latent_dim), generator=generator, dtype=torch.float32) * float(temperature)
        if classes.numel() and bool(self.latent_fitted.any()):
            fitted = self.latent_fitted.cpu()[classes, devices] > 0
            mean = self.latent_mean.cpu()[classes, devices]
            scale = self.latent_scale.cpu()[classes, devices]
            z = torch.where(fitted[:, None], mean + torch.einsum("nij,nj->ni", scale, z), z)
        return z

    def render(self, start: torch.Tensor, classes: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
        return self.decode(start, self.condition(classes, devices))


def add_device_noise(images: torch.Tensor, devices: torch.Tensor, noise_std: torch.Tensor, seed: int) -> torch.Tensor:
    """Sample p(x | mean) instead of returning the mean: white Gaussian noise of each device's
    calibrated std ``noise_std`` (devices, channels), drawn in fixed chunks so the caller's
    batch size never changes it; in place, clamped to [0, 1]."""
    noise_gen = torch.Generator().manual_seed(seed)
    std = noise_std[devices][:, :, None, None]
    for i in range(0, images.shape[0], _NOISE_CHUNK):
        eps = torch.randn(images[i : i + _NOISE_CHUNK].shape, generator=noise_gen)
        images[i : i + _NOISE_CHUNK] = (images[i : i + _NOISE_CHUNK] + std[i : i + _NOISE_CHUNK] * eps).clamp_(0.0, 1.0)
    return images



def vae_loss(
    model: ConditionalVAE,
    x: torch.Tensor,
    classes: torch.Tensor,
    devices: torch.Tensor,
    noise: torch.Tensor,
    beta: float = 1.0,
    recon: str = "bce",
    obs_sigma: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, KL), each the mean over the batch of a per-image sum.

    ``mse`` is the Gaussian negative log-likelihood with a fixed pixel std ``obs_sigma``
    (constants dropped): sum (x_hat - x)^2 / (2 obs_sigma^2).
    """
    logits, mu, logvar = model(x, classes, devices, noise)
    if recon == "bce":
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)
    elif recon == "mse":
        rec = (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(dim=1) / (2.0 * obs_sigma**2)
    else:
        raise ConfigurationError(f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got '{recon}'.")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
    rec_m, kl_m = rec.mean(), kl.mean()
    return rec_m + beta * kl_m, rec_m.detach(), kl_m.detach()


# ---------------------------------------------------------------------------------------
# Building, saving, hashing
# ---------------------------------------------------------------------------------------

#: ``architecture`` option -> the options that architecture takes (besides ``architecture``).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "vae": ("latent_dim", "widths", "embed_dim", "decoder"),
    "flow_matching": ("widths", "embed_dim", "sample_steps", "guidance", "guidance_on"),
}
_RECORD_NAMES = {"vae": GENERATOR_ARCHITECTURE, "flow_matching": "conditional_flow"}


def build_generator(spec: DataSpec, num_devices: int, seed: int | None = None, **options: Any) -> ConditionalSampler:
    """A generator for ``spec`` and ``num_devices`` devices, on the CPU.

    ``architecture`` picks it: ``vae`` (the default, ``ConditionalVAE``; options
    ``latent_dim``, ``widths`` (two ints), ``embed_dim``, ``decoder``: ``transpose`` the first
    design, ``upsample`` no checkerboard) or ``flow_matching`` (``flow.ConditionalFlow``;
    options ``widths``, ``embed_dim``, ``sample_steps``, ``guidance``, ``guidance_on``); anything else is an error. With
    ``seed`` the initial weights come from a forked RNG seeded with it (the global RNG is
    untouched), so the same seed gives bit-identical weights.
    """
    opts = dict(options)
    architecture = opts.pop("architecture", "vae")
    if architecture not in ARCHITECTURES:
        raise ConfigurationError(f"generator architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}.")
    unknown = sorted(set(opts) - set(ARCHITECTURES[architecture]))
    if unknown:
        raise ConfigurationError(
            f"Unknown generator option(s) {unknown} for the {architecture} architecture; valid: {', '.join(ARCHITECTURES[architecture])}."
        )

    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    if "widths" in opts:
        widths = opts["widths"]
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or len(widths) != 2 or not all(map(positive_int, widths)):
            raise ConfigurationError(f"generator widths must be two positive integers, got {widths!r}.")
        opts["widths"] = tuple(int(w) for w in widths)
    for key in ("latent_dim", "embed_dim", "sample_steps"):
        if key in opts:
            if not positive_int(opts[key]):
                raise ConfigurationError(f"generator option {key} must be a positive integer, got {opts[key]!r}.")
            opts[key] = int(opts[key])
    if "guidance" in opts:
        guidance = opts["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not 0 < float(guidance) < float("inf"):
            raise ConfigurationError(f"generator option guidance must be a finite number > 0, got {guidance!r}.")
        opts["guidance"] = float(guidance)
    if "decoder" in opts and opts["decoder"] not in DECODERS:
        raise ConfigurationError(f"generator option decoder must be one of {', '.join(DECODERS)}, got {opts['decoder']!r}.")

    def make() -> ConditionalSampler:
        if architecture == "flow_matching":
            from .flow import ConditionalFlow  # flow.py builds on this module's FiLM

            return ConditionalFlow(spec.in_channels, spec.num_classes, int(num_devices), spec.image_size, **opts)
        return ConditionalVAE(spec.in_channels, spec.num_classes, int(num_devices), spec.image_size, **opts)

    if seed is None:
        model = make()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = make()
    recipe_kwargs = {"num_devices": int(num_devices), "architecture": architecture}
    recipe_kwargs.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()})
    model.build_recipe = {"name": _RECORD_NAMES[architecture], "spec": asdict(spec), "kwargs": recipe_kwargs}
    return model


def generator_record(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pickle-free record ``{architecture, spec, kwargs, state_dict}`` (TorchModelDataset's
    format, like ``models.model_record``) plus optional JSON-ready ``extra`` fields."""
    recipe = getattr(model, "build_recipe", None)
    if recipe is None:
        raise ConfigurationError("Only generators made by build_generator() carry the recipe needed to save them.")
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    record = {"architecture": recipe["name"], "spec": dict(recipe["spec"]), "kwargs": dict(recipe["kwargs"]), "state_dict": state}
    if extra:
        record.update(extra)
    return record


def generator_from_record(record: dict[str, Any]) -> ConditionalSampler:
    """Rebuild a generator saved with ``generator_record`` (eval mode, CPU)."""
    if record.get("architecture") not in _RECORD_NAMES.values():
        raise ConfigurationError(
            f"Not a generator record: architecture {record.get('architecture')!r}, expected one of "
            f"{', '.join(sorted(_RECORD_NAMES.values()))}."
        )
    kwargs = dict(record.get("kwargs", {}))
    num_devices = int(kwargs.pop("num_devices"))
    model = build_generator(DataSpec(**record["spec"]), num_devices, **kwargs)
    model.load_state_dict(record["state_dict"])
    return model.eval()


def state_sha256(state: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 over the state dict: for each key in sorted order, the key, dtype, shape and
    the tensor's raw little-endian bytes. Identical weights give identical hashes on any
    machine; this is the generator id recorded in the synthetic manifest."""
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = tensors[key].detach().cpu().contiguous().numpy()
        digest.update(f"{key}|{array.dtype.str}|{list(array.shape)}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def images_to_uint8(images: torch.Tensor, layout_ndim: int) -> np.ndarray:
    """Float (N, C, H, W) in [0, 1] -> uint8 in the partition's layout: (N, H, W) when
    ``layout_ndim`` is 3 (grayscale), (N, H, W, C) when 4. Rounds half to even."""
    arr = torch.clamp(images.detach().cpu().float(), 0.0, 1.0).mul(255.0).numpy()
    arr = np.rint(arr).astype(np.uint8)
    if layout_ndim == 3:
        if arr.shape[1] != 1:
            raise ValueError(f"A 3-D (N,H,W) layout needs one channel, the generator has {arr.shape[1]}.")
        return np.ascontiguousarray(arr[:, 0])
    if layout_ndim == 4:
        return np.ascontiguousarray(np.transpose(arr, (0, 2, 3, 1)))
    raise ValueError(f"layout_ndim must be 3 (N,H,W) or 4 (N,H,W,C), got {layout_ndim}.")
