"""The standard baselines: local-only, centralized, FedAvg, FedProx, SCAFFOLD, and the registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fedmic_pipeline.core.algorithms import ALGORITHMS, AlgorithmConfig, BaseAlgorithm, build_algorithm, register
from fedmic_pipeline.core.algorithms.fedavg import FedAvg, FedAvgConfig
from fedmic_pipeline.core.algorithms.scaffold import CONTROL_PREFIX
from fedmic_pipeline.core.models import build_model
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec
from fedmic_pipeline.core.simulation import SimulationConfig, evaluate_result, run_simulation
from fedmic_pipeline.core.training import parameter_keys

from .conftest import NUM_CLASSES, TINY_STUDENT

BASELINES = ("local_only", "centralized", "fedavg", "fedprox", "scaffold")
#: batch 8 gives ~6 steps per client-epoch: fewer leave BatchNorm's running statistics (used
#: at evaluation) far from the data, and a model that trains well still evaluates at chance.
COMMON = {"model_options": TINY_STUDENT, "batch_size": 8, "lr": 0.05}


def _params(name: str) -> dict:
    # SCAFFOLD's default is plain SGD (momentum 0), which learns slower in two rounds.
    return {**COMMON, "lr": 0.1} if name == "scaffold" else dict(COMMON)


def _run(name: str, clients, spec, rounds: int = 2, **params: object):
    algorithm = build_algorithm(name, {**_params(name), **params}, spec)
    return run_simulation(algorithm, clients, spec, SimulationConfig(num_rounds=rounds, seed=0))


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_beats_chance_in_two_rounds(name: str, clients: list[ClientData], spec: DataSpec, global_test) -> None:
    result = _run(name, clients, spec)
    last = result.history[-1]
    chance = 1.0 / NUM_CLASSES
    assert last["personalized_val_accuracy"] > chance + 0.2, last
    final = evaluate_result(result, clients, NUM_CLASSES, global_test, n_bootstrap=0)
    if name == "local_only":
        assert result.last_global_model() is None and last["global_val_accuracy"] is None and final["global"] is None
    else:
        assert last["global_val_accuracy"] > chance + 0.2, last
        assert final["global"]["accuracy"] > chance + 0.2, final["global"]
    assert result.totals()["rounds"] == 2 and result.algorithm.name == name


def test_registry_lists_the_baselines_and_rejects_bad_parameters(spec: DataSpec) -> None:
    assert set(BASELINES) <= set(ALGORITHMS)
    with pytest.raises(ConfigurationError, match=r"Valid algorithms: .*fedavg"):
        build_algorithm("fedsgd", {}, spec)
    with pytest.raises(ConfigurationError, match=r"Unknown parameter\(s\) \['mu'\] for algorithm 'fedavg'.*Valid parameters"):
        build_algorithm("fedavg", {"mu": 0.1}, spec)
    with pytest.raises(ConfigurationError, match="mu must be >= 0"):
        build_algorithm("fedprox", {"mu": -1}, spec)
    with pytest.raises(ConfigurationError, match="batch_size"):
        build_algorithm("fedavg", {"batch_size": 1}, spec)
    with pytest.raises(ConfigurationError, match="optimizer"):
        build_algorithm("fedavg", {"optimizer": "lbfgs"}, spec)
    with pytest.raises(ConfigurationError, match="'lr' must be a number"):
        build_algorithm("fedavg", {"lr": "fast"}, spec)
    config = build_algorithm("fedprox", {"lr": "1e-3", "local_epochs": 2.0}, spec).config  # YAML's 1e-3 is a string
    assert config.lr == 0.001 and config.local_epochs == 2 and isinstance(config.local_epochs, int)
    described = build_algorithm("scaffold", {}, spec).describe()
    assert described["algorithm"] == "scaffold" and described["server_lr"] == 1.0 and described["momentum"] == 0.0


def test_register_decorator_adds_a_method(spec: DataSpec) -> None:
    @dataclass(frozen=True)
    class EchoConfig(AlgorithmConfig):
        gain: float = 2.0

    @register("_test_echo")
    class Echo(BaseAlgorithm):
        config_class = EchoConfig

        def init_server(self, seed):  # pragma: no cover - only registration is tested
            return {}, {}

        init_client = client_update = aggregate = global_model = personalized_model = init_server  # type: ignore[assignment]

    try:
        algo = build_algorithm("_test_echo", {"gain": 3}, spec)
        assert isinstance(algo, Echo) and algo.config.gain == 3.0 and algo.name == "_test_echo"
        with pytest.raises(ValueError, match="registered twice"):
            register("_test_echo")(type("Other", (Echo,), {}))
    finally:
        ALGORITHMS.pop("_test_echo", None)


def test_local_only_sends_nothing_and_keeps_separate_models(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("local_only", clients, spec)
    assert all(r["bytes_up_total"] == 0 and r["bytes_down_total"] == 0 and r["bytes_dense_total"] == 0 for r in result.history)
    m0, m1 = result.last_personalized_model(0), result.last_personalized_model(1)
    assert m0 is not m1 and not _params_equal(m0, m1)


def test_fedprox_with_mu_zero_is_fedavg_and_mu_changes_training(clients: list[ClientData], spec: DataSpec) -> None:
    fedavg = _run("fedavg", clients, spec)
    prox0 = _run("fedprox", clients, spec, mu=0.0)
    prox = _run("fedprox", clients, spec, mu=1.0)
    assert _params_equal(fedavg.last_global_model(), prox0.last_global_model())
    assert not _params_equal(fedavg.last_global_model(), prox.last_global_model())
    assert prox.history[0]["client_metrics"][0]["objective"] > prox.history[0]["client_metrics"][0]["loss"]
    assert prox.history[0]["bytes_up"] == fedavg.history[0]["bytes_up"]
    # the proximal term enters only through FedAvg's ``local_objective`` hook: with mu = 0 the
    # whole history is FedAvg's bit for bit, with mu > 0 every round's losses differ
    assert _training_history(prox0) == _training_history(fedavg)
    assert all(
        p["loss"] != f["loss"]
        for rp, rf in zip(prox.history, fedavg.history, strict=True)
        for p, f in zip(rp["client_metrics"], rf["client_metrics"], strict=True)
    )


def _training_history(result) -> list[dict]:
    keys = ("sampled", "train_loss", "train_accuracy", "bytes_up", "bytes_down", "client_metrics")
    return [{k: r[k] for k in keys} for r in result.history]


def test_fedavg_hooks_shape_every_local_update(clients: list[ClientData], spec: DataSpec) -> None:
    """A FedAvg variant that overrides only the hooks changes what FedAvg's client_update does."""
    calls: list[tuple[str, int]] = []

    class Hooked(FedAvg):
        def local_objective(self, model, payload, state, ctx):
            calls.append(("objective", ctx.round))
            return lambda m, x, y, h, z: 0.5 * z.float().pow(2).mean()

        def after_local_update(self, state, data, payload, upload, stats, ctx):
            calls.append(("after", ctx.round))
            assert set(upload) == set(payload) and stats.objective > stats.loss
            return {**super().after_local_update(state, data, payload, upload, stats, ctx), "hooked": 1.0}

    hooked = run_simulation(Hooked(FedAvgConfig(**COMMON), spec), clients, spec, SimulationConfig(num_rounds=2, seed=0))
    fedavg = _run("fedavg", clients, spec)
    assert calls == [(kind, r) for r in range(2) for _ in clients for kind in ("objective", "after")]
    assert all(m["hooked"] == 1.0 and m["objective"] > m["loss"] for r in hooked.history for m in r["client_metrics"])
    assert not _params_equal(hooked.last_global_model(), fedavg.last_global_model())


