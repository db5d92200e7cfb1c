"""Imaging devices: the domain shift between hospitals (FedSSG, methods.md section 2).

MedMNIST images come from one acquisition chain, so the project simulates several
imaging devices by re-rendering each hospital's images once, deterministically, with a
device profile: gamma, contrast, blur, resolution loss, noise and an intensity offset.
Each hospital has one device; prevalence is imbalanced (some devices are rare) and one
device is held out entirely, so the global test set rendered by it measures accuracy on a
device no client trained on.

The rendering chain, in this order, on intensities x in [0, 1] (x = pixel / 255):
1. gamma:      x <- x ** gamma            (gamma > 1 darkens mid-tones, < 1 brightens)
2. contrast:   x <- (x - 0.5) * contrast + 0.5   (around mid-grey; > 1 stretches)
3. blur:       separable Gaussian, sigma in pixels, truncated at 3 sigma, edges reflected
4. resolution: block-mean down by `downsample`, bilinear back up to the original size
5. noise:      + N(0, noise_std) in grey levels (0..255 scale), from the seeded generator
6. shift:      + intensity_shift grey levels
then clip to [0, 255] and round half to even to uint8. Steps whose parameter is the
identity are skipped, so the identity profile returns the input unchanged. RGB images
get the same chain per channel (noise independent per channel).

Why numpy and not a torch/torchvision convolution: after a 256-entry tone table
(computed with scalar float64 math), the chain is only additions and multiplications
applied elementwise (the blur and the resampling are fixed-order sums of shifted copies),
so its result is bit-identical whatever the thread count or SIMD width of the CPU, which
the byte-identical partition files require. Everything is vectorised over the image batch; images are processed in
fixed-size chunks only to bound memory, and the noise stream continues across chunks,
so the chunk size does not change the output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_CHUNK = 2048  # images per chunk: bounds float32 temporaries (2048 x 224 x 224 x 4 B = 411 MB)


class DeviceConfigError(ValueError):
    """A device profile or the held-out device is invalid; the message names the fix."""


@dataclass(frozen=True)
class DeviceProfile:
    """One imaging device's acquisition characteristics (see the module docstring)."""

    name: str
    prevalence: float = 0.0
    gamma: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    downsample: int = 1
    noise_std: float = 0.0
    intensity_shift: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.replace("_", "").isalnum():
            raise DeviceConfigError(
                f"device name {self.name!r} must be a non-empty string of letters, digits and '_' "
                "(it becomes an array key such as images_<name>)."
            )
        checks = {
            "prevalence": self.prevalence >= 0,
            "gamma": self.gamma > 0,
            "contrast": self.contrast >= 0,
            "blur_sigma": self.blur_sigma >= 0,
            "noise_std": self.noise_std >= 0,
        }
        for field_name, ok in checks.items():
            value = getattr(self, field_name)
            if not (math.isfinite(value) and ok):
                raise DeviceConfigError(f"device '{self.name}': {field_name}={value!r} is out of range.")
        if not math.isfinite(self.intensity_shift):
            raise DeviceConfigError(f"device '{self.name}': intensity_shift must be finite.")
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise DeviceConfigError(f"device '{self.name}': downsample must be an integer >= 1, got {self.downsample!r}.")

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> DeviceProfile:
        """Build from one entry of `devices.profiles`, rejecting unknown keys (typos)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise DeviceConfigError(f"device profile {params.get('name')!r} has unknown keys {unknown}; allowed: {sorted(known)}.")
        if "name" not in params:
            raise DeviceConfigError("every device profile needs a 'name'.")
        values = dict(params)
        for key in ("prevalence", "gamma", "contrast", "blur_sigma", "noise_std", "intensity_shift", "downsample"):
            if key in values and (isinstance(values[key], bool) or not isinstance(values[key], (int, float, np.number))):
                raise DeviceConfigError(f"device {values['name']!r}: {key} must be a number, got {values[key]!r}.")
        for key in ("prevalence", "gamma", "contrast", "blur_sigma", "noise_std", "intensity_shift"):
            if key in values:
                values[key] = float(values[key])
        if "downsample" in values:
            if not math.isfinite(values["downsample"]) or float(values["downsample"]) != int(values["downsample"]):
                raise DeviceConfigError(f"device '{values['name']}': downsample must be an integer, got {values['downsample']!r}.")
            values["downsample"] = int(values["downsample"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        return (self.gamma == 1.0 and self.contrast == 1.0 and self.blur_sigma == 0.0 and self.downsample == 1
                and self.noise_std == 0.0 and self.intensity_shift == 0.0)


def profiles_from_params(profiles: Sequence[Mapping[str, Any]]) -> list[DeviceProfile]:
    """Parse `devices.profiles`; names must be unique (a device id is its list position)."""
    if not isinstance(profiles, Sequence) or isinstance(profiles, str):
        raise DeviceConfigError(f"devices.profiles must be a list of device profiles, got {profiles!r}.")
    if not profiles:
        raise DeviceConfigError("devices.profiles is empty: define at least one imaging device.")
    for position, profile in enumerate(profiles):
        if not isinstance(profile, Mapping):
            raise DeviceConfigError(f"devices.profiles[{position}] must be a mapping (name, prevalence, gamma, ...), got {profile!r}.")
    parsed = [DeviceProfile.from_dict(p) for p in profiles]
    names = [p.name for p in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DeviceConfigError(f"device names must be unique, repeated: {duplicates}.")
    return parsed


# ---- rendering ------------------------------------------------------------------------

def _tone_lut(profile: DeviceProfile) -> np.ndarray:
    """Gamma then contrast for each of the 256 grey levels, as float32 intensities.

    Computed with Python's scalar float64 `math.pow`, not numpy's vectorised `power`,
    whose SIMD variants can differ in the last bit between CPUs.
    """
    values = []
    for v in range(256):
        x = v / 255.0
        if profile.gamma != 1.0:
            x = math.pow(x, profile.gamma)
        if profile.contrast != 1.0:
            x = (x - 0.5) * profile.contrast + 0.5
        values.append(x)
    return np.asarray(values, dtype=np.float32)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised taps out to 3 sigma (scalar `math.exp`, for the same reason as the LUT)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = math.fsum(taps)
    return np.asarray([t / total for t in taps], dtype=np.float32)


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1-D convolution along `axis` as a fixed-order sum of shifted copies (reflect edges)."""
    radius = kernel.size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="symmetric")
    length = x.shape[axis]
    out = np.zeros_like(x)
    for offset, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
    return out


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear (half-pixel centres, clamped) interpolation matrix n_out x n_in."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m.astype(np.float32)


