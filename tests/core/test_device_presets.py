"""Modality presets of the imaging devices, the effects other modalities need, `profiles: auto`."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

import fedmic_pipeline.core.devices as devices_module
from fedmic_pipeline.core.device_presets import (
    MODALITY_BY_DATASET,
    PRESETS,
    RGB_MODALITIES,
    modality_of,
    preset_held_out,
    preset_profiles,
)
from fedmic_pipeline.core.devices import (
    DeviceConfigError,
    DeviceProfile,
    DevicesConfig,
    profiles_from_params,
    render_device,
    resolve_auto,
)

from fixtures_pipelines import PROJECT_ROOT

PARTITION_CONF = PROJECT_ROOT / "conf/base/parameters_data_partition.yml"

# sha256 of the shipped chest-X-ray profiles' renderings of `_fixed_images`, computed with
# devices.py as it was before speckle, colour, vignetting and depth attenuation were added
# (seed (42, 2, device)). A change here changes every partition file of PneumoniaMNIST.
GOLDEN_SHA256 = {
    False: {
        "reference_scanner": "8898376bed61c9fb371427a3d571719bb79341339972a5b5d585a789f59c790a",
        "high_contrast_dr": "c201808e83bca64f75c0437185c618ef521a8f7140d6a64a6fd74855904247e0",
        "legacy_cr_blurred": "4108ab1c7c937115219f16d85d442e49e98141cfd9a5a1119250a81cd76ed414",
        "rural_clinic_noisy": "c26b054967882b81e8fd5271fd69b24979264d46413aca2ac2259be8e17e012b",
        "portable_lowdose": "e10696c8022e51ee73a8dafe3f67a558114c1d77f606a6f6f8a3a195cec1ff02",
    },
    True: {
        "reference_scanner": "388cdbb2c8a290209b366a3e12b7906c3edb758e2e447a0085f049198b7e2bba",
        "high_contrast_dr": "27c570d3642bf525f75a1ab19571964c20eb5f7a6221f480fac3d9189158ff2c",
        "legacy_cr_blurred": "7251d583bf9bca14078239ba16aee794903b7d034a4306e51f81d6d1abd33f24",
        "rural_clinic_noisy": "5b9cc2b3ea543de19d1a02003c299d169e5b67ec209bcc371ad1f317332217de",
        "portable_lowdose": "4ed59f8f8d09a87fb82ad8c6cf565bc2c1f0be2c7f1046822887e8464cbb8a1e",
    },
}


def _fixed_images(rgb: bool) -> np.ndarray:
    """Six 28x28 images from integer arithmetic only (no generator whose stream could change)."""
    i, r, c = np.meshgrid(np.arange(6), np.arange(28), np.arange(28), indexing="ij")
    g = (i * 37 + r * 11 + c * 7 + (r * c) % 23 * 5) % 256
    if not rgb:
        return g.astype(np.uint8)
    return np.stack([g, (g * 3 + 50) % 256, 255 - g], axis=-1).astype(np.uint8)


def _conf_devices() -> dict:
    return yaml.safe_load(PARTITION_CONF.read_text())["devices"]


def _auto(dataset: str | None, **extra) -> dict:
    params = {"seed": 42, "profiles": "auto", "held_out": "auto", **extra}
    if dataset is not None:
        params["dataset"] = dataset
    return params


def _probe(**kwargs) -> DeviceProfile:
    return DeviceProfile(name="probe", **kwargs)


# ---- the chest X-ray devices are unchanged ----------------------------------------------

def test_xray_preset_is_exactly_the_shipped_profiles():
    conf = _conf_devices()
    assert preset_profiles("xray") == conf["profiles"]
    assert preset_held_out("xray") == conf["held_out"]
    assert modality_of("pneumoniamnist") == "xray"
    assert DevicesConfig.from_params(_auto("pneumoniamnist", seed=conf["seed"])) == DevicesConfig.from_params(conf)


@pytest.mark.parametrize("rgb", [False, True])
def test_shipped_profiles_render_the_same_bytes_as_before_the_new_effects(rgb):
    images = _fixed_images(rgb)
    config = DevicesConfig.from_params(_conf_devices())
    got = {p.name: hashlib.sha256(render_device(images, p, (42, 2, d)).tobytes()).hexdigest()
           for d, p in enumerate(config.profiles)}
    assert got == GOLDEN_SHA256[rgb]


def test_explicit_parameters_pass_through_resolve_auto_untouched():
    conf = _conf_devices()
    assert resolve_auto(conf) is conf


# ---- every preset --------------------------------------------------------------------

@pytest.mark.parametrize("modality", sorted(PRESETS))
def test_every_preset_parses_and_has_four_training_devices_and_one_held_out(modality):
    profiles = profiles_from_params(preset_profiles(modality))
    assert len(profiles) == 5 and profiles[0].is_identity
    assert profiles[-1].name == preset_held_out(modality) and profiles[-1].prevalence == 0.0
    training = [p.prevalence for p in profiles[:-1]]
    assert all(p > 0 for p in training) and sum(training) == pytest.approx(1.0)
    assert training == sorted(training, reverse=True)  # imbalanced: one common, one rare
    assert (modality in RGB_MODALITIES) == any(p.is_colour for p in profiles)


@pytest.mark.parametrize("modality", sorted(PRESETS))
def test_every_preset_renders_deterministically(modality):
    config = DevicesConfig.from_params({"seed": 7, "profiles": preset_profiles(modality), "held_out": preset_held_out(modality)})
    kinds = [True] if modality in RGB_MODALITIES else [False, True]
    for rgb in kinds:
        images = _fixed_images(rgb)
        for d, profile in enumerate(config.profiles):
            a = render_device(images, profile, config.test_seed(d))
            assert a.dtype == np.uint8 and a.shape == images.shape
            assert np.array_equal(a, render_device(images, profile, config.test_seed(d))), profile.name
            assert profile.is_identity or not np.array_equal(a, images), profile.name


def test_colour_presets_refuse_grayscale_images_with_the_fix():
    gray = _fixed_images(False)
    for modality in RGB_MODALITIES:
        colour = [p for p in profiles_from_params(preset_profiles(modality)) if p.is_colour]
        assert colour
        for profile in colour:
            for images in (gray, gray[..., None]):
                with pytest.raises(DeviceConfigError, match=r"grayscale.*RGB.*channel_gain to \[1, 1, 1\]"):
                    render_device(images, profile, 0)


def test_every_2d_medmnist_dataset_has_a_preset_that_suits_its_channels():
    medmnist = pytest.importorskip("medmnist")
    from medmnist.dataset import MedMNIST2D

    flags = [k for k, v in medmnist.INFO.items() if issubclass(getattr(medmnist, v["python_class"]), MedMNIST2D)]
    assert sorted(flags) == sorted(MODALITY_BY_DATASET)
    for flag in flags:
        rgb = int(medmnist.INFO[flag]["n_channels"]) == 3
        assert rgb or MODALITY_BY_DATASET[flag] not in RGB_MODALITIES, flag


# ---- each new effect does what it says -------------------------------------------------

def test_speckle_is_multiplicative_its_spread_scales_with_intensity():
    dark = np.full((8, 28, 28), 50, dtype=np.uint8)
    bright = np.full((8, 28, 28), 200, dtype=np.uint8)
    profile = _probe(speckle_std=0.2)
    out_dark = render_device(dark, profile, 3).astype(float)
    out_bright = render_device(bright, profile, 3).astype(float)
    assert out_dark.std() == pytest.approx(0.2 * 50, rel=0.1)
    assert out_bright.std() == pytest.approx(0.2 * 200, rel=0.1)
    assert out_dark.mean() == pytest.approx(50, abs=1.0)
    black = np.zeros((2, 28, 28), dtype=np.uint8)  # no signal, no speckle
    assert np.array_equal(render_device(black, profile, 3), black)


def test_speckle_has_its_own_stream_and_does_not_depend_on_chunking(monkeypatch):
    images = _fixed_images(True)
    noise_only = _probe(noise_std=5.0)
    both = _probe(noise_std=5.0, speckle_std=0.1)
    # with zero signal the speckle term vanishes, so the additive noise must be untouched
    black = np.zeros_like(images)
    assert np.array_equal(render_device(black, both, 9), render_device(black, noise_only, 9))
    profile = _probe(noise_std=5.0, speckle_std=0.2, channel_gain=[1.1, 1.0, 0.9], saturation=1.2,
                     vignetting=0.4, depth_attenuation=0.5, blur_sigma=0.6, downsample=2)
    whole = render_device(images, profile, (1, 2, 3))
    monkeypatch.setattr(devices_module, "_CHUNK", 4)
    assert np.array_equal(render_device(images, profile, (1, 2, 3)), whole)


def test_channel_gain_scales_each_channel_mean_by_its_gain():
    flat = np.full((2, 28, 28, 3), 100, dtype=np.uint8)
    out = render_device(flat, _probe(channel_gain=[1.2, 1.0, 0.8]), 0)
    assert out[..., 0].mean() == pytest.approx(120.0, abs=0.5)
    assert out[..., 1].mean() == pytest.approx(100.0, abs=0.5)
    assert out[..., 2].mean() == pytest.approx(80.0, abs=0.5)
    images = _fixed_images(True)
    gained = render_device(images, _probe(channel_gain=[1.1, 1.0, 0.9]), 0).astype(float)
    assert gained[..., 0].mean() > images[..., 0].mean() and gained[..., 2].mean() < images[..., 2].mean()


def test_saturation_moves_channels_towards_or_away_from_their_mean():
    images = _fixed_images(True)
    spread = lambda x: float(x.astype(float).std(axis=-1).mean())  # noqa: E731
    grey = render_device(images, _probe(saturation=0.0), 0)
    assert spread(grey) <= 0.5  # channels equal up to rounding
    assert spread(render_device(images, _probe(saturation=0.5), 0)) < spread(images) < spread(
        render_device(images, _probe(saturation=1.3), 0)
    )


def test_vignetting_darkens_the_corners_more_than_the_centre():
    flat = np.full((1, 28, 28), 200, dtype=np.uint8)
    out = render_device(flat, _probe(vignetting=0.5), 0)[0].astype(float)
    centre, corners = out[13:15, 13:15].mean(), np.mean([out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]])
    assert centre >= 199 and corners < 0.6 * 200 and centre - corners > 60
    assert out[14, 14] > out[14, 7] > out[14, 0]  # falls off with the distance from the centre
    rgb = render_device(np.full((1, 28, 28, 3), 200, dtype=np.uint8), _probe(vignetting=0.5), 0)
    for channel in range(3):  # illumination, not colour: grayscale and RGB alike
        assert np.array_equal(rgb[0, ..., channel], out.astype(np.uint8))


def test_depth_attenuation_darkens_with_depth_row_by_row():
    flat = np.full((1, 28, 28), 200, dtype=np.uint8)
    out = render_device(flat, _probe(depth_attenuation=1.0), 0)[0].astype(float)
    rows = out.mean(axis=1)
    assert np.all(np.diff(rows) <= 0) and rows[0] > 190 and rows[-1] == pytest.approx(200 * np.exp(-1.0), abs=2.0)
    assert np.all(out == out[:, :1])  # constant along a row


def test_new_fields_at_their_defaults_are_the_identity():
    profile = DeviceProfile.from_dict({"name": "probe", "speckle_std": 0, "channel_gain": [1, 1, 1], "saturation": 1,
                                       "vignetting": 0, "depth_attenuation": 0})
    assert profile.is_identity and not profile.is_colour
    images = _fixed_images(False)
    out = render_device(images, profile, 0)
    assert np.array_equal(out, images) and out is not images


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"channel_gain": [1.0, 1.0]}, "channel_gain must be three finite numbers > 0"),
        ({"channel_gain": 1.1}, "channel_gain must be three"),
        ({"channel_gain": [1.0, 0.0, 1.0]}, "channel_gain must be three"),
        ({"vignetting": 1.5}, "vignetting"),
        ({"speckle_std": -0.1}, "speckle_std"),
        ({"saturation": "high"}, "saturation must be a number"),
        ({"depth_attenuation": float("nan")}, "depth_attenuation"),
    ],
)
def test_bad_new_fields_name_the_field(params, match):
    with pytest.raises(DeviceConfigError, match=match):
        DeviceProfile.from_dict({"name": "probe", **params})


# ---- devices.profiles: auto ------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(MODALITY_BY_DATASET))
def test_auto_takes_the_preset_of_the_datasets_modality(dataset):
    config = DevicesConfig.from_params(_auto(dataset))
    modality = MODALITY_BY_DATASET[dataset]
    assert config.profiles == tuple(profiles_from_params(preset_profiles(modality)))
    assert config.held_out == preset_held_out(modality)
    assert DevicesConfig.from_params(_auto(f"  {dataset.upper()} ")).names == config.names


def test_auto_with_an_unknown_dataset_is_one_clear_paragraph():
    with pytest.raises(DeviceConfigError) as err:
        DevicesConfig.from_params(_auto("mysterymnist"))
    message = str(err.value)
    assert "\n" not in message and "'mysterymnist'" in message
    assert "breastmnist (ultrasound)" in message and "devices.profiles" in message and "MODALITY_BY_DATASET" in message


def test_auto_needs_the_dataset_and_held_out_auto_needs_auto_profiles():
    with pytest.raises(DeviceConfigError, match=r"add `dataset: \$\{dataset.name\}`"):
        DevicesConfig.from_params(_auto(None))
    with pytest.raises(DeviceConfigError, match="held_out: auto .* needs devices.profiles: auto"):
        DevicesConfig.from_params({**_conf_devices(), "held_out": "auto"})
    with pytest.raises(DeviceConfigError, match="list of device profiles or `auto`"):
        DevicesConfig.from_params({"seed": 0, "profiles": "automatic"})
    # a named held-out device of the preset, or none, is fine
    assert DevicesConfig.from_params(_auto("breastmnist", held_out="compound_smoothing")).held_out == "compound_smoothing"
    assert DevicesConfig.from_params(_auto("breastmnist", held_out=None)).held_out is None


def test_auto_follows_dataset_name_through_the_kedro_config(tmp_path):
    """`dataset: ${dataset.name}` resolves in Kedro's loader, `--params dataset.name=` included."""
    from kedro.config import OmegaConfigLoader

    from fedmic_pipeline.configuration import validate_parameters

    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "local").mkdir()
    (conf / "base" / "parameters_data_ingestion.yml").write_text(
        (PROJECT_ROOT / "conf/base/parameters_data_ingestion.yml").read_text()
    )
    partition = yaml.safe_load(PARTITION_CONF.read_text())
    partition["devices"] = {"seed": 42, "dataset": "${dataset.name}", "profiles": "auto", "held_out": "auto"}
    (conf / "base" / "parameters_data_partition.yml").write_text(yaml.safe_dump(partition, sort_keys=False))
    loader = OmegaConfigLoader(str(conf), base_env="base", default_run_env="local", runtime_params={"dataset": {"name": "dermamnist"}})
    params = loader["parameters"]
    config = DevicesConfig.from_params(params["devices"])
    assert config.held_out == preset_held_out("dermatoscopy") and config.names[0] == "reference_dermatoscope"
    validate_parameters(params, ["devices"])


def test_partitioning_with_auto_records_the_resolved_preset_and_checks_the_dataset():
    from fixtures_pipelines import synthetic_dataset

    from fedmic_pipeline.partitioning import PartitionInputError, partition_in_memory

    dataset, info = synthetic_dataset(n_train=120, n_val=30, n_test=20, size=16, rgb=True)
    partition = {**yaml.safe_load(PARTITION_CONF.read_text())["partition"], "num_clients": 4, "min_samples_per_client": 5}
    devices = _auto("dermamnist")
    clients, global_test, manifest = partition_in_memory(dataset, {**info, "flag": "dermamnist"}, partition, devices)
    recorded = manifest["parameters"]["devices"]
    assert recorded["profiles"] == preset_profiles("dermatoscopy") and recorded["held_out"] == "clinic_camera_warm"
    assert manifest["held_out_device"] == "clinic_camera_warm"
    assert "clinic_camera_warm" not in {c["device_name"] for c in manifest["client_devices"].values()}
    assert global_test["images_clinic_camera_warm"].shape == global_test["images"].shape
    with pytest.raises(PartitionInputError, match="validated dataset is 'pathmnist'"):
        partition_in_memory(dataset, {**info, "flag": "pathmnist"}, partition, devices)
