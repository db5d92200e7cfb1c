"""Imaging-device presets per modality: the profiles `devices.profiles: auto` picks.

Each MedMNIST 2D dataset has one imaging modality (`MODALITY_BY_DATASET`), and each
modality a preset of five device profiles (`PRESETS`) in the structure of
`devices.profiles` (see `devices.DeviceProfile` for the fields and the rendering chain):
four training devices with imbalanced prevalence (0.45, 0.30, 0.18, 0.07: a reference
device most hospitals have, one common variant, one older device, one rare low-quality
one) and a fifth, prevalence 0, that `held_out: auto` holds out for the unseen-device test.
The held-out device is the harshest and combines effects no single training device
shows at that strength, so it measures generalisation rather than recognition.

Why each modality's devices look the way they do (the magnitudes are moderate so that a
28x28 image keeps its diagnostic content; the kinds of effect follow the acquisition
physics and the modality-specific corruptions chosen by MedMNIST-C, Di Salvo et al. 2024):

- xray (PneumoniaMNIST, ChestMNIST): exactly the project's original profiles
  (conf/base/parameters_data_partition.yml). Detector and processing differences: tone
  curve and contrast (flat-panel DR vs computed radiography), blur and resolution loss of
  older CR plates, quantum noise of low-dose and portable units, exposure offsets.
- ultrasound (BreastMNIST): speckle is the defining artefact and is multiplicative, so
  the devices differ in speckle strength (probe frequency, speckle-reduction filtering),
  in dynamic-range compression (gamma, contrast), in gain (intensity shift) and in
  time-gain compensation, which when mis-set leaves the image darker with depth
  (`depth_attenuation`, depth = rows, probe at the top). Handheld point-of-care probes
  add electronic noise and lower resolution.
- fundus (RetinaMNIST, RGB): fundus cameras render colour differently (flash colour
  temperature, sensor: `channel_gain`, `saturation`), lose light towards the periphery of
  the field, worse through a small undilated pupil (`vignetting`), and smartphone or
  handheld adapters add defocus, lower resolution and noise; under-exposure darkens
  (gamma > 1). No speckle: a camera, not a coherent imaging system.
- dermatoscopy (DermaMNIST, RGB): dermatoscopes differ in light source (LED colour
  temperature: `channel_gain`), polarised vs non-polarised viewing (contrast, saturation),
  dark corners of contact lenses (`vignetting`, MedMNIST-C's black corners), and
  smartphone attachments add noise, blur and resolution loss.
- microscopy (BloodMNIST, RGB stained smears): stain batches and lamps shift colour
  (`channel_gain`) and stain strength (`saturation`), Koehler illumination is uneven
  (`vignetting`), focus varies (blur), older cameras are noisier and coarser.
- microscopy_grayscale (TissueMNIST, grayscale cell images): the same optics without the
  colour: uneven illumination, focus, exposure, camera noise and resolution.
- histology (PathMNIST, RGB H&E slides): the dominant inter-site shift is the stain: labs
  stain more eosin (pink) or haematoxylin (purple) and slides fade (`channel_gain`,
  `saturation`); slide scanners differ in focus and resolution and sensor noise.
- oct (OCTMNIST, grayscale B-scans): speckle again (coherent imaging), signal roll-off
  with depth (`depth_attenuation`), frame averaging (smoother, less noise) vs single
  frames, older time-domain devices with lower resolution and contrast.
- ct (OrganAMNIST, OrganCMNIST, OrganSMNIST): reconstruction kernels (sharp: more contrast
  and noise; smooth: blur), slice thickness (partial-volume blur), dose (additive quantum
  noise in the image domain) and display windowing (gamma, contrast, level shift). No
  speckle and no colour.

MedMNIST-C's remaining corruptions (JPEG compression, motion blur, impulse noise, stain
deposits, bubbles, text overlays) are artefacts of handling or storage rather than of a
device, and are not simulated (docs/devices.md).

numpy only and no import of `devices` (which imports this module); `devices.resolve_auto`
turns these tables into `devices` parameters.
"""

from __future__ import annotations

import copy
from typing import Any

