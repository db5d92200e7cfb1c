"""core/synthesis: the conditional generator, its federated training, the plan, the metrics.

Everything runs for real on small tensors (no mocks); each test takes well under a few
seconds on one CPU thread.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmic_pipeline.core.data import to_client_data
from fedmic_pipeline.core.protocol import ConfigurationError, DataSpec
from fedmic_pipeline.core.synthesis import (
    GeneratorTrainingConfig,
    PlanCell,
    PlanConfig,
    QualityConfig,
    QualityRuler,
    SynthesisPlan,
    build_generator,
    client_count_matrix,
    compute_plan,
    distribution_metrics,
    frechet_distance,
    frechet_distance_gaussians,
    generator_from_record,
    generator_record,
    images_to_uint8,
    knn_precision_recall,
    mmd_rbf,
    sample_plan,
    state_sha256,
    train_generator_federated,
    vae_loss,
)
from fedmic_pipeline.core.synthesis.quality import recalibrate_batchnorm

TINY = {"latent_dim": 4, "widths": (8, 16), "embed_dim": 4}
SPEC = DataSpec(in_channels=1, num_classes=3, image_size=16)
N_DEVICES = 4
HELD_OUT = 3


def _images(labels: np.ndarray, device: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Class k brightens band k; device d scales contrast, so both are visible."""
    n = labels.shape[0]
    x = rng.integers(0, 40, size=(n, size, size)).astype(np.float64)
    band = size // 3
    for i, k in enumerate(labels):
        x[i, k * band : (k + 1) * band, :] += 150
    x = (x - 100) * (0.6 + 0.3 * device) + 100
    return np.clip(x, 0, 255).astype(np.uint8)


def _client_arrays(counts: tuple[int, int, int], device: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"device": np.asarray(device, dtype=np.int64)}
    for split, scale in (("train", 1.0), ("val", 0.3), ("test", 0.3)):
        labels = np.concatenate([np.full(max(1, round(c * scale)), k) for k, c in enumerate(counts)]).astype(np.int64)
        out[f"{split}_images"] = _images(labels, device, rng)
        out[f"{split}_labels"] = labels
    return out


@pytest.fixture(scope="module")
def client_arrays() -> dict[str, dict[str, np.ndarray]]:
    specs = {"client_00": ((30, 4, 10), 0), "client_01": ((5, 25, 8), 1), "client_02": ((12, 12, 2), 2)}
    return {name: _client_arrays(counts, dev, seed=i) for i, (name, (counts, dev)) in enumerate(specs.items())}


def _clients(client_arrays):
    out = []
    for i, (_, arrays) in enumerate(sorted(client_arrays.items())):
        data = to_client_data(arrays, client_id=i)
        data.device_id = int(arrays["device"])
        out.append(data)
    return out


# ---- generator ---------------------------------------------------------------------------

def test_generator_trains_and_its_conditioning_changes_the_output(client_arrays):
    model = build_generator(SPEC, N_DEVICES, seed=0, **TINY)
    clients = _clients(client_arrays)
    x = torch.cat([c.train_x for c in clients])
    y = torch.cat([c.train_y for c in clients])
    d = torch.cat([torch.full_like(c.train_y, c.device_id) for c in clients])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        noise = torch.randn((y.shape[0], 4), generator=gen)
        loss, rec, kl = vae_loss(model, x, y, d, noise, recon="mse", obs_sigma=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]

    def draw(c: int, dev: int) -> torch.Tensor:
        return model.sample([c] * 8, [dev] * 8, torch.Generator().manual_seed(123))  # same noise every time

    base = draw(0, 0)
    assert base.shape == (8, 1, 16, 16) and base.min() >= 0 and base.max() <= 1
    assert torch.equal(base, draw(0, 0))  # deterministic given the generator
    assert (draw(1, 0) - base).abs().mean() > 0.02  # class changes the image for the same z
    assert (draw(0, 2) - base).abs().mean() > 0.02  # device changes the image for the same z
    # the class shows where it should: band 1 is brighter for class 1 than for class 0
    assert float(draw(1, 0)[:, :, 5:10].mean()) > float(base[:, :, 5:10].mean())


