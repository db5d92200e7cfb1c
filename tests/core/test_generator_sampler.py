"""The fitted sampler (core/synthesis/sampler.py) on the checkerboard-free decoder.

Small real tensors, one CPU thread; no mocks.
"""

from __future__ import annotations

import torch

from fedmic_pipeline.core.protocol import ClientData, DataSpec
from fedmic_pipeline.core.synthesis import build_generator
from fedmic_pipeline.core.synthesis.sampler import fit_sampler, robust_noise_variance

SPEC = DataSpec(in_channels=1, num_classes=2, image_size=16)
OPTIONS = {"latent_dim": 4, "widths": (8, 16), "embed_dim": 4, "decoder": "upsample"}


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Noise-free images: a vertical ramp plus one sharp edge at a random column."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.6, 16).view(1, 1, 16, 1).expand(n, 1, 16, 16).clone()
    cols = torch.randint(3, 13, (n,), generator=gen)
    for i, c in enumerate(cols.tolist()):
        ramp[i, :, :, c:] += 0.3
    return ramp


def _client(client_id: int, device: int, noise_std: float, seed: int) -> ClientData:
    x = _smooth_images(60, seed)
    x = (x + noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100))).clamp(0, 1)
    y = torch.arange(60) % 2
    return ClientData(client_id=client_id, train_x=x, train_y=y, val_x=x[:4], val_y=y[:4], test_x=x[:4], test_y=y[:4],
                      device_id=device)  # fmt: skip


def test_the_noise_estimate_sees_white_noise_and_ignores_edges():
    clean = _smooth_images(40, 0)
    assert float(robust_noise_variance(clean).sqrt().max()) < 0.005
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    estimate = float(robust_noise_variance(noisy).sqrt().mean())
    assert abs(estimate - 0.05) < 0.008


def test_fit_sampler_gives_the_noisy_device_its_noise_and_fits_every_held_cell():
    model = build_generator(SPEC, 3, seed=0, **OPTIONS)
    clients = [_client(0, 0, 0.0, 1), _client(1, 1, 0.06, 2)]
    summary = fit_sampler(model, clients)
    assert summary["latent_fitted"] and summary["latent_cells_with_own_data"] == 4
    assert float(model.noise_std[1]) > 0.03 > float(model.noise_std[0])
    # device 2 has no data: its cells borrow their class, its noise stays 0
    assert model.latent_fitted[:, 2].tolist() == [1.0, 1.0] and float(model.noise_std[2]) == 0.0
    # the fitted Gaussians are where the encoder put the images, not N(0, I)
    x, y = clients[0].train_x, clients[0].train_y
    mu, _ = model.encode(x, model.condition(y, torch.zeros_like(y)))
    assert torch.allclose(model.latent_mean[0, 0], mu[y == 0].mean(0), atol=1e-5)


def test_sampling_with_the_fitted_sampler_is_deterministic_and_adds_the_device_noise():
    model = build_generator(SPEC, 3, seed=0, **OPTIONS)
    fit_sampler(model, [_client(0, 0, 0.0, 1), _client(1, 1, 0.06, 2)])

    def draw(device: int, batch_size: int) -> torch.Tensor:
        return model.sample([0] * 600, [device] * 600, torch.Generator().manual_seed(7), batch_size=batch_size)

    # the batch size never changes a sample (up to the convolution kernels' float summation order)
    assert torch.allclose(draw(1, 1024), draw(1, 37), atol=1e-5)
    noisy, clean = draw(1, 1024), draw(0, 1024)
    assert float(robust_noise_variance(noisy).sqrt().mean()) > 0.03
    assert float(robust_noise_variance(clean).sqrt().mean()) < 0.02