#: The modality of each 2D MedMNIST dataset (`dataset.name` as the ingestion stage spells it).
MODALITY_BY_DATASET: dict[str, str] = {
    "pneumoniamnist": "xray",
    "chestmnist": "xray",
    "breastmnist": "ultrasound",
    "retinamnist": "fundus",
    "dermamnist": "dermatoscopy",
    "bloodmnist": "microscopy",
    "tissuemnist": "microscopy_grayscale",
    "pathmnist": "histology",
    "octmnist": "oct",
    "organamnist": "ct",
    "organcmnist": "ct",
    "organsmnist": "ct",
}

_PREVALENCE = (0.45, 0.30, 0.18, 0.07, 0.0)  # four training devices, then the held-out one


def _devices(*profiles: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Give the five profiles of a preset the shared prevalences (training four, held-out last)."""
    assert len(profiles) == len(_PREVALENCE)
    return tuple({"name": p["name"], "prevalence": prev, **{k: v for k, v in p.items() if k != "name"}}
                 for p, prev in zip(profiles, _PREVALENCE, strict=True))


def _xray(name: str, gamma: float, contrast: float, blur: float, down: int, noise: float, shift: float) -> dict[str, Any]:
    # every key spelt out, in the order of conf/base/parameters_data_partition.yml
    return {"name": name, "gamma": gamma, "contrast": contrast, "blur_sigma": blur, "downsample": down,
            "noise_std": noise, "intensity_shift": shift}


#: modality -> the five profiles (`devices.profiles` entries); the last is the held-out device.
PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "xray": _devices(
        _xray("reference_scanner", 1.0, 1.0, 0.0, 1, 0.0, 0.0),
        _xray("high_contrast_dr", 0.8, 1.3, 0.0, 1, 2.0, -10.0),
        _xray("legacy_cr_blurred", 1.2, 0.85, 0.8, 2, 3.0, 8.0),
        _xray("rural_clinic_noisy", 1.1, 0.9, 0.5, 1, 10.0, 15.0),
        _xray("portable_lowdose", 1.35, 0.7, 1.0, 2, 12.0, 20.0),
    ),
    "ultrasound": _devices(
        {"name": "reference_cart_system"},
        {"name": "high_frequency_linear", "speckle_std": 0.08, "gamma": 0.9, "contrast": 1.15},
        {"name": "compound_smoothing", "speckle_std": 0.04, "blur_sigma": 0.7, "contrast": 0.9, "intensity_shift": 6.0},
        {"name": "handheld_point_of_care", "speckle_std": 0.18, "depth_attenuation": 0.6, "downsample": 2,
         "noise_std": 4.0, "intensity_shift": -10.0},
        {"name": "legacy_console_lowgain", "speckle_std": 0.22, "depth_attenuation": 0.9, "gamma": 1.3,
         "contrast": 0.75, "blur_sigma": 0.8, "noise_std": 6.0, "intensity_shift": -15.0},
    ),
    "fundus": _devices(
        {"name": "reference_desktop_camera"},
        {"name": "warm_flash_camera", "channel_gain": [1.08, 1.0, 0.88], "gamma": 0.95, "vignetting": 0.15},
        {"name": "nonmydriatic_small_pupil", "vignetting": 0.45, "gamma": 1.2, "contrast": 0.85, "blur_sigma": 0.6,
         "noise_std": 3.0},
        {"name": "smartphone_adapter", "channel_gain": [0.97, 1.03, 1.12], "saturation": 1.15, "vignetting": 0.35,
         "blur_sigma": 0.8, "downsample": 2, "noise_std": 6.0},
        {"name": "portable_lowlight", "channel_gain": [1.12, 0.95, 0.85], "saturation": 0.85, "vignetting": 0.55,
         "gamma": 1.35, "contrast": 0.75, "blur_sigma": 1.0, "noise_std": 8.0, "intensity_shift": -10.0},
    ),
    "dermatoscopy": _devices(
        {"name": "reference_dermatoscope"},
        {"name": "polarised_led", "contrast": 1.15, "saturation": 1.1, "channel_gain": [1.0, 0.97, 0.93]},
        {"name": "contact_lens_dark_corners", "vignetting": 0.5, "gamma": 1.1},
        {"name": "smartphone_attachment", "channel_gain": [0.95, 1.0, 1.08], "vignetting": 0.2, "blur_sigma": 0.6,
         "downsample": 2, "noise_std": 6.0},
        {"name": "clinic_camera_warm", "channel_gain": [1.12, 0.98, 0.86], "saturation": 0.85, "vignetting": 0.6,
         "gamma": 1.2, "blur_sigma": 0.8, "noise_std": 8.0},
    ),
    "microscopy": _devices(
        {"name": "reference_microscope"},
        {"name": "strong_stain_led", "saturation": 1.2, "channel_gain": [0.95, 0.92, 1.05], "contrast": 1.1},
        {"name": "uneven_illumination", "vignetting": 0.3, "gamma": 1.1, "blur_sigma": 0.5},
        {"name": "old_camera_halogen", "channel_gain": [1.06, 1.0, 0.92], "noise_std": 6.0, "downsample": 2,
         "intensity_shift": 8.0},
        {"name": "faded_stain_defocus", "saturation": 0.75, "channel_gain": [1.05, 1.0, 0.9], "blur_sigma": 1.0,
         "gamma": 0.85, "vignetting": 0.35, "noise_std": 5.0, "intensity_shift": 10.0},
    ),
    "microscopy_grayscale": _devices(
        {"name": "reference_microscope"},
        {"name": "bright_exposure", "gamma": 0.85, "contrast": 1.15},
        {"name": "uneven_illumination", "vignetting": 0.3, "gamma": 1.1, "blur_sigma": 0.5},
        {"name": "old_camera", "noise_std": 6.0, "downsample": 2, "intensity_shift": 8.0},
        {"name": "defocused_lowlight", "blur_sigma": 1.0, "gamma": 1.3, "contrast": 0.8, "vignetting": 0.35,
         "noise_std": 8.0, "intensity_shift": -8.0},
    ),
    "histology": _devices(
        {"name": "reference_slide_scanner"},
        {"name": "eosin_heavy_lab", "channel_gain": [1.06, 0.92, 1.02], "saturation": 1.15},
        {"name": "haematoxylin_heavy_lab", "channel_gain": [0.9, 0.95, 1.08], "saturation": 1.1, "gamma": 1.1},
        {"name": "older_scanner", "channel_gain": [1.04, 1.0, 0.94], "blur_sigma": 0.6, "downsample": 2,
         "noise_std": 4.0},
        {"name": "faded_slides_other_scanner", "saturation": 0.7, "channel_gain": [1.08, 0.96, 0.9], "gamma": 0.85,
         "blur_sigma": 0.8, "noise_std": 5.0, "intensity_shift": 12.0},
    ),
    "oct": _devices(
        {"name": "reference_sd_oct"},
        {"name": "frame_averaged", "blur_sigma": 0.4, "contrast": 1.1},
        {"name": "single_frame_speckled", "speckle_std": 0.25, "noise_std": 3.0},
        {"name": "older_td_oct", "speckle_std": 0.12, "depth_attenuation": 0.5, "downsample": 2, "blur_sigma": 0.7,
         "contrast": 0.8},
        {"name": "portable_oct", "speckle_std": 0.35, "depth_attenuation": 0.7, "gamma": 1.2, "contrast": 0.7,
         "blur_sigma": 0.8, "noise_std": 6.0},
    ),
    "ct": _devices(
        {"name": "reference_ct"},
        {"name": "sharp_kernel", "contrast": 1.2, "noise_std": 4.0},
        {"name": "smooth_kernel_thick_slice", "blur_sigma": 0.8, "contrast": 0.9},
        {"name": "low_dose_protocol", "noise_std": 10.0, "gamma": 1.05},
        {"name": "older_scanner_lowdose", "noise_std": 12.0, "blur_sigma": 0.8, "downsample": 2, "contrast": 0.8,
         "intensity_shift": 10.0},
    ),
}

#: The colour presets render RGB images only (devices.py's colour rule).
RGB_MODALITIES = frozenset(
    modality for modality, profiles in PRESETS.items()
    if any("channel_gain" in p or "saturation" in p for p in profiles)
)


def modality_of(dataset: str) -> str | None:
    """The modality of a dataset name (case and surrounding spaces ignored), None if unknown."""
    return MODALITY_BY_DATASET.get(str(dataset).strip().lower())


def preset_profiles(modality: str) -> list[dict[str, Any]]:
    """A fresh copy of the modality's five profiles, as `devices.profiles` entries."""
    return copy.deepcopy(list(PRESETS[modality]))


def preset_held_out(modality: str) -> str:
    """The name of the modality's held-out device (the last profile, prevalence 0)."""
    return PRESETS[modality][-1]["name"]