def test_generator_record_round_trip_and_hash():
    model = build_generator(SPEC, N_DEVICES, seed=3, **TINY)
    record = generator_record(model, extra={"trained": False})
    again = generator_from_record(record)
    assert state_sha256(again) == state_sha256(model) == state_sha256(record["state_dict"])
    assert state_sha256(build_generator(SPEC, N_DEVICES, seed=4, **TINY)) != state_sha256(model)
    a = model.sample([0, 1, 2], [0, 1, 2], torch.Generator().manual_seed(1))
    b = again.sample([0, 1, 2], [0, 1, 2], torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ConfigurationError, match="Unknown generator option"):
        build_generator(SPEC, N_DEVICES, seed=0, depth=3)


def test_images_to_uint8_layouts():
    x = torch.rand(5, 3, 8, 8)
    rgb = images_to_uint8(x, 4)
    assert rgb.shape == (5, 8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[2, 1, 4, 0] == np.rint(float(x[2, 0, 1, 4]) * 255)
    gray = images_to_uint8(x[:, :1], 3)
    assert gray.shape == (5, 8, 8)
    with pytest.raises(ValueError):
        images_to_uint8(x, 3)


# ---- federated training --------------------------------------------------------------------

def test_federated_training_is_deterministic_and_counts_bytes(client_arrays):
    config = GeneratorTrainingConfig(rounds=2, local_epochs=1, batch_size=16, model_options=TINY)
    first = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=5, held_out_device=HELD_OUT, num_threads=1)
    second = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=5, held_out_device=HELD_OUT, num_threads=1)
    assert state_sha256(first.model) == state_sha256(second.model)
    assert len(first.history) == 2 and first.summary["trained"] is True
    per_model = sum(t.numel() * t.element_size() for t in first.model.state_dict().values())
    counts = (3 + N_DEVICES) * 4  # float32 per-class and per-device counts (row weights of the embeddings)
    assert first.history[0]["bytes_up_total"] == 3 * (per_model + counts)  # every client uploads the whole generator
    assert first.history[0]["bytes_down_total"] == 3 * per_model
    assert math.isfinite(first.summary["final_loss"])
    other = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=6, held_out_device=HELD_OUT)
    assert state_sha256(other.model) != state_sha256(first.model)


def test_embedding_rows_are_averaged_over_the_clients_that_own_them():
    from fedmic_pipeline.core.synthesis.federated import CLASS_COUNTS, DEVICE_COUNTS, FedAvgGenerator

    algorithm = FedAvgGenerator(GeneratorTrainingConfig(model_options=TINY), SPEC, N_DEVICES)
    server, payload = algorithm.init_server(0)
    before = {k: v.clone() for k, v in payload.items()}

    def upload(value: float, classes: list[float], device: int, n: int):
        out = {k: torch.full_like(v, value) if v.is_floating_point() else v.clone() for k, v in payload.items()}
        out[CLASS_COUNTS] = torch.tensor(classes)
        out[DEVICE_COUNTS] = torch.zeros(N_DEVICES)
        out[DEVICE_COUNTS][device] = float(n)
        return out, n

    uploads = [upload(1.0, [10, 0, 0], device=0, n=10), upload(3.0, [10, 20, 0], device=1, n=30)]
    mean, _ = algorithm.aggregate(server, uploads, ctx=None)
    assert torch.allclose(mean["dec_in.weight"], torch.full_like(mean["dec_in.weight"], 2.5))  # plain FedAvg 10:30
    dev = mean["device_embedding.weight"]
    assert torch.allclose(dev[0], torch.ones_like(dev[0])) and torch.allclose(dev[1], torch.full_like(dev[1], 3.0))
    assert torch.equal(dev[2], before["device_embedding.weight"][2])  # nobody owns device 2: unchanged
    cls = mean["class_embedding.weight"]
    assert torch.allclose(cls[0], torch.full_like(cls[0], 2.0)) and torch.allclose(cls[1], torch.full_like(cls[1], 3.0))
    assert torch.equal(cls[2], before["class_embedding.weight"][2])
    assert CLASS_COUNTS not in mean  # the broadcast is the model only