def _resample_axis(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """Apply an (n_out x n_in) matrix along `axis` as an explicit weighted sum.

    Not `tensordot`/`matmul`: BLAS may reorder the sum by thread count; here each output
    is accumulated over input positions in a fixed order.
    """
    moved = np.moveaxis(x, axis, 0)
    out = np.zeros((matrix.shape[0],) + moved.shape[1:], dtype=x.dtype)
    for j in range(matrix.shape[1]):
        col = matrix[:, j]
        nz = np.flatnonzero(col)
        if nz.size:
            out[nz] += col[nz].reshape((-1,) + (1,) * (moved.ndim - 1)) * moved[j][None]
    return np.moveaxis(out, 0, axis)


def _lose_resolution(x: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean downsample by `factor` (edge-padded), then bilinear back to the input size."""
    _, h, w = x.shape[:3]
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    pad = [(0, 0), (0, hp - h), (0, wp - w)] + [(0, 0)] * (x.ndim - 3)
    padded = np.pad(x, pad, mode="edge")
    shape = (x.shape[0], hp // factor, factor, wp // factor, factor) + x.shape[3:]
    blocks = padded.reshape(shape)
    # mean over the two block axes with a fixed summation order
    small = np.zeros((shape[0], shape[1], shape[3]) + x.shape[3:], dtype=x.dtype)
    for a in range(factor):
        for b in range(factor):
            small += blocks[:, :, a, :, b]
    small *= np.float32(1.0 / (factor * factor))
    up = _resample_axis(small, _interp_matrix(h, shape[1]), axis=1)
    return _resample_axis(up, _interp_matrix(w, shape[3]), axis=2)


def _render_chunk(
    chunk: np.ndarray, profile: DeviceProfile, lut: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    x = lut[chunk]  # gamma and contrast, float32 in about [0, 1]
    if profile.blur_sigma > 0.0:
        kernel = _gaussian_kernel(profile.blur_sigma)
        x = _blur_axis(_blur_axis(x, kernel, axis=1), kernel, axis=2)
    if profile.downsample > 1:
        x = _lose_resolution(x, int(profile.downsample))
    x = x * np.float32(255.0)
    if profile.noise_std > 0.0:
        x = x + rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(profile.noise_std)
    if profile.intensity_shift != 0.0:
        x = x + np.float32(profile.intensity_shift)
    return np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8)


def render_device(images_uint8: np.ndarray, profile: DeviceProfile, seed: int | Sequence[int]) -> np.ndarray:
    """Re-render uint8 images (N,H,W) or (N,H,W,3) as `profile`'s device would acquire them.

    Deterministic in (images, profile, seed): the noise comes from
    `numpy.random.default_rng(seed)` (an int or a sequence of ints, e.g. (base_seed,
    stream, client)). Returns a new uint8 array of the same shape.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise DeviceConfigError(f"render_device expects uint8 images, got {images.dtype}; render before normalising.")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DeviceConfigError(f"render_device expects (N,H,W) or (N,H,W,C) images with C in (1, 3), got shape {images.shape}.")
    if profile.is_identity or images.shape[0] == 0:
        return images.copy()
    if profile.downsample > min(images.shape[1], images.shape[2]):
        raise DeviceConfigError(
            f"device '{profile.name}': downsample={profile.downsample} exceeds the image size {images.shape[1:3]}; lower it."
        )
    rng = np.random.default_rng(seed)
    lut = _tone_lut(profile)
    out = np.empty_like(images)
    for start in range(0, images.shape[0], _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(images[start : start + _CHUNK], profile, lut, rng)
    return out


# ---- assignment -----------------------------------------------------------------------

def assign_devices(
    num_clients: int,
    profiles: Sequence[DeviceProfile],
    held_out: str | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """One device id (index into `profiles`) per hospital; the held-out device never appears.

    Eligible devices are those not held out with prevalence > 0. When there are at least
    as many clients as eligible devices, each eligible device is given to one hospital
    first (so no device's domain is missing from training), the remaining hospitals draw
    devices with probability proportional to prevalence, and the list is shuffled.
    With fewer clients than eligible devices, the clients get distinct devices drawn
    without replacement by prevalence (some devices are then absent). `held_out=None`
    means no device is held out.
    """
    if int(num_clients) != num_clients or num_clients < 1:
        raise DeviceConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}.")
    num_clients = int(num_clients)
    names = [p.name for p in profiles]
    if held_out is not None and held_out not in names:
        raise DeviceConfigError(f"devices.held_out={held_out!r} is not a device profile name; choose one of {names} or null.")
    eligible = np.array([i for i, p in enumerate(profiles) if p.name != held_out and p.prevalence > 0], dtype=np.int64)
    if eligible.size == 0:
        raise DeviceConfigError(
            "no device can be assigned: every profile is held out or has prevalence 0; give at least one "
            "non-held-out device a prevalence > 0."
        )
    weights = np.array([profiles[i].prevalence for i in eligible], dtype=np.float64)
    weights = weights / weights.sum()
    if num_clients >= eligible.size:
        extra = rng.choice(eligible, size=num_clients - eligible.size, replace=True, p=weights)
        assignment = np.concatenate([eligible, extra])
        assignment = assignment[rng.permutation(num_clients)]
    else:
        assignment = rng.choice(eligible, size=num_clients, replace=False, p=weights)
    return assignment.astype(np.int64)


# ---- configuration and seeds ----------------------------------------------------------

# Random streams of the device stage (default_rng([seed, stream, ...])): the assignment,
# client k's rendering and device d's rendering of the global test set never share draws.
ASSIGN_STREAM = 0
CLIENT_RENDER_STREAM = 1
TEST_RENDER_STREAM = 2


@dataclass(frozen=True)
class DevicesConfig:
    """The `devices` parameters, validated."""

    seed: int
    held_out: str | None
    profiles: tuple[DeviceProfile, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DevicesConfig:
        allowed = {"seed", "held_out", "profiles"}
        unknown = sorted(set(params) - allowed)
        missing = sorted({"seed", "profiles"} - set(params))
        if unknown or missing:
            raise DeviceConfigError(f"devices parameters: missing {missing}, unknown {unknown}; expected {sorted(allowed)}.")
        seed = params["seed"]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DeviceConfigError(f"devices.seed must be an integer >= 0, got {seed!r}.")
        profiles = tuple(profiles_from_params(params["profiles"]))
        held_out = params.get("held_out")
        if held_out is not None and not isinstance(held_out, str):
            raise DeviceConfigError(f"devices.held_out must be a device profile name or null, got {held_out!r}.")
        names = [p.name for p in profiles]
        if held_out is not None and held_out not in names:
            raise DeviceConfigError(f"devices.held_out={held_out!r} is not a device profile name; choose one of {names} or null.")
        return cls(seed=int(seed), held_out=held_out, profiles=profiles)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def assign(self, num_clients: int) -> np.ndarray:
        """Device id per client from the assignment stream (see `assign_devices`)."""
        return assign_devices(num_clients, self.profiles, self.held_out, np.random.default_rng([self.seed, ASSIGN_STREAM]))

    def client_seed(self, client: int) -> tuple[int, int, int]:
        """Noise seed of client `client`'s rendering."""
        return (self.seed, CLIENT_RENDER_STREAM, int(client))

    def test_seed(self, device: int) -> tuple[int, int, int]:
        """Noise seed of device `device`'s rendering of the global test set."""
        return (self.seed, TEST_RENDER_STREAM, int(device))
