"""core/synthesis/flow.py: the flow-matching generator, trained and sampled for real on toy data.

The toy images (``test_synthesis._images``) put the class in a bright band and the device in
the contrast, so a generator that has learnt its conditioning shows both where they belong.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.protocol import ConfigurationError, DataSpec
from fedmic_pipeline.core.synthesis import (
    GeneratorTrainingConfig,
    build_generator,
    generator_from_record,
    generator_record,
    state_sha256,
    train_generator_federated,
)
from fedmic_pipeline.core.synthesis.flow import ConditionalFlow, flow_matching_loss
from fedmic_pipeline.core.synthesis.sampler import fit_flow_noise, robust_noise_variance

from .test_synthesis import HELD_OUT, N_DEVICES, SPEC, _clients, client_arrays  # noqa: F401 (fixture)

FLOW = {"architecture": "flow_matching", "widths": (8, 16), "embed_dim": 8, "sample_steps": 6}


def _pooled(clients):
    x = torch.cat([c.train_x for c in clients])
    y = torch.cat([c.train_y for c in clients])
    d = torch.cat([torch.full_like(c.train_y, c.device_id) for c in clients])
    return x, y, d


def _class_one_contrast(model) -> float:
    """Class 1's band minus the rest of the image, over 32 samples of class 1 on device 1
    drawn from the same noise: how strongly the samples show their class."""
    x = model.sample([1] * 32, [1] * 32, torch.Generator().manual_seed(3))
    return float(x[:, :, 5:10].mean() - torch.cat([x[:, :, :5], x[:, :, 10:]], dim=2).mean())


@pytest.fixture(scope="module")
def trained_flow(client_arrays):  # noqa: F811
    """The tiny flow trained centrally on the pooled toy images (150 Adam steps), and its losses."""
    torch.manual_seed(0)
    model = build_generator(SPEC, N_DEVICES, seed=0, **FLOW)
    x, y, d = _pooled(_clients(client_arrays))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = flow_matching_loss(model, x, y, d, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def test_flow_learns_where_class_and_device_show(trained_flow):
    model, losses = trained_flow
    assert isinstance(model, ConditionalFlow)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])

    def draw(c: int, dev: int) -> torch.Tensor:
        return model.sample([c] * 16, [dev] * 16, torch.Generator().manual_seed(7))  # the same noise every time

    base = draw(0, 0)
    assert base.shape == (16, 1, 16, 16) and base.min() >= 0 and base.max() <= 1
    assert torch.equal(base, draw(0, 0))
    band = slice(5, 10)  # class 1's band (16 // 3 = 5 rows per class)
    assert float(draw(1, 0)[:, :, band].mean()) > float(base[:, :, band].mean()) + 0.1
    assert float(base[:, :, 0:5].mean()) > float(base[:, :, band].mean()) + 0.1
    # device 2 has the higher contrast: its band is brighter and its background darker than device 0's
    high = draw(0, 2)
    assert float(high[:, :, 0:5].mean() - high[:, :, 10:].mean()) > float(base[:, :, 0:5].mean() - base[:, :, 10:].mean()) + 0.05


def test_flow_sampling_ignores_batch_size_and_survives_the_record():
    model = build_generator(SPEC, N_DEVICES, seed=3, **FLOW)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # a non-zero velocity, so sampling does something
    classes, devices = [0, 1, 2, 0, 1], [0, 1, 2, 2, 0]
    whole = model.sample(classes, devices, torch.Generator().manual_seed(1))
    chunked = model.sample(classes, devices, torch.Generator().manual_seed(1), batch_size=2)
    assert torch.allclose(whole, chunked, atol=1e-6)
    again = generator_from_record(generator_record(model))
    assert isinstance(again, ConditionalFlow) and again.sample_steps == FLOW["sample_steps"]
    assert state_sha256(again) == state_sha256(model)
    assert torch.equal(whole, again.sample(classes, devices, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(("channels", "size"), [(3, 28), (1, 32), (3, 64)])
def test_flow_handles_rgb_and_larger_images(channels, size):
    model = build_generator(DataSpec(channels, 5, size), 3, seed=0, **FLOW)
    x = torch.rand(4, channels, size, size)
    loss = flow_matching_loss(model, x, torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.sample([4, 3], [2, 0], torch.Generator().manual_seed(0)).shape == (2, channels, size, size)


def test_flow_options_are_checked():
    with pytest.raises(ConfigurationError, match="Unknown generator option.*latent_dim"):
        build_generator(SPEC, N_DEVICES, seed=0, architecture="flow_matching", latent_dim=4)
    with pytest.raises(ConfigurationError, match="architecture must be one of"):
        build_generator(SPEC, N_DEVICES, seed=0, architecture="gan")
    with pytest.raises(ConfigurationError, match="sample_steps"):
        build_generator(SPEC, N_DEVICES, seed=0, architecture="flow_matching", sample_steps=0)


def test_federated_flow_training_is_deterministic_and_refuses_the_vae_sampler(client_arrays):  # noqa: F811
    config = GeneratorTrainingConfig(rounds=2, local_epochs=1, batch_size=16, model_options=FLOW)
    first = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=5, held_out_device=HELD_OUT, num_threads=1)
    second = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=5, held_out_device=HELD_OUT, num_threads=1)
    assert isinstance(first.model, ConditionalFlow)
    assert state_sha256(first.model) == state_sha256(second.model)
    assert first.history[0]["recon"] is None and np.isfinite(first.summary["final_loss"])
    with pytest.raises(ConfigurationError, match="fit_latent refits"):
        train_generator_federated(
            _clients(client_arrays), SPEC, N_DEVICES, GeneratorTrainingConfig(rounds=1, fit_latent=True, model_options=FLOW), seed=0
        )
    with pytest.raises(ConfigurationError, match="cond_dropout"):
        train_generator_federated(
            _clients(client_arrays), SPEC, N_DEVICES, GeneratorTrainingConfig(rounds=1, cond_dropout=0.1, model_options={}), seed=0
        )


def test_guidance_trains_the_null_condition_and_strengthens_the_class(client_arrays):  # noqa: F811
    """cond_dropout trains the "no condition" rows (FedAvg row-weights them over every client);
    guidance > 1 pushes a sample further toward its class than the plain conditional flow."""
    config = GeneratorTrainingConfig(rounds=3, local_epochs=4, batch_size=16, lr=3e-3, cond_dropout=0.3, model_options=FLOW)
    clients = _clients(client_arrays)
    untrained = build_generator(SPEC, N_DEVICES, seed=1, **FLOW)
    model = train_generator_federated(clients, SPEC, N_DEVICES, config, seed=1, held_out_device=HELD_OUT, num_threads=1).model
    assert not torch.equal(model.class_embedding.weight[-1], untrained.class_embedding.weight[-1])
    assert not torch.equal(model.device_embedding.weight[-1], untrained.device_embedding.weight[-1])
    guided = generator_from_record({**generator_record(model), "kwargs": {**generator_record(model)["kwargs"], "guidance": 3.0}})
    assert _class_one_contrast(guided) > _class_one_contrast(model) > 0


def test_class_only_guidance_keeps_the_device_and_strengthens_the_class(client_arrays):  # noqa: F811
    """guidance_on: class drops the class label alone, in training and in the guided null branch,
    so the null device row stays untrained, and guidance still pushes toward the class."""
    options = {**FLOW, "guidance_on": "class"}
    config = GeneratorTrainingConfig(rounds=3, local_epochs=4, batch_size=16, lr=3e-3, cond_dropout=0.3, model_options=options)
    untrained = build_generator(SPEC, N_DEVICES, seed=1, **options)
    classes, devices = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    dropped_c, kept_d = untrained.drop_condition(classes, devices, torch.tensor([True, False, True]))
    assert dropped_c.tolist() == [SPEC.num_classes, 1, SPEC.num_classes] and torch.equal(kept_d, devices)
    model = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=1, held_out_device=HELD_OUT, num_threads=1).model
    assert not torch.equal(model.class_embedding.weight[-1], untrained.class_embedding.weight[-1])
    assert torch.equal(model.device_embedding.weight[-1], untrained.device_embedding.weight[-1])
    record = generator_record(model)
    assert record["kwargs"]["guidance_on"] == "class"
    guided = generator_from_record({**record, "kwargs": {**record["kwargs"], "guidance": 3.0}})
    assert guided.guidance_on == "class"
    assert _class_one_contrast(guided) > _class_one_contrast(model) > 0
    with pytest.raises(ConfigurationError, match="guidance_on must be one of"):
        build_generator(SPEC, N_DEVICES, seed=0, **{**FLOW, "guidance_on": "device"})


def test_flow_device_noise_tops_up_the_noisy_device_only(trained_flow, client_arrays):  # noqa: F811
    """One hospital's device adds strong white noise the generator never learnt; the calibrated
    top-up is largest there, zero for a device nobody holds, and that device's samples come
    out noisier for the same starting noise."""
    model = copy.deepcopy(trained_flow[0])
    clients = _clients(client_arrays)
    noisy = clients[1]
    noisy.train_x = (noisy.train_x + 0.15 * torch.randn(noisy.train_x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    before = model.sample([0] * 16, [noisy.device_id] * 16, torch.Generator().manual_seed(1))
    summary = fit_flow_noise(model, clients, seed=0)
    std = model.noise_std[:, 0]
    assert summary["device_noise_std"] == (model.noise_std * 255.0).round(decimals=2).tolist()
    assert float(std[noisy.device_id]) > 0.05
    assert float(std[noisy.device_id]) > 2 * max(float(std[c.device_id]) for c in clients if c is not noisy)
    assert float(std[HELD_OUT]) == 0.0
    after = model.sample([0] * 16, [noisy.device_id] * 16, torch.Generator().manual_seed(1))
    assert float(robust_noise_variance(after).mean()) > 2 * float(robust_noise_variance(before).mean())
    assert not torch.equal(model.state_dict()["noise_std"], trained_flow[0].state_dict()["noise_std"])  # in the hashed state


def test_federated_flow_with_device_noise_records_the_top_up(client_arrays):  # noqa: F811
    config = GeneratorTrainingConfig(rounds=1, local_epochs=1, batch_size=16, device_noise=True, model_options=FLOW)
    result = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=0, held_out_device=HELD_OUT, num_threads=1)
    assert len(result.summary["sampler"]["device_noise_std"]) == N_DEVICES
    assert result.summary["sampler"]["device_noise_std"][HELD_OUT] == [0.0]
