"""Imaging devices: the domain shift between hospitals (FedSSG, methods.md section 2).

MedMNIST images come from one acquisition chain, so the project simulates several
imaging devices by re-rendering each hospital's images once, deterministically, with a
device profile: gamma, contrast, blur, resolution loss, noise and an intensity offset,
plus the effects other modalities need (ultrasound/OCT speckle and depth attenuation,
colour balance and stain saturation of RGB modalities, vignetting of fundus cameras,
dermatoscopes and microscopes). Each hospital has one device; prevalence is imbalanced
(some devices are rare) and one device is held out entirely, so the global test set
rendered by it measures accuracy on a device no client trained on. Ready-made profile
sets per modality are in `device_presets` (`devices.profiles: auto`; docs/devices.md).

The rendering chain, in this order, on intensities x in [0, 1] (x = pixel / 255):
1. gamma:        x <- x ** gamma            (gamma > 1 darkens mid-tones, < 1 brightens)
2. contrast:     x <- (x - 0.5) * contrast + 0.5   (around mid-grey; > 1 stretches)
3. channel gain: x[..., c] <- x[..., c] * channel_gain[c]   (white balance, stain shift; RGB only)
4. saturation:   x <- m + saturation * (x - m), m = the pixel's mean over R, G, B   (RGB only)
5. illumination: x <- x * (1 - vignetting * r^2) * exp(-depth_attenuation * d), where r^2
                 runs from 0 at the image centre to 1 at the corners (pixel-centre
                 distances, normalised per axis) and d from 0 at the top row to 1 at the
                 bottom (depth below an ultrasound or OCT probe)
6. blur:         separable Gaussian, sigma in pixels, truncated at 3 sigma, edges reflected
7. resolution:   block-mean down by `downsample`, bilinear back up to the original size
8. speckle:      x <- x + x * N(0, speckle_std)   (multiplicative: the spread grows with the
                 intensity, as ultrasound and OCT speckle does), from the speckle stream
9. noise:        + N(0, noise_std) in grey levels (0..255 scale), from the seeded generator
10. shift:       + intensity_shift grey levels
then clip to [0, 255] and round half to even to uint8. Steps whose parameter is the
identity are skipped, so the identity profile returns the input unchanged, and a profile
that leaves the newer fields (3, 4, 5, 8) at their defaults renders exactly the bytes it
rendered before they existed. RGB images get the same chain per channel (noise and
speckle independent per channel).

Colour rule: channel gain and saturation act between the R, G and B channels, so they
need RGB images (N,H,W,3). A profile that sets either renders grayscale images (N,H,W) or
(N,H,W,1) not at all: render_device raises DeviceConfigError naming the fix (a grayscale
dataset takes grayscale profiles, e.g. its modality's preset). Every other step applies to
grayscale and RGB alike.

Random streams: the additive noise draws from `numpy.random.default_rng(seed)`; speckle
draws from that seed's first spawned child, `SeedSequence(seed, spawn_key=(0,))`. The two
streams are independent, each continues across chunks, and adding speckle to a profile
does not change its additive noise.

Why numpy and not a torch/torchvision convolution: after a 256-entry tone table
(computed with scalar float64 math), the chain is only additions and multiplications
applied elementwise (the blur and the resampling are fixed-order sums of shifted copies;
the illumination map is float64 arithmetic plus scalar `math.exp`), so its result is
bit-identical whatever the thread count or SIMD width of the CPU, which
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

from fedmic_pipeline.core import device_presets

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
    # Effects of other modalities (module docstring, steps 3, 4, 5 and 8); the defaults are
    # the identity, so profiles that leave them out render exactly as before they existed.
    speckle_std: float = 0.0
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    vignetting: float = 0.0
    depth_attenuation: float = 0.0

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
            "speckle_std": self.speckle_std >= 0,
            "saturation": self.saturation >= 0,
            "vignetting": 0 <= self.vignetting <= 1,
            "depth_attenuation": self.depth_attenuation >= 0,
        }
        for field_name, ok in checks.items():
            value = getattr(self, field_name)
            if not (math.isfinite(value) and ok):
                raise DeviceConfigError(f"device '{self.name}': {field_name}={value!r} is out of range.")
        gain = self.channel_gain
        if (
            isinstance(gain, (str, bytes)) or not isinstance(gain, Sequence) or len(gain) != 3
            or any(isinstance(g, bool) or not isinstance(g, (int, float, np.number)) for g in gain)
            or not all(math.isfinite(g) and g > 0 for g in gain)
        ):
            raise DeviceConfigError(
                f"device '{self.name}': channel_gain must be three finite numbers > 0 (R, G, B gains; [1, 1, 1] "
                f"for none), got {gain!r}."
            )
        object.__setattr__(self, "channel_gain", tuple(float(g) for g in gain))
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
        for key in _NUMBER_FIELDS + ("downsample",):
            if key in values and (isinstance(values[key], bool) or not isinstance(values[key], (int, float, np.number))):
                raise DeviceConfigError(f"device {values['name']!r}: {key} must be a number, got {values[key]!r}.")
        for key in _NUMBER_FIELDS:
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
    def is_colour(self) -> bool:
        """Whether the profile changes colour (channel gain or saturation): RGB images only."""
        return self.channel_gain != (1.0, 1.0, 1.0) or self.saturation != 1.0

    @property
    def is_identity(self) -> bool:
        return (self.gamma == 1.0 and self.contrast == 1.0 and self.blur_sigma == 0.0 and self.downsample == 1
                and self.noise_std == 0.0 and self.intensity_shift == 0.0 and self.speckle_std == 0.0
                and not self.is_colour and self.vignetting == 0.0 and self.depth_attenuation == 0.0)


_NUMBER_FIELDS = (
    "prevalence", "gamma", "contrast", "blur_sigma", "noise_std", "intensity_shift",
    "speckle_std", "saturation", "vignetting", "depth_attenuation",
)


def profiles_from_params(profiles: Sequence[Mapping[str, Any]]) -> list[DeviceProfile]:
    """Parse `devices.profiles`; names must be unique (a device id is its list position)."""
    if not isinstance(profiles, Sequence) or isinstance(profiles, str):
        raise DeviceConfigError(f"devices.profiles must be a list of device profiles or `auto`, got {profiles!r}.")
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


def _recolour(x: np.ndarray, profile: DeviceProfile) -> np.ndarray:
    """Channel gain, then saturation around each pixel's channel mean ((R + G) + B) / 3."""
    if profile.channel_gain != (1.0, 1.0, 1.0):
        x = x * np.asarray(profile.channel_gain, dtype=np.float32)
    if profile.saturation != 1.0:
        mean = ((x[..., 0] + x[..., 1]) + x[..., 2]) * np.float32(1.0 / 3.0)
        mean = mean[..., None]
        x = mean + np.float32(profile.saturation) * (x - mean)
    return x