def test_federated_training_refuses_bad_devices(client_arrays):
    clients = _clients(client_arrays)
    config = GeneratorTrainingConfig(rounds=1, model_options=TINY)
    with pytest.raises(ConfigurationError, match="held-out device"):
        train_generator_federated(clients, SPEC, N_DEVICES, config, seed=0, held_out_device=clients[0].device_id)
    clients[1].device_id = 9
    with pytest.raises(ConfigurationError, match="outside"):
        train_generator_federated(clients, SPEC, N_DEVICES, config, seed=0)
    with pytest.raises(ConfigurationError, match="recon_loss"):
        GeneratorTrainingConfig(recon_loss="l1")
    with pytest.raises(ConfigurationError, match="Unknown synthetic.generator"):
        GeneratorTrainingConfig.from_params({"round": 3})


def test_zero_rounds_returns_the_untrained_generator(client_arrays):
    config = GeneratorTrainingConfig(rounds=0, model_options=TINY)
    result = train_generator_federated(_clients(client_arrays), SPEC, N_DEVICES, config, seed=2)
    assert result.summary["trained"] is False and result.history == []
    assert state_sha256(result.model) == state_sha256(build_generator(SPEC, N_DEVICES, seed=2, **TINY))


# ---- plan ------------------------------------------------------------------------------------

def _reports() -> dict[str, np.ndarray]:
    """3 classes x 4 devices; device 3 is held out but (artificially) has federation support."""
    a = np.zeros((3, 4), dtype=np.int64)
    a[:, 0] = (100, 10, 40)
    b = np.zeros((3, 4), dtype=np.int64)
    b[:, 1] = (5, 60, 60)
    c = np.zeros((3, 4), dtype=np.int64)
    c[:, 2] = (30, 0, 2)
    d = np.zeros((3, 4), dtype=np.int64)
    d[:, 3] = (50, 50, 50)  # a client on the held-out device: must never be drawn for anyone
    return {"client_00": a, "client_01": b, "client_02": c, "client_03": d}


def test_plan_fills_exactly_the_deficits_at_the_home_device():
    plan = compute_plan(_reports(), PlanConfig(target_fraction=1.0, max_per_client=10_000, min_cell_support=1), HELD_OUT)
    assert plan.targets == {"client_00": 100, "client_01": 60, "client_02": 30, "client_03": 50}
    assert plan.cells["client_00"] == (PlanCell(1, 0, 90), PlanCell(2, 0, 60))
    assert plan.cells["client_01"] == (PlanCell(0, 1, 55),)
    # (class 1, device 2) has no real image anywhere in the federation: never drawn, reported
    assert plan.cells["client_02"] == (PlanCell(2, 2, 28),)
    assert [(s["client"], s["class_id"], s["device"], s["n"]) for s in plan.skipped] == [("client_02", 1, 2, 30)]
    assert plan.cells["client_03"] == ()  # balanced, and on the held-out device anyway
    m = plan.count_matrix("client_00")
    assert m.sum() == 150 and m[:, 1:].sum() == 0
    again = SynthesisPlan.from_dict(plan.as_dict())
    assert again == plan
    assert compute_plan(_reports(), PlanConfig(max_per_client=10_000, min_cell_support=1), HELD_OUT) == plan


