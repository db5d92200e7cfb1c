"""Imaging-device rendering and hospital assignment."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedmic_pipeline.core.devices import (
    DeviceConfigError,
    DeviceProfile,
    DevicesConfig,
    assign_devices,
    render_device,
)

from fixtures_pipelines import PROJECT_ROOT


def _images(n: int = 16, size: int = 28, rgb: bool = False, seed: int = 0) -> np.ndarray:
    """Smooth blobs plus fine texture: both low and high frequencies to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    centres = rng.uniform(0.3, 0.7, size=(n, 2))
    blobs = np.exp(-(((yy - centres[:, :1, None]) ** 2) + ((xx - centres[:, 1:, None]) ** 2)) / 0.05)
    texture = rng.uniform(-1, 1, size=(n, size, size))
    images = np.clip(60 + 120 * blobs + 30 * texture, 0, 255).astype(np.uint8)
    if rgb:
        images = np.stack([images, images[:, ::-1], 255 - images], axis=-1)
    return images


def _high_frequency_energy(images: np.ndarray) -> float:
    x = images.astype(np.float64)
    return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2))


def _profile(**kwargs) -> DeviceProfile:
    return DeviceProfile(name="probe", **kwargs)


def _project_profiles() -> DevicesConfig:
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_data_partition.yml").read_text())
    return DevicesConfig.from_params(params["devices"])


@pytest.mark.parametrize("rgb", [False, True])
def test_every_project_profile_is_deterministic_and_keeps_shape_and_dtype(rgb):
    images = _images(rgb=rgb)
    for profile in _project_profiles().profiles:
        a = render_device(images, profile, (42, 1, 3))
        b = render_device(images, profile, (42, 1, 3))
        assert a.dtype == np.uint8 and a.shape == images.shape
        assert np.array_equal(a, b), profile.name
        if profile.noise_std > 0:
            assert not np.array_equal(a, render_device(images, profile, (42, 1, 4))), profile.name


def test_identity_profile_returns_the_input_and_does_not_alias_it():
    images = _images()
    out = render_device(images, _profile(), 0)
    assert np.array_equal(out, images) and out is not images


def test_rendering_does_not_depend_on_chunking(monkeypatch):
    import fedmic_pipeline.core.devices as devices

    images = _images(n=10)
    profile = _profile(gamma=1.2, blur_sigma=0.7, downsample=2, noise_std=5.0)
    whole = render_device(images, profile, 3)
    monkeypatch.setattr(devices, "_CHUNK", 3)
    assert np.array_equal(render_device(images, profile, 3), whole)


def test_gamma_above_one_darkens_mid_tones():
    images = np.full((2, 8, 8), 128, dtype=np.uint8)
    assert render_device(images, _profile(gamma=1.5), 0).mean() < 128
    assert render_device(images, _profile(gamma=0.7), 0).mean() > 128


