"""Client-level differential privacy (core/privacy.py): clipping, noise, accounting, the DP round.

The accountant is Opacus' RDPAccountant; the reference values below are the library's own
answers for its classic example, so a change of library version that moves them fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedmic_pipeline.configuration import validate_parameters
from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import to_client_data
from fedmic_pipeline.core.privacy import (
    CALIBRATION_TOLERANCE,
    ClientLevelDP,
    DPConfig,
    calibrate_noise_multiplier,
    clip_update,
    nonnegative_variances,
    privacy_of_run,
    rdp_epsilon,
    update_norm,
)
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, RoundContext
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation
from fedmic_pipeline.core.training import state_to_payload

from .conftest import TINY_STUDENT, make_client_arrays

COMMON = {"model_options": TINY_STUDENT, "batch_size": 8, "lr": 0.05}
#: Equal training-set sizes (44 each): the DP mean is uniform, FedAvg's sample-weighted, and
#: only with equal sizes must a DP run without noise and clipping reproduce FedAvg.
EQUAL_SIZE_COUNTS = ((20, 14, 10), (6, 28, 10), (8, 8, 28))
CTX = RoundContext(round=0, num_rounds=1, seed=0, device=torch.device("cpu"))


@pytest.fixture()
def equal_clients() -> list[ClientData]:
    return [to_client_data(make_client_arrays(counts, seed=200 + i), client_id=i, device="cpu") for i, counts in enumerate(EQUAL_SIZE_COUNTS)]


def _update(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    update = {"conv.weight": torch.randn(16, 8, 3, 3, generator=gen), "conv.bias": torch.randn(16, generator=gen)}
    norm = update_norm(update)
    return {k: v * (scale / norm) for k, v in update.items()}


def _run(name: str, clients, spec, rounds: int = 2, join_ratio: float = 1.0, **params: object):
    algorithm = build_algorithm(name, {**COMMON, **params}, spec)
    return run_simulation(algorithm, clients, spec, SimulationConfig(num_rounds=rounds, seed=0, join_ratio=join_ratio, device="cpu"))


# ---- clipping and noise ------------------------------------------------------------------------

def test_clipping_bounds_the_norm_exactly_and_leaves_small_updates_alone() -> None:
    clipped, before = clip_update(_update(10.0), clip_norm=1.5)
    assert before == pytest.approx(10.0, rel=1e-6)
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    small = _update(0.4)
    kept, _ = clip_update(small, clip_norm=1.5)
    assert all(torch.equal(kept[k], small[k]) for k in small)
    # the direction is kept: clipping only rescales
    assert torch.allclose(clipped["conv.bias"] / clipped["conv.bias"].norm(), _update(10.0)["conv.bias"] / _update(10.0)["conv.bias"].norm())


@pytest.mark.parametrize("placement", ["client", "server"])
def test_noise_std_is_noise_multiplier_times_clip_norm(placement: str) -> None:
    sigma, clip = 1.3, 0.7
    mechanism = ClientLevelDP(DPConfig(placement=placement, clip_norm=clip, noise_multiplier=sigma))
    zeros = {"w": torch.zeros(1000, 400), "b": torch.zeros(400)}
    if placement == "client":
        noisy, metrics = mechanism.privatize(zeros, CTX, client_id=3)
        expected = sigma * clip
        assert metrics == {"dp/clipped": 0.0}
    else:  # once on the sum of 4 updates, then divided by 4
        noisy = mechanism.combine([zeros] * 4, CTX)
        expected = sigma * clip / 4
    values = torch.cat([v.flatten() for v in noisy.values()]).double()
    assert values.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(values.mean().item()) < 0.01 * expected
    again = mechanism.privatize(zeros, CTX, client_id=3)[0] if placement == "client" else mechanism.combine([zeros] * 4, CTX)
    assert all(torch.equal(again[k], noisy[k]) for k in noisy), "the noise is seeded by (seed, round, stream)"


def test_server_placement_re_clips_what_it_receives_and_means_uniformly() -> None:
    mechanism = ClientLevelDP(DPConfig(placement="server", clip_norm=1.0, noise_multiplier=0.0))
    big, small = _update(5.0, seed=1), _update(0.5, seed=2)
    mean = mechanism.combine([big, small], CTX)
    expected = {k: (clip_update(big, 1.0)[0][k] + small[k]) / 2 for k in big}
    assert all(torch.allclose(mean[k], expected[k], atol=1e-6) for k in big)


def test_negative_variances_are_clamped_and_nothing_else_changes() -> None:
    state = {"bn.running_var": torch.tensor([0.5, -0.2]), "bn.running_mean": torch.tensor([-1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(3)}
    out = nonnegative_variances(state)
    assert out["bn.running_var"].tolist() == [0.5, 0.0]
    assert torch.equal(out["bn.running_mean"], state["bn.running_mean"]) and int(out["bn.num_batches_tracked"]) == 3


# ---- accounting ----------------------------------------------------------------------------------

def test_accountant_gives_the_library_value_and_grows_with_rounds() -> None:
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    for _ in range(1000):  # Opacus' documented use: one step() per noisy step
        reference.step(noise_multiplier=1.0, sample_rate=0.01)
    expected = reference.get_epsilon(delta=1e-5)
    assert rdp_epsilon(1.0, 0.01, 1000, 1e-5) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(2.1014, abs=1e-3)  # opacus 1.6.0's answer for this example
    epsilons = [rdp_epsilon(1.0, 0.5, rounds, 1e-5) for rounds in (1, 5, 20, 100)]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4
    assert rdp_epsilon(2.0, 0.5, 20, 1e-5) < rdp_epsilon(1.0, 0.5, 20, 1e-5)
    assert rdp_epsilon(0.0, 0.5, 20, 1e-5) == math.inf and rdp_epsilon(1.0, 0.5, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibration_hits_the_target_epsilon(target: float) -> None:
    sigma = calibrate_noise_multiplier(target, 1e-5, sample_rate=0.5, rounds=20)
    assert target - CALIBRATION_TOLERANCE <= rdp_epsilon(sigma, 0.5, 20, 1e-5) <= target


def test_an_unreachable_target_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"target_epsilon 1e-09 cannot be reached.*raise target_epsilon"):
        calibrate_noise_multiplier(1e-9, 1e-5, sample_rate=1.0, rounds=20)


# ---- the DP round in the algorithms ------------------------------------------------------------------

def test_fedavg_with_dp_records_epsilon_and_without_noise_reproduces_fedavg(equal_clients, spec: DataSpec) -> None:
    plain = _run("fedavg", equal_clients, spec)
    silent = _run("fedavg", equal_clients, spec, dp={"noise_multiplier": 0.0, "clip_norm": 1.0e6})
    a, b = plain.server_state["model"].state_dict(), silent.server_state["model"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a if a[k].is_floating_point())
    assert [r["global_val_accuracy"] for r in plain.history] == [r["global_val_accuracy"] for r in silent.history]
    assert silent.server_state["privacy"]["epsilon"] == math.inf  # no noise, no guarantee

    private = _run("fedavg", equal_clients, spec, dp={"target_epsilon": 4.0, "clip_norm": 0.5})
    spent = private.server_state["privacy"]
    assert spent["rounds"] == 2 and spent["sample_rate"] == 1.0 and spent["placement"] == "server"
    assert len(spent["epsilon_per_round"]) == 2 and spent["epsilon_per_round"][0] < spent["epsilon_per_round"][1]
    assert 4.0 - CALIBRATION_TOLERANCE <= spent["epsilon"] <= 4.0 and spent["delta"] == 1e-5
    c = private.server_state["model"].state_dict()
    assert any(not torch.allclose(a[k], c[k], atol=1e-3) for k in a if a[k].is_floating_point())
    assert all(m["dp/clipped"] in (0.0, 1.0) for r in private.history for m in r["client_metrics"])
    # what tracking and the audit recompute from the run's summary is what the server recorded
    again = privacy_of_run({"target_epsilon": 4.0, "clip_norm": 0.5}, clients_per_round=3, num_clients=3, rounds=2)
    assert again.epsilon_per_round == pytest.approx(spent["epsilon_per_round"]) and again.noise_multiplier == spent["noise_multiplier"]
    described = private.algorithm.describe()
    assert described["dp.target_epsilon"] == 4.0 and described["dp.placement"] == "server" and "dp" not in described


def test_client_placement_noises_every_upload(equal_clients, spec: DataSpec) -> None:
    result = _run("fedprox", equal_clients, spec, rounds=1, dp={"noise_multiplier": 1.0, "clip_norm": 0.5, "placement": "client"})
    assert result.server_state["privacy"]["placement"] == "client"
    assert result.server_state["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1.0, 1, 1e-5))
    # a clipped update has norm <= 0.5; with noise of std 0.5 on every coordinate it is far larger
    algorithm = result.algorithm
    model = algorithm.scratch_model()
    ctx = RoundContext(round=0, num_rounds=1, seed=0, device=torch.device("cpu"), sampled=(0, 1, 2), num_clients=3)
    upload, _, _ = algorithm.client_update({}, equal_clients[0], state_to_payload(model), ctx)
    assert update_norm(upload) > 10 * 0.5
    assert all(v.is_floating_point() for v in upload.values()), "integer counters never travel under DP"


def test_fedmic_with_local_noise_uploads_more_bytes_than_without(clients: list[ClientData], spec: DataSpec) -> None:
    """The SVD interaction: full-rank noise makes the energy threshold keep more singular values."""
    fedmic = {"teacher_width": 0.125, "teacher_model": "student_cnn", "teacher_options": TINY_STUDENT}
    plain = _run("fedmic", clients, spec, rounds=1, **fedmic)
    noisy = _run("fedmic", clients, spec, rounds=1, **fedmic, dp={"noise_multiplier": 1.0, "clip_norm": 0.5, "placement": "client"})
    central = _run("fedmic", clients, spec, rounds=1, **fedmic, dp={"noise_multiplier": 1.0, "clip_norm": 0.5})
    assert noisy.totals()["bytes_up_total"] > 1.5 * plain.totals()["bytes_up_total"]
    assert central.totals()["bytes_up_total"] < noisy.totals()["bytes_up_total"]
    for result in (noisy, central):
        assert result.server_state["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1.0, 1, 1e-5))
    assert "interpretation.dp_order" in noisy.algorithm.describe()


def test_the_budget_reaches_the_summary_mlflow_and_the_audit_section(equal_clients, spec: DataSpec) -> None:
    """What tracking logs and the audit shows is recomputed from the saved summary and
    history; it must equal what the server recorded during the run (here q = 1/3)."""
    import json

    from fedmic_pipeline import run_records
    from fedmic_pipeline.audit.development_sections import training_process
    from fedmic_pipeline.tracking.mlflow_logging import privacy_from_summary

    result = _run("fedavg", equal_clients, spec, rounds=2, join_ratio=0.5, dp={"target_epsilon": 4.0, "placement": "client"})
    recorded = result.server_state["privacy"]
    assert recorded["sample_rate"] == pytest.approx(1 / 3)
    summary = json.loads(json.dumps(run_records.run_summary(result.algorithm, result, equal_clients)))
    history = run_records.history_table(result.history)
    for spent in (privacy_from_summary(summary, history), privacy_from_summary(summary)):
        assert spent is not None and spent["epsilon_per_round"] == pytest.approx(recorded["epsilon_per_round"])
        assert spent["noise_multiplier"] == recorded["noise_multiplier"] and spent["placement"] == "client"
    section = training_process(summary, history, {}, {}, None)
    assert section["differential_privacy"]["epsilon"] == pytest.approx(recorded["epsilon"])
    plain = _run("fedavg", equal_clients, spec, rounds=1)
    plain_summary = run_records.run_summary(plain.algorithm, plain, equal_clients)
    assert training_process(plain_summary, run_records.history_table(plain.history), {}, {}, None)["differential_privacy"] is None


# ---- bad parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("dp", "message"),
    [
        ({"noise_multiplier": 1.0, "clip": 1.0}, r"Unknown dp parameter\(s\) \['clip'\]; valid: placement, clip_norm"),
        ({"noise_multiplier": 1.0, "target_epsilon": 4.0}, r"exactly one of noise_multiplier .* and target_epsilon"),
        ({"clip_norm": 1.0}, r"exactly one of noise_multiplier"),
        ({"noise_multiplier": 1.0, "clip_norm": 0}, r"dp.clip_norm must be a finite number > 0"),
        ({"noise_multiplier": -1.0}, r"dp.noise_multiplier must be a finite number >= 0"),
        ({"target_epsilon": "lots"}, r"dp.target_epsilon must be a number, got the string 'lots'"),
        ({"noise_multiplier": 1.0, "placement": "edge"}, r"dp.placement must be 'client' .* or 'server'"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, r"dp.delta must be in \(0, 1\)"),
        ("on", r"dp must be a mapping"),
    ],
)
def test_bad_dp_parameters_are_refused_with_the_fix(dp: object, message: str, spec: DataSpec) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_algorithm("fedavg", {"dp": dp}, spec)


def test_yaml_strings_are_numbers_and_methods_without_dp_refuse_the_block(spec: DataSpec) -> None:
    config = build_algorithm("fedavg", {"dp": {"target_epsilon": "8", "delta": "1e-6"}}, spec).config.dp_config()
    assert config == DPConfig(target_epsilon=8.0, delta=1e-6)
    with pytest.raises(ConfigurationError, match=r"scaffold does not support the dp block .*fedavg.*fedmic.*fedprox"):
        build_algorithm("scaffold", {"dp": {"noise_multiplier": 1.0}}, spec)
    with pytest.raises(ConfigurationError, match=r"Invalid `algorithm_params` parameter.*centralized does not support the dp block.*algorithm_params.common"):
        validate_parameters({"algorithm_params": {"common": {"dp": {"noise_multiplier": 1.0}}}}, ["algorithm_params"])


def test_a_delta_not_far_below_one_over_the_hospitals_is_refused(equal_clients, spec: DataSpec) -> None:
    with pytest.raises(ConfigurationError, match=r"dp.delta 0.5 is not below 1 / 3 hospitals"):
        _run("fedavg", equal_clients, spec, rounds=1, dp={"noise_multiplier": 1.0, "delta": 0.5})