def _illumination_map(profile: DeviceProfile, height: int, width: int) -> np.ndarray:
    """Float32 (H, W) gain: vignetting (1 - v * r^2) times depth attenuation exp(-a * d).

    r^2 is the mean of the squared normalised offsets of the pixel centre from the image
    centre along each axis (0 at the centre, (1 - 1/H)^2-ish at the corners); d is the
    row's depth, (row + 0.5) / H. Float64 arithmetic plus scalar `math.exp`: no SIMD
    transcendental, so the map is the same on every CPU.
    """
    rows = (np.arange(height, dtype=np.float64) + 0.5 - height / 2.0) / (height / 2.0)
    cols = (np.arange(width, dtype=np.float64) + 0.5 - width / 2.0) / (width / 2.0)
    gain = np.ones((height, width), dtype=np.float64)
    if profile.vignetting != 0.0:
        r2 = (rows[:, None] ** 2 + cols[None, :] ** 2) * 0.5
        gain = gain * (1.0 - profile.vignetting * r2)
    if profile.depth_attenuation != 0.0:
        depth = [math.exp(-profile.depth_attenuation * (i + 0.5) / height) for i in range(height)]
        gain = gain * np.asarray(depth, dtype=np.float64)[:, None]
    return gain.astype(np.float32)


def _render_chunk(
    chunk: np.ndarray,
    profile: DeviceProfile,
    lut: np.ndarray,
    rng: np.random.Generator,
    speckle_rng: np.random.Generator,
    illumination: np.ndarray | None,
) -> np.ndarray:
    x = lut[chunk]  # gamma and contrast, float32 in about [0, 1]
    if profile.is_colour:
        x = _recolour(x, profile)
    if illumination is not None:
        x = x * (illumination if x.ndim == 3 else illumination[:, :, None])
    if profile.blur_sigma > 0.0:
        kernel = _gaussian_kernel(profile.blur_sigma)
        x = _blur_axis(_blur_axis(x, kernel, axis=1), kernel, axis=2)
    if profile.downsample > 1:
        x = _lose_resolution(x, int(profile.downsample))
    x = x * np.float32(255.0)
    if profile.speckle_std > 0.0:
        x = x + x * (speckle_rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(profile.speckle_std))
    if profile.noise_std > 0.0:
        x = x + rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(profile.noise_std)
    if profile.intensity_shift != 0.0:
        x = x + np.float32(profile.intensity_shift)
    return np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8)