def test_plan_target_fraction_and_cap():
    half = compute_plan(_reports(), PlanConfig(target_fraction=0.5, max_per_client=10_000, min_cell_support=1), HELD_OUT)
    assert half.cells["client_00"] == (PlanCell(1, 0, 40), PlanCell(2, 0, 10))
    capped = compute_plan(_reports(), PlanConfig(target_fraction=1.0, max_per_client=50, min_cell_support=1), HELD_OUT)
    assert capped.total("client_00") == 50
    assert capped.cells["client_00"] == (PlanCell(1, 0, 30), PlanCell(2, 0, 20))  # 90:60 scaled to 50 (30:20)
    capped_b = compute_plan(_reports(), PlanConfig(target_fraction=1.0, max_per_client=13, min_cell_support=1), HELD_OUT)
    assert capped_b.cells["client_00"] == (PlanCell(1, 0, 8), PlanCell(2, 0, 5))  # 7.8 / 5.2 -> 7+1 / 5 (largest remainder)
    assert all(capped.total(k) <= 50 for k in capped.clients)
    none = compute_plan(_reports(), PlanConfig(max_per_client=0), HELD_OUT)
    assert none.total() == 0 and all(v == () for v in none.cells.values())


def test_plan_cross_device_never_uses_the_held_out_device_and_keeps_totals():
    base = PlanConfig(max_per_client=10_000, min_cell_support=1)
    cross = PlanConfig(max_per_client=10_000, min_cell_support=1, cross_device=True, cross_device_share=0.5)
    plain, spread = compute_plan(_reports(), base, HELD_OUT), compute_plan(_reports(), cross, HELD_OUT)
    for name in plain.clients:
        assert all(cell.device != HELD_OUT for cell in spread.cells[name])  # although device 3 has support
    for name in ("client_00", "client_01", "client_03"):  # nothing skipped: same amount, other devices
        assert plain.total(name) == spread.total(name)
    # client_00 (home device 0). Class 1, deficit 90: 45 stay home, 45 go to device 1, the only other
    # eligible device ((1, 2) has no real image in the federation, device 3 is held out).
    m = spread.count_matrix("client_00")
    assert m[1].tolist() == [45, 45, 0, 0]
    # class 2, deficit 60: 30 home, 30 split equally over devices 1 and 2 (support 60 and 2)
    assert m[2].tolist() == [30, 15, 15, 0]
    # a support floor of 5 also excludes (class 2, device 2)
    strict = compute_plan(_reports(), PlanConfig(max_per_client=10_000, min_cell_support=5, cross_device=True), HELD_OUT)
    assert strict.count_matrix("client_00")[2].tolist() == [30, 30, 0, 0]
    # client_02's home cell (class 1, device 2) is ineligible: its half is skipped and reported,
    # the cross-device half still goes to the eligible devices
    assert [(s["client"], s["class_id"], s["device"], s["n"]) for s in spread.skipped] == [("client_02", 1, 2, 15)]
    assert spread.count_matrix("client_02")[1].tolist() == [8, 7, 0, 0]


def test_plan_rejects_bad_input():
    with pytest.raises(ConfigurationError, match="no client"):
        compute_plan({}, PlanConfig(), None)
    with pytest.raises(ConfigurationError, match="held_out_device"):
        compute_plan(_reports(), PlanConfig(), 7)
    with pytest.raises(ConfigurationError, match="Unknown synthetic.plan"):
        PlanConfig.from_params({"target": 1.0})
    with pytest.raises(ConfigurationError, match="cross_device"):
        PlanConfig(cross_device="yes")
    with pytest.raises(ConfigurationError, match="outside"):
        client_count_matrix(np.array([0, 5]), 0, 3, 4)
    assert client_count_matrix(np.array([0, 2, 2]), 1, 3, 4)[:, 1].tolist() == [1, 0, 2]