def test_contrast_stretches_around_mid_grey():
    images = _images()
    stretched = render_device(images, _profile(contrast=1.3), 0)
    flattened = render_device(images, _profile(contrast=0.7), 0)
    assert stretched.astype(float).std() > images.astype(float).std() > flattened.astype(float).std()
    grey = np.full((1, 4, 4), 128, dtype=np.uint8)  # 128/255 is just above mid-grey
    assert abs(int(render_device(grey, _profile(contrast=0.5), 0)[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize("kwargs", [{"blur_sigma": 1.0}, {"downsample": 2}, {"downsample": 3}])
def test_blur_and_resolution_loss_lower_high_frequency_energy(kwargs):
    images = _images()
    out = render_device(images, _profile(**kwargs), 0)
    assert _high_frequency_energy(out) < 0.5 * _high_frequency_energy(images)
    assert abs(out.astype(float).mean() - images.astype(float).mean()) < 3.0  # brightness about kept


def test_noise_raises_the_spread_of_a_flat_image():
    flat = np.full((4, 28, 28), 100, dtype=np.uint8)
    out = render_device(flat, _profile(noise_std=10.0), 1).astype(float)
    assert out.std() == pytest.approx(10.0, rel=0.1)
    assert out.mean() == pytest.approx(100.0, abs=0.5)


def test_intensity_shift_moves_the_mean_and_clips():
    flat = np.full((2, 5, 5), 100, dtype=np.uint8)
    assert np.all(render_device(flat, _profile(intensity_shift=20.0), 0) == 120)
    assert np.all(render_device(flat, _profile(intensity_shift=400.0), 0) == 255)
    assert np.all(render_device(flat, _profile(intensity_shift=-400.0), 0) == 0)


def test_rgb_channels_are_rendered_alike_by_the_deterministic_steps():
    grey = _images(n=4)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    profile = _profile(gamma=1.2, contrast=0.9, blur_sigma=0.8, downsample=2, intensity_shift=5.0)
    out = render_device(rgb, profile, 0)
    expected = render_device(grey, profile, 0)
    for channel in range(3):
        assert np.array_equal(out[..., channel], expected)


def test_render_rejects_non_uint8_and_bad_shapes():
    with pytest.raises(DeviceConfigError, match="uint8"):
        render_device(np.zeros((2, 4, 4), dtype=np.float32), _profile(gamma=2.0), 0)
    with pytest.raises(DeviceConfigError, match="shape"):
        render_device(np.zeros((4, 4), dtype=np.uint8), _profile(gamma=2.0), 0)
    with pytest.raises(DeviceConfigError, match="downsample"):
        render_device(np.zeros((1, 4, 4), dtype=np.uint8), _profile(downsample=5), 0)


def test_profile_validation_names_the_field():
    with pytest.raises(DeviceConfigError, match="gamma"):
        _profile(gamma=0.0)
    with pytest.raises(DeviceConfigError, match="unknown keys \\['sigma'\\]"):
        DeviceProfile.from_dict({"name": "x", "sigma": 1.0})
    with pytest.raises(DeviceConfigError, match="downsample"):
        DeviceProfile.from_dict({"name": "x", "downsample": 1.5})


# ---- assignment -----------------------------------------------------------------------

def test_held_out_device_is_never_assigned_and_every_other_device_is_used():
    config = _project_profiles()
    held = config.names.index(config.held_out)
    for seed in range(50):
        assignment = assign_devices(10, config.profiles, config.held_out, np.random.default_rng(seed))
        assert assignment.shape == (10,) and assignment.dtype == np.int64
        assert held not in assignment
        assert set(assignment.tolist()) == {i for i, p in enumerate(config.profiles) if p.name != config.held_out and p.prevalence > 0}


def test_assignment_follows_prevalence_and_is_deterministic():
    profiles = [DeviceProfile("common", prevalence=0.9), DeviceProfile("rare", prevalence=0.1), DeviceProfile("gone", prevalence=0.5)]
    a = assign_devices(200, profiles, "gone", np.random.default_rng(3))
    assert np.array_equal(a, assign_devices(200, profiles, "gone", np.random.default_rng(3)))
    counts = np.bincount(a, minlength=3)
    assert counts[2] == 0 and counts[1] >= 1 and counts[0] > 4 * counts[1]


def test_fewer_clients_than_devices_get_distinct_devices():
    profiles = [DeviceProfile(f"d{i}", prevalence=0.25) for i in range(4)]
    a = assign_devices(3, profiles, None, np.random.default_rng(0))
    assert len(set(a.tolist())) == 3


def test_assignment_errors_are_clear():
    profiles = [DeviceProfile("a", prevalence=1.0), DeviceProfile("b", prevalence=0.0)]
    with pytest.raises(DeviceConfigError, match="'c' is not a device profile name"):
        assign_devices(3, profiles, "c", np.random.default_rng(0))
    with pytest.raises(DeviceConfigError, match="prevalence > 0"):
        assign_devices(3, profiles, "a", np.random.default_rng(0))
    with pytest.raises(DeviceConfigError, match="unique"):
        DevicesConfig.from_params({"seed": 0, "profiles": [{"name": "a"}, {"name": "a"}]})