def render_device(images_uint8: np.ndarray, profile: DeviceProfile, seed: int | Sequence[int]) -> np.ndarray:
    """Re-render uint8 images (N,H,W) or (N,H,W,3) as `profile`'s device would acquire them.

    Deterministic in (images, profile, seed): the noise comes from
    `numpy.random.default_rng(seed)` (an int or a sequence of ints, e.g. (base_seed,
    stream, client)), the speckle from its child `SeedSequence(seed, spawn_key=(0,))`.
    Returns a new uint8 array of the same shape. A colour profile (channel gain or
    saturation) refuses grayscale images.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise DeviceConfigError(f"render_device expects uint8 images, got {images.dtype}; render before normalising.")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DeviceConfigError(f"render_device expects (N,H,W) or (N,H,W,C) images with C in (1, 3), got shape {images.shape}.")
    if profile.is_colour and (images.ndim == 3 or images.shape[-1] != 3):
        raise DeviceConfigError(
            f"device '{profile.name}' changes colour (channel_gain={list(profile.channel_gain)}, saturation="
            f"{profile.saturation}) but the images are grayscale, shape {images.shape}: colour effects need RGB "
            "(N,H,W,3) images. For a grayscale dataset set channel_gain to [1, 1, 1] and saturation to 1 in "
            "devices.profiles, or use `devices.profiles: auto`, whose grayscale modalities have no colour effects."
        )
    if profile.is_identity or images.shape[0] == 0:
        return images.copy()
    if profile.downsample > min(images.shape[1], images.shape[2]):
        raise DeviceConfigError(
            f"device '{profile.name}': downsample={profile.downsample} exceeds the image size {images.shape[1:3]}; lower it."
        )
    rng = np.random.default_rng(seed)
    speckle_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    lut = _tone_lut(profile)
    illumination = None
    if profile.vignetting != 0.0 or profile.depth_attenuation != 0.0:
        illumination = _illumination_map(profile, images.shape[1], images.shape[2])
    out = np.empty_like(images)
    for start in range(0, images.shape[0], _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(
            images[start : start + _CHUNK], profile, lut, rng, speckle_rng, illumination
        )
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


AUTO = "auto"


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def resolve_auto(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """`devices` parameters with `profiles: auto` (and `held_out: auto`) replaced by the
    preset of the dataset's modality (`device_presets`); `devices.dataset` names the dataset
    (conf: `dataset: ${dataset.name}`). Explicit profiles come back unchanged, the same object.
    """
    profiles, held_out = params.get("profiles"), params.get("held_out")
    if not _is_auto(profiles):
        if _is_auto(held_out):
            raise DeviceConfigError(
                "devices.held_out: auto means the held-out device of the modality preset, so it needs "
                "devices.profiles: auto; with an explicit list of profiles give the held-out device's name (or null)."
            )
        return params
    dataset = params.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise DeviceConfigError(
            "devices.profiles: auto picks the imaging devices from the dataset's modality, but devices.dataset "
            f"is {dataset!r}: add `dataset: ${{dataset.name}}` under `devices:` in "
            "conf/base/parameters_data_partition.yml (it then follows dataset.name), or list the profiles explicitly."
        )
    modality = device_presets.modality_of(dataset)
    if modality is None:
        known = ", ".join(f"{name} ({mod})" for name, mod in sorted(device_presets.MODALITY_BY_DATASET.items()))
        raise DeviceConfigError(
            f"devices.profiles: auto has no device preset for the dataset {dataset!r}: its imaging modality is not "
            f"known. Datasets with a preset: {known}. Fix: list the devices under devices.profiles in "
            "conf/base/parameters_data_partition.yml (start from the preset of the closest modality in "
            "docs/devices.md, and set devices.held_out to one of their names), or add the dataset to "
            "MODALITY_BY_DATASET in src/fedmic_pipeline/core/device_presets.py."
        )
    resolved = dict(params)
    resolved["profiles"] = device_presets.preset_profiles(modality)
    if _is_auto(held_out):
        resolved["held_out"] = device_presets.preset_held_out(modality)
    return resolved


@dataclass(frozen=True)
class DevicesConfig:
    """The `devices` parameters, validated."""

    seed: int
    held_out: str | None
    profiles: tuple[DeviceProfile, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DevicesConfig:
        """Validate the `devices` block; `profiles: auto` takes the dataset's preset (`resolve_auto`)."""
        allowed = {"seed", "held_out", "profiles", "dataset"}
        unknown = sorted(set(params) - allowed)
        missing = sorted({"seed", "profiles"} - set(params))
        if unknown or missing:
            raise DeviceConfigError(f"devices parameters: missing {missing}, unknown {unknown}; expected {sorted(allowed)}.")
        dataset = params.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise DeviceConfigError(f"devices.dataset must be a dataset name (`${{dataset.name}}`) or absent, got {dataset!r}.")
        params = resolve_auto(params)
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