def test_sample_plan_layout_counts_flags_and_determinism():
    plan = compute_plan(_reports(), PlanConfig(max_per_client=40, min_cell_support=1, cross_device=True), HELD_OUT)
    model = build_generator(SPEC, N_DEVICES, seed=0, **TINY)
    sets = sample_plan(model, plan, seed=7, layout_ndim=3)
    assert sorted(sets) == plan.clients
    for name, arrays in sets.items():
        assert sorted(arrays) == ["devices", "images", "is_synthetic", "labels"]  # train-side only, never val/test
        n = plan.total(name)
        assert arrays["images"].shape == (n, 16, 16) and arrays["images"].dtype == np.uint8
        assert arrays["labels"].dtype == np.int64 and arrays["devices"].dtype == np.int64
        assert arrays["is_synthetic"].dtype == bool and arrays["is_synthetic"].all()
        assert (arrays["devices"] != HELD_OUT).all()
        assert np.array_equal(client_count_matrix(arrays["labels"], arrays["devices"], 3, 4), plan.count_matrix(name))
    again = sample_plan(model, plan, seed=7, layout_ndim=3)
    assert all(np.array_equal(sets[k]["images"], again[k]["images"]) for k in sets)
    other = sample_plan(model, plan, seed=8, layout_ndim=3)
    assert not np.array_equal(sets["client_00"]["images"], other["client_00"]["images"])

    rgb = build_generator(DataSpec(3, 3, 16), N_DEVICES, seed=0, **TINY)
    rgb_sets = sample_plan(rgb, plan, seed=7, layout_ndim=4)
    assert rgb_sets["client_00"]["images"].shape == (plan.total("client_00"), 16, 16, 3)


def test_sample_plan_refuses_the_held_out_device():
    plan = compute_plan(_reports(), PlanConfig(max_per_client=40, min_cell_support=1), HELD_OUT)
    data = plan.as_dict()
    data["cells"]["client_00"].append({"class_id": 0, "device": HELD_OUT, "n": 1})
    with pytest.raises(ConfigurationError, match="held-out"):
        sample_plan(build_generator(SPEC, N_DEVICES, seed=0, **TINY), SynthesisPlan.from_dict(data), 0, 3)


# ---- metrics ---------------------------------------------------------------------------------

def test_identical_sets_are_at_distance_zero_and_a_shift_is_farther():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 6))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    mmd, _ = mmd_rbf(real, real)
    assert abs(mmd) < 1e-2
    assert knn_precision_recall(real, real, k=3) == (1.0, 1.0)
    near = rng.normal(size=(400, 6))
    far = rng.normal(size=(400, 6)) + 1.5
    m_near, m_far = distribution_metrics(real, near), distribution_metrics(real, far)
    assert m_far["fd"] > 10 * m_near["fd"] and m_far["mmd2"] > 10 * abs(m_near["mmd2"])
    assert m_far["precision_k3"] < m_near["precision_k3"] and m_far["recall_k5"] < m_near["recall_k5"]


def test_frechet_distance_known_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, 1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    exact = frechet_distance_gaussians(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert exact == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2), rel=1e-10)  # = 5 + 2
    # non-diagonal: FD(N(0,A), N(0,A)) = 0 and FD to a scaled copy is (1 - c)^2 tr(A) for c = sqrt scale
    a = np.array([[2.0, 0.8], [0.8, 1.0]])
    assert frechet_distance_gaussians(np.zeros(2), a, np.zeros(2), a) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance_gaussians(np.zeros(2), a, np.zeros(2), 4 * a) == pytest.approx(np.trace(a), rel=1e-9)
    rng = np.random.default_rng(1)
    x = mu1 + s1 * rng.normal(size=(40_000, 3))
    y = mu2 + s2 * rng.normal(size=(40_000, 3))
    assert frechet_distance(x, y) == pytest.approx(7.0, rel=0.03)


