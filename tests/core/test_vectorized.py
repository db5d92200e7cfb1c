"""Clients trained together (core/vectorized.py) equal the sequential loop, client by client.

The three hospitals of conftest.py have 44, 46 and 56 training images, so at batch size 10
they take 5, 5 and 6 steps per epoch with trailing batches of 4, 6 and 6: the stacked path
has to pad, mask and let a finished client leave the stack for the results to agree.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import round_generator
from fedmic_pipeline.core.engine import SimulationConfig
from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import ConfigurationError, RoundContext
from fedmic_pipeline.core.simulation import run_simulation
from fedmic_pipeline.core.training import class_log_prior, make_optimizer, proximal_term, state_to_payload, train_local
from fedmic_pipeline.core.vectorized import can_stack, train_stacked

from .conftest import TINY_STUDENT

TOLERANCE = 2e-5
RECIPE = {
    "model_options": TINY_STUDENT,
    "batch_size": 10,
    "lr": 0.05,
    "momentum": 0.9,
    "loss": "logit_adjusted",
    "bn_recalibrate": False,
    "local_epochs": 2,
}


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max(float((x.double() - y.double()).abs().max()) for x, y in pairs)


@pytest.mark.parametrize("proximal_mu, weight_decay", [(0.0, 0.0), (0.1, 1e-3)])
def test_stacked_training_equals_the_sequential_loop_per_client(clients, spec, proximal_mu, weight_decay) -> None:
    start = build_model("student_cnn", spec, seed=3, channels_last=True, **TINY_STUDENT)
    ctx = RoundContext(round=0, num_rounds=1, seed=11, device=torch.device("cpu"))
    sequential, sequential_stats = [], []
    for data in clients:
        model = copy.deepcopy(start)
        optimizer = make_optimizer(model.parameters(), "sgd", 0.05, momentum=0.9, weight_decay=weight_decay)
        extra = proximal_term(model, state_to_payload(model), proximal_mu)
        generator = round_generator(11, 0, data.client_id)
        offset = class_log_prior(data.train_y, spec.num_classes)
        sequential_stats.append(train_local(model, data, 2, 10, optimizer, generator, ctx, extra, logit_offset=offset))
        sequential.append(model)

    together = [copy.deepcopy(start) for _ in clients]
    stacked_stats = train_stacked(
        together,
        clients,
        epochs=2,
        batch_size=10,
        lr=0.05,
        momentum=0.9,
        weight_decay=weight_decay,
        generators=[round_generator(11, 0, d.client_id) for d in clients],
        logit_offsets=[class_log_prior(d.train_y, spec.num_classes) for d in clients],
        proximal_mu=proximal_mu,
    )

    assert [s.num_steps for s in stacked_stats] == [10, 10, 12]
    for seq_model, stacked_model, seq, stacked in zip(sequential, together, sequential_stats, stacked_stats, strict=True):
        assert _max_difference(seq_model, stacked_model) < TOLERANCE  # weights and BN running statistics
        assert _max_difference(seq_model, start) > 1e-2  # it did train
        assert (stacked.num_samples, stacked.num_steps, stacked.accuracy) == (seq.num_samples, seq.num_steps, seq.accuracy)
        assert stacked.loss == pytest.approx(seq.loss, abs=1e-5)
        assert stacked.objective == pytest.approx(seq.objective, abs=1e-5)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_a_vectorized_simulation_matches_the_sequential_one(clients, spec, algorithm: str) -> None:
    def run(mode: str):
        # lr 0.01: at the unit test's 0.05 (x10 with momentum) two rounds amplify the
        # grouped convolution's other summation order past any useful tolerance
        method = build_algorithm(algorithm, {**RECIPE, "lr": 0.01, "bn_recalibrate": True}, spec)
        config = SimulationConfig(num_rounds=2, seed=5, vectorize_clients=mode)
        return run_simulation(method, [copy.copy(c) for c in clients], spec, config)

    sequential, together = run("never"), run("always")
    assert _max_difference(sequential.last_global_model(), together.last_global_model()) < 1e-5
    for key in ("global_val_balanced_accuracy", "train_loss"):
        if key in sequential.history[-1]:
            assert together.history[-1][key] == pytest.approx(sequential.history[-1][key], abs=1e-4)


def test_auto_on_the_cpu_and_unstackable_methods_are_the_sequential_loop_bit_for_bit(clients, spec) -> None:
    def final_state(algorithm: str, mode: str) -> dict[str, torch.Tensor]:
        method = build_algorithm(algorithm, RECIPE, spec)
        result = run_simulation(method, clients, spec, SimulationConfig(num_rounds=1, seed=5, vectorize_clients=mode))
        return result.last_global_model().state_dict()

    for algorithm, mode in (("fedavg", "auto"), ("moon", "always")):
        reference, other = final_state(algorithm, "never"), final_state(algorithm, mode)
        assert all(torch.equal(reference[k], other[k]) for k in reference), (algorithm, mode)


def test_only_the_student_family_can_be_stacked(spec) -> None:
    assert can_stack(build_model("student_cnn", spec, seed=0))
    assert not can_stack(build_model("resnet18", spec, seed=0))
    assert not can_stack(build_model("student_cnn", spec, seed=0, norm="group"))


def test_an_unknown_vectorize_mode_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="vectorize_clients must be one of auto, always, never"):
        SimulationConfig(vectorize_clients="sometimes")