def test_scaffold_first_round_is_fedavg_then_control_variates_act(clients: list[ClientData], spec: DataSpec) -> None:
    """c = c_i = 0 in round 0, so its update equals FedAvg's with the same (plain SGD) config."""
    params = {**COMMON, "momentum": 0.0}
    fedavg = run_simulation(build_algorithm("fedavg", params, spec), clients, spec, SimulationConfig(num_rounds=1))
    scaffold = run_simulation(build_algorithm("scaffold", params, spec), clients, spec, SimulationConfig(num_rounds=2))
    scaffold_one = run_simulation(build_algorithm("scaffold", params, spec), clients, spec, SimulationConfig(num_rounds=1))
    assert _params_equal(fedavg.last_global_model(), scaffold_one.last_global_model())
    control = scaffold.server_state["control"]
    assert set(control) == set(parameter_keys(scaffold.last_global_model()))
    assert any(float(v.abs().max()) > 0 for v in control.values())
    assert all(state["c_i"] is not None for state in scaffold.client_states.values())


def test_scaffold_bytes_are_model_plus_control_variate(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("scaffold", clients, spec, rounds=1)
    model = build_model("student_cnn", spec, **TINY_STUDENT)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    record = result.history[0]
    assert record["bytes_up"] == [state + params] * len(clients)
    assert record["bytes_down"] == [state + params] * len(clients)
    assert record["bytes_dense_per_client"] == state
    # "about twice FedAvg": parameters are nearly the whole state (BN buffers are few)
    assert 1.9 < (state + params) / state <= 2.0
    payload_keys = set(result.algorithm._payload(result.last_global_model(), result.server_state["control"]))
    assert {k for k in payload_keys if k.startswith(CONTROL_PREFIX)} == {CONTROL_PREFIX + k for k in parameter_keys(model)}


def test_partial_participation_trains_only_sampled_clients(clients: list[ClientData], spec: DataSpec) -> None:
    algorithm = build_algorithm("local_only", COMMON, spec)
    result = run_simulation(algorithm, clients, spec, SimulationConfig(num_rounds=2, join_ratio=0.34, seed=2))
    sampled = {c for r in result.history for c in r["sampled"]}
    assert all(len(r["sampled"]) == 1 for r in result.history)
    fresh = build_model("student_cnn", spec, seed=2, **TINY_STUDENT)
    untouched = [cid for cid in range(3) if cid not in sampled]
    for cid in untouched:
        assert _params_equal(result.last_personalized_model(cid), fresh)