def test_mmd_known_gaussians_with_a_fixed_bandwidth():
    """1-D N(0,1) vs N(mu,1), RBF bandwidth s: MMD^2 = 2 sqrt(s^2/(s^2+2)) (1 - exp(-mu^2 / (2 (s^2+2))))."""
    rng = np.random.default_rng(2)
    s, mu = 1.0, 1.0
    expected = 2 * math.sqrt(s * s / (s * s + 2)) * (1 - math.exp(-mu * mu / (2 * (s * s + 2))))  # 0.177
    values, nulls = [], []
    for _ in range(5):  # the estimator's sd is ~0.02 at n = 2000; the mean of 5 draws ~0.01
        x = rng.normal(size=(2000, 1))
        value, bandwidth = mmd_rbf(x, mu + rng.normal(size=(2000, 1)), bandwidth=s)
        assert bandwidth == s
        values.append(value)
        nulls.append(mmd_rbf(x, rng.normal(size=(2000, 1)), bandwidth=s)[0])
    assert np.mean(values) == pytest.approx(expected, abs=0.025)
    assert abs(np.mean(nulls)) < 0.005  # unbiased: ~0 for equal distributions


def test_knn_precision_recall_sees_mode_collapse():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(1000, 2))
    collapsed = 0.1 * rng.normal(size=(1000, 2))  # all inside the real support, covering a sliver of it
    precision, recall = knn_precision_recall(real, collapsed, k=3)
    assert precision > 0.95 and recall < 0.2
    disjoint = rng.normal(size=(1000, 2)) + 20
    assert knn_precision_recall(real, disjoint, k=5) == (0.0, 0.0)


def test_recalibrated_batchnorm_holds_the_exact_data_statistics():
    from fedmic_pipeline.core.models import build_model

    model = build_model("student_cnn", SPEC, seed=0, widths=(4, 8, 8), feature_dim=8)
    x = torch.rand(300, 1, 16, 16)
    recalibrate_batchnorm(model, x, batch_size=64)
    with torch.no_grad():
        first = model.body[0](x)  # the first conv's output feeds the first BatchNorm
    assert torch.allclose(model.body[1].running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5)  # 300 = 4 x 64 + 44
    assert torch.allclose(model.body[1].running_var, first.var(dim=(0, 2, 3)), rtol=0.05)
    assert not model.training


def _quality_inputs(clients):
    """The pooled real training data of ``clients``, a 36-image test set rendered by every
    device, and a quality config small enough for seconds."""
    x = torch.cat([c.train_x for c in clients])
    classes = torch.cat([c.train_y for c in clients]).numpy()
    devices = np.concatenate([np.full(c.num_train, c.device_id) for c in clients])
    rng = np.random.default_rng(9)
    test_labels = np.repeat(np.arange(3), 12)
    tests = {d: (torch.from_numpy(_images(test_labels, d, rng)[:, None]).float() / 255, torch.from_numpy(test_labels)) for d in range(N_DEVICES)}
    q = QualityConfig(encoder_epochs=1, classifier_epochs=1, batch_size=16, model_options={"widths": (4, 8, 8), "feature_dim": 8},
                      min_per_cell=4, knn_k=(3,))  # fmt: skip
    return (x, classes, devices), tests, q


