"""The engine: models, resident data, local training, payload arithmetic, the round runner."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.data import (
    batch_indices,
    iterate_batches,
    make_generator,
    pool_clients,
    resolve_amp,
    resolve_device,
    round_generator,
    to_client_data,
)
from fedmic_pipeline.core.models import build_model, num_parameters, state_nbytes
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, RoundContext, payload_nbytes
from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation, sample_clients
from fedmic_pipeline.core.training import (
    make_optimizer,
    model_delta,
    payload_to_state,
    state_to_payload,
    train_local,
    weighted_average,
)

from .conftest import TINY_STUDENT

CPU_CTX = RoundContext(round=0, num_rounds=1, seed=0, device=torch.device("cpu"))


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_time_s") and k != "samples_per_s"} for r in history]


# --------------------------------------------------------------------------- models


def test_student_and_teacher_shapes_and_sizes() -> None:
    spec = DataSpec(1, 2)
    student = build_model("student_cnn", spec, seed=0)
    assert 100_000 <= num_parameters(student) <= 200_000
    x = torch.rand(4, 1, 28, 28)
    assert student.features(x).shape == (4, student.feature_dim)
    assert torch.equal(student(x), student.classifier(student.features(x)))
    teacher = build_model("resnet18", DataSpec(3, 8), seed=0)
    assert 11_000_000 <= num_parameters(teacher) <= 11_300_000
    assert teacher.stem[0].kernel_size == (3, 3) and teacher.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in teacher.modules())
    thin = build_model("resnet18", DataSpec(3, 8), seed=0, base_width=8)
    assert thin.features(torch.rand(2, 3, 28, 28)).shape == (2, 64) and thin(torch.rand(2, 3, 28, 28)).shape == (2, 8)


def test_a_strided_teacher_stem_works_on_a_quarter_of_the_pixels() -> None:
    x = torch.rand(2, 1, 28, 28)
    published = build_model("resnet18", DataSpec(1, 2), seed=0, base_width=8)
    strided = build_model("resnet18", DataSpec(1, 2), seed=0, base_width=8, stem_stride=2)
    assert published.stem(x).shape[-2:] == (28, 28) and strided.stem(x).shape[-2:] == (14, 14)
    assert strided.features(x).shape == published.features(x).shape == (2, 64)  # same parameters, same features
    assert num_parameters(strided) == num_parameters(published)
    with pytest.raises(ConfigurationError, match="stem_stride must be 1 .* or 2, got 4"):
        build_model("resnet18", DataSpec(1, 2), seed=0, stem_stride=4)


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("student_cnn", DataSpec(1, 3), seed=5)
    after = torch.rand(3)
    b = build_model("student_cnn", DataSpec(1, 3), seed=5, channels_last=True)
    c = build_model("student_cnn", DataSpec(1, 3), seed=6)
    assert torch.equal(expected, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_model_and_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="student_cnn, resnet18"):
        build_model("vgg", DataSpec(1, 2))
    with pytest.raises(ConfigurationError, match="depth"):
        build_model("student_cnn", DataSpec(1, 2), depth=3)
    with pytest.raises(ConfigurationError, match="num_classes"):
        build_model("student_cnn", DataSpec(1, 1))


# --------------------------------------------------------------------------- data


def test_to_client_data_converts_once(client_arrays: list[dict[str, np.ndarray]]) -> None:
    data = to_client_data(client_arrays[0], client_id=4)
    assert data.client_id == 4 and data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.shape == (44, 1, 28, 28) and data.train_y.shape == (44,)
    assert float(data.train_x.min()) >= 0.0 and float(data.train_x.max()) <= 1.0
    np.testing.assert_allclose(data.train_x[:, 0].numpy() * 255, client_arrays[0]["train_images"], atol=1e-3)
    rgb = dict(client_arrays[0])
    for split in ("train", "val", "test"):
        rgb[f"{split}_images"] = np.repeat(rgb[f"{split}_images"][..., None], 3, axis=-1)  # (N, H, W, 3)
    rgb["device_id"] = np.array(2)
    rgb_data = to_client_data(rgb, client_id=0)
    assert rgb_data.train_x.shape == (44, 3, 28, 28) and rgb_data.device_id == 2
    assert torch.equal(rgb_data.train_x[:, 1], data.train_x[:, 0])


def test_to_client_data_rejects_bad_arrays(client_arrays: list[dict[str, np.ndarray]]) -> None:
    missing = {k: v for k, v in client_arrays[0].items() if k != "val_labels"}
    with pytest.raises(ConfigurationError, match="val_labels"):
        to_client_data(missing, client_id=0)
    bad = dict(client_arrays[0], train_labels=client_arrays[0]["train_labels"][:5])
    with pytest.raises(ConfigurationError, match="labels"):
        to_client_data(bad, client_id=0)


def test_batches_are_seeded_permutations() -> None:
    batches = batch_indices(10, 4, make_generator(1))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = batch_indices(10, 4, make_generator(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert [len(b) for b in batch_indices(10, 4, make_generator(1), drop_last=True)] == [4, 4]
    x, y = torch.arange(9.0).view(9, 1), torch.arange(9)
    got = list(iterate_batches(x, y, 4, make_generator(2), min_batch=2))
    assert [len(b[1]) for b in got] == [4, 4]  # the trailing batch of one sample is dropped
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in got)
    seeds = {round_generator(0, r, c).initial_seed() for r in range(3) for c in (-1, 0, 1)}
    assert len(seeds) == 9  # every (round, client) has its own stream


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigurationError):
        resolve_device("tpu")
    assert resolve_amp("auto", torch.device("cpu")) is False
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA"):
            resolve_device("cuda")
        with pytest.raises(ConfigurationError, match="CUDA"):
            resolve_amp("on", torch.device("cpu"))


# --------------------------------------------------------------------------- training and payloads


def test_train_local_learns_the_easy_task(clients: list[ClientData], spec: DataSpec) -> None:
    model = build_model("student_cnn", spec, seed=0, **TINY_STUDENT)
    opt = make_optimizer(model.parameters(), "sgd", 0.05, momentum=0.9)
    first = train_local(model, clients[2], 1, 16, opt, make_generator(0), CPU_CTX)
    for epoch in range(3):
        last = train_local(model, clients[2], 1, 16, opt, make_generator(epoch + 1), CPU_CTX)
    assert last.loss < first.loss and last.accuracy > 0.6
    assert first.num_samples == clients[2].num_train and first.num_steps == -(-clients[2].num_train // 16)


def test_weighted_average_uses_sample_counts_and_rounds_integer_buffers() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(13)}
    mean = weighted_average([(a, 1), (b, 3)])
    assert torch.allclose(mean["w"], torch.tensor([3.0, 1.0]))  # 1/4 a + 3/4 b, not 1/2 + 1/2
    assert mean["n"].dtype == torch.int64 and int(mean["n"]) == 12  # 12.25 rounded
    assert payload_nbytes(mean) == payload_nbytes(a)
    single = weighted_average([(a, 7)])
    assert torch.equal(single["w"], a["w"]) and single["w"] is not a["w"]
    with pytest.raises(ValueError):
        weighted_average([])


def test_payload_round_trip_copies_and_checks_shapes(spec: DataSpec) -> None:
    model = build_model("student_cnn", spec, seed=0, channels_last=True, **TINY_STUDENT)
    payload = state_to_payload(model)
    assert list(payload) == list(model.state_dict())
    assert all(t.is_contiguous() for t in payload.values())  # plain layout even for channels-last models
    assert payload_nbytes(payload) == state_nbytes(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(payload["classifier.weight"], model.classifier.weight)  # a copy
    payload_to_state(model, payload)
    assert torch.equal(payload["classifier.weight"], model.classifier.weight)
    delta = model_delta({"a": torch.ones(2), "c": torch.tensor(3)}, {"a": torch.zeros(2), "c": torch.tensor(1)})
    assert list(delta) == ["a"]  # counters have no delta
    with pytest.raises(ValueError, match="shape"):
        payload_to_state(model, {"classifier.weight": torch.zeros(1, 1)})
    with pytest.raises(KeyError):
        payload_to_state(model, {"nope": torch.zeros(1)})


# --------------------------------------------------------------------------- simulation: validation


def _fedavg(spec: DataSpec, **params: object):
    return build_algorithm("fedavg", {"model_options": TINY_STUDENT, "batch_size": 16, "lr": 0.05, **params}, spec)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5])
def test_join_ratio_out_of_range_fails(ratio: float) -> None:
    with pytest.raises(ConfigurationError, match="join_ratio"):
        SimulationConfig(num_rounds=1, join_ratio=ratio)


def test_bad_simulation_settings_fail_before_training(clients: list[ClientData], spec: DataSpec) -> None:
    with pytest.raises(ConfigurationError, match="num_rounds"):
        SimulationConfig(num_rounds=0)
    with pytest.raises(ConfigurationError, match="device"):
        SimulationConfig(device="gpu0")
    with pytest.raises(ConfigurationError, match="lr must be > 0"):
        build_algorithm("fedavg", {"lr": 0.0}, spec)
    with pytest.raises(ConfigurationError, match="Valid algorithms"):
        build_algorithm("fedsgd", {}, spec)

    calls: list[int] = []
    c = clients[0]

    def with_train(client_id: int, n: int) -> ClientData:
        return ClientData(client_id, c.train_x[:n], c.train_y[:n], c.val_x, c.val_y, c.test_x, c.test_y)

    tiny = [with_train(0, 0), with_train(1, 1), with_train(2, 1)]
    with pytest.raises(ConfigurationError, match="3 clients share only 2 training samples"):
        run_simulation(_fedavg(spec), tiny, spec, SimulationConfig(num_rounds=1), on_round=lambda r: calls.append(1))
    with pytest.raises(ConfigurationError, match=r"fewer than 2 training samples.*\(0, 0\)"):
        run_simulation(_fedavg(spec), [tiny[0], clients[1]], spec, SimulationConfig(num_rounds=1))
    wrong_labels = DataSpec(1, 2)
    with pytest.raises(ConfigurationError, match="labels span"):
        run_simulation(build_algorithm("fedavg", {}, wrong_labels), clients, wrong_labels, SimulationConfig(num_rounds=1))
    dup = [clients[0], clients[0]]
    with pytest.raises(ConfigurationError, match="Duplicate"):
        run_simulation(_fedavg(spec), dup, spec, SimulationConfig(num_rounds=1))
    assert calls == []


def test_client_sampling_is_seeded_and_never_empty() -> None:
    ids = list(range(10))
    rounds = [sample_clients(ids, 0.3, seed=1, round_idx=r) for r in range(5)]
    assert all(len(s) == 3 and s == sorted(s) for s in rounds)
    assert rounds == [sample_clients(ids, 0.3, seed=1, round_idx=r) for r in range(5)]
    assert len({tuple(s) for s in rounds}) > 1
    assert sample_clients(ids, 0.01, seed=1, round_idx=0).__len__() == 1
    assert sample_clients(ids, 1.0, seed=1, round_idx=0) == ids


# --------------------------------------------------------------------------- simulation: exactness


def test_fedavg_with_one_client_equals_local_training_step_for_step(clients: list[ClientData], spec: DataSpec) -> None:
    """One client, full participation: FedAvg's R rounds are R fresh-optimizer local runs."""
    rounds, seed = 3, 11
    params = {"model_options": TINY_STUDENT, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    result = run_simulation(
        build_algorithm("fedavg", params, spec), [clients[0]], spec, SimulationConfig(num_rounds=rounds, seed=seed, device="cpu")
    )

    model = build_model("student_cnn", spec, seed=seed, channels_last=True, **TINY_STUDENT)
    for r in range(rounds):
        opt = make_optimizer(model.parameters(), "sgd", 0.05, momentum=0.9, weight_decay=1e-4)
        stats = train_local(model, clients[0], 1, 8, opt, round_generator(seed, r, clients[0].client_id), CPU_CTX)
        assert stats.loss == pytest.approx(result.history[r]["train_loss"], abs=0, rel=0)
    fed = result.last_global_model().state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(fed[key], value), key


def test_centralized_equals_continuous_training_on_pooled_data(clients: list[ClientData], spec: DataSpec) -> None:
    rounds, seed = 2, 3
    params = {"model_options": TINY_STUDENT, "batch_size": 16, "lr": 0.05}
    result = run_simulation(
        build_algorithm("centralized", params, spec), clients, spec, SimulationConfig(num_rounds=rounds, seed=seed)
    )
    pooled = pool_clients(clients)
    model = build_model("student_cnn", spec, seed=seed, channels_last=True, **TINY_STUDENT)
    opt = make_optimizer(model.parameters(), "sgd", 0.05, momentum=0.9)  # one optimizer for the whole run
    for r in range(rounds):
        train_local(model, pooled, 1, 16, opt, round_generator(seed, r, pooled.client_id), CPU_CTX)
    got = result.last_global_model().state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert result.pooled and result.history[0]["sampled"] == [-1]
    assert result.history[-1]["bytes_up_total"] == 0 and result.history[-1]["bytes_down_total"] == 0
    assert len(result.history[-1]["personalized_val_accuracy_per_client"]) == len(clients)


# --------------------------------------------------------------------------- simulation: determinism, bytes, reporting


def test_same_seed_gives_identical_histories(clients: list[ClientData], spec: DataSpec) -> None:
    config = SimulationConfig(num_rounds=2, join_ratio=0.67, seed=5)
    first = run_simulation(_fedavg(spec), clients, spec, config)
    second = run_simulation(_fedavg(spec), clients, spec, config)
    assert _timeless(first.history) == _timeless(second.history)
    assert [len(r["sampled"]) for r in first.history] == [2, 2]
    other = run_simulation(
        _fedavg(spec), clients, spec, SimulationConfig(num_rounds=2, join_ratio=0.67, seed=6)
    )
    assert _timeless(other.history) != _timeless(first.history)


def test_bytes_are_counted_exactly(clients: list[ClientData], spec: DataSpec, caplog: pytest.LogCaptureFixture) -> None:
    records: list[dict] = []
    with caplog.at_level(logging.INFO, logger="fedmic_pipeline.core.simulation"):
        result = run_simulation(
            _fedavg(spec), clients, spec, SimulationConfig(num_rounds=2, eval_every=2), on_round=records.append
        )
    model = build_model("student_cnn", spec, **TINY_STUDENT)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for record in result.history:
        assert record["bytes_up"] == [state_bytes] * 3 and record["bytes_down"] == [state_bytes] * 3
        assert record["bytes_dense_per_client"] == state_bytes
        assert record["bytes_dense_total"] == record["bytes_up_total"] + record["bytes_down_total"]
    assert result.history[0]["global_val_accuracy"] is None and result.history[0]["personalized_val_accuracy"] is None
    assert result.history[1]["global_val_balanced_accuracy"] is not None
    assert result.history[1]["personalized_val_accuracy"] is not None
    assert result.totals()["compression_ratio"] == pytest.approx(1.0)
    assert records == result.history
    lines = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert any("round 2/2" in line and "MB" in line for line in lines)


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_progress_bar_switch(kind: str, clients: list[ClientData], spec: DataSpec) -> None:
    result = run_simulation(_fedavg(spec), clients, spec, SimulationConfig(num_rounds=1, progress=kind, evaluate_personalized=False))
    assert len(result.history) == 1 and result.history[0]["personalized_val_accuracy"] is None
    with pytest.raises(ConfigurationError, match="progress"):
        SimulationConfig(progress="bar")


def test_tqdm_bar_routes_console_log_lines_through_tqdm(clients: list[ClientData], spec: DataSpec) -> None:
    """A console log handler is swapped for tqdm's while the bar runs (lines print above the
    bar instead of cutting through it) and restored afterwards."""
    import sys

    from fedmic_pipeline.core.engine import Callback

    console = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(console)
    seen: list[list[str]] = []

    class Handlers(Callback):
        def after_round(self, engine, state, record) -> None:
            seen.append([type(h).__name__ for h in root.handlers])

    try:
        config = SimulationConfig(num_rounds=1, progress="tqdm", evaluate_personalized=False)
        run_simulation(_fedavg(spec), clients, spec, config, callbacks=[Handlers()])
        before = [type(h).__name__ for h in root.handlers]
        assert seen[0].count("_TqdmLoggingHandler") == 1 + before.count("_TqdmLoggingHandler")
        assert seen[0].count("StreamHandler") == before.count("StreamHandler") - 1  # ours, swapped out
        assert console in root.handlers  # and restored after the run
    finally:
        root.removeHandler(console)


def test_pooling_keeps_rows_and_synthetic_flags(clients: list[ClientData]) -> None:
    flagged = clients[1]
    flagged.train_is_synthetic = torch.zeros(flagged.num_train, dtype=torch.bool)
    flagged.train_is_synthetic[:3] = True
    pooled = pool_clients(clients)
    assert pooled.client_id == -1 and pooled.num_train == sum(c.num_train for c in clients)
    assert pooled.train_is_synthetic is not None and int(pooled.train_is_synthetic.sum()) == 3
    assert bool(pooled.train_is_synthetic[clients[0].num_train]) is True
    assert torch.equal(pooled.val_y, torch.cat([c.val_y for c in clients]))