def test_quality_report_covers_every_scope_and_reference(client_arrays):
    clients = _clients(client_arrays)
    config = GeneratorTrainingConfig(rounds=2, local_epochs=2, batch_size=16, model_options=TINY)
    model = train_generator_federated(clients, SPEC, N_DEVICES, config, seed=0, held_out_device=HELD_OUT).model
    (x, classes, devices), tests, q = _quality_inputs(clients)
    validation = {d: (x_d[:20], y_d[:20]) for d, (x_d, y_d) in tests.items() if d != HELD_OUT}
    result = QualityRuler((x, classes, devices), {"validation": validation, "test": tests}, 3, N_DEVICES, HELD_OUT, q, seed=0).score(model)
    cells = result["references"]["test"]["distribution"]["cells"]
    assert {(e["class_id"], e["device"]) for e in cells} == {(c, d) for c in range(3) for d in range(3)}
    measured = [e for e in cells if "synthetic" in e]
    skipped = [e for e in cells if "skipped" in e]
    assert measured and all(e["n_real_train"] < 4 for e in skipped)
    for e in measured:
        assert e["synthetic"]["n_fake"] == e["real_train"]["n_fake"] == e["n_real_train"]
    assert result["references"]["test"]["distribution"]["overall"]["synthetic"]["fd"] >= 0
    cas = result["references"]["test"]["cas"]
    assert set(cas["trained_on_synthetic"]) == set(range(N_DEVICES))
    assert cas["trained_on_synthetic_held_out_device"] is not None
    assert HELD_OUT not in result["encoder"]["accuracy"]["test"]["joint_by_device"]
    # the validation reference has no held-out device: no unseen-device CAS to choose on
    assert HELD_OUT not in result["references"]["validation"]["cas"]["trained_on_synthetic"]
    assert result["summary"]["validation"]["cas_held_out"] is None


class _ReplaySampler:
    """A known distribution: "samples" that are exactly the real training images, in order."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def sample(self, classes, devices, generator, temperature=1.0):
        assert len(classes) == self.images.shape[0]
        return self.images.clone()


def test_quality_ruler_scores_generators_against_one_fixed_real_side(client_arrays):
    """The real side (encoder, features, real-trained CAS, draws) is fitted once and lines up
    row by row with the synthetic mirror: a sampler that replays the real training images
    scores exactly the real-train floor in every cell, and an untrained generator scores
    worse, while its real_train numbers stay those of the first call."""
    clients = _clients(client_arrays)
    untrained = build_generator(SPEC, N_DEVICES, seed=0, **TINY).eval()
    (x, classes, devices), tests, q = _quality_inputs(clients)
    ruler = QualityRuler((x, classes, devices), {"test": tests}, 3, N_DEVICES, HELD_OUT, q, seed=0)
    replay, bad = ruler.score(_ReplaySampler(x)), ruler.score(untrained)
    cells = [e for e in replay["references"]["test"]["distribution"]["cells"] if "synthetic" in e]
    assert cells and all(e["synthetic"] == e["real_train"] for e in cells)
    assert replay["summary"]["test"]["fd_ratio"] == pytest.approx(1.0)
    assert replay["references"]["test"]["cas"]["trained_on_synthetic"] == replay["references"]["test"]["cas"]["trained_on_real"]
    assert bad["references"]["test"]["distribution"]["overall"]["real_train"] == replay["references"]["test"]["distribution"]["overall"]["real_train"]
    assert bad["summary"]["test"]["fd"] > replay["summary"]["test"]["fd"]


def test_a_ruler_restored_from_its_fitted_state_scores_bit_for_bit_alike(client_arrays, tmp_path):
    """The cache across runs: a ruler rebuilt from ``fitted_state()`` (saved and read back as
    weights only) skips the fitting and gives the same report as the ruler that fitted; a
    state fitted on other references is refused."""
    clients = _clients(client_arrays)
    untrained = build_generator(SPEC, N_DEVICES, seed=0, **TINY).eval()
    (x, classes, devices), tests, q = _quality_inputs(clients)
    fitted = QualityRuler((x, classes, devices), {"test": tests}, 3, N_DEVICES, HELD_OUT, q, seed=0)
    torch.save(fitted.fitted_state(), tmp_path / "ruler.pt")
    state = torch.load(tmp_path / "ruler.pt", weights_only=True)
    restored = QualityRuler((x, classes, devices), {"test": tests}, 3, N_DEVICES, HELD_OUT, q, seed=0, fitted=state)
    assert restored.score(untrained) == fitted.score(untrained)
    with pytest.raises(ConfigurationError, match="other references"):
        QualityRuler((x, classes, devices), {"validation": tests}, 3, N_DEVICES, HELD_OUT, q, seed=0, fitted=state)
