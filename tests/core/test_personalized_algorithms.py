"""MOON, FedBN, Ditto, FedKD and FedMIC on tiny easy data, plus their shared distillation step."""

from __future__ import annotations

import pytest
import torch

from fedmic_pipeline.core.algorithms import ALGORITHMS, build_algorithm
from fedmic_pipeline.core.algorithms.fedbn import norm_keys
from fedmic_pipeline.core.algorithms.fedmic import CATCH_UP, META_BASE_VERSION, META_VERSION
from fedmic_pipeline.core.algorithms.moon import model_contrastive_loss
from fedmic_pipeline.core.codec import encode_update
from fedmic_pipeline.core.distillation import DistillConfig, Projections, distillation_losses
from fedmic_pipeline.core.models import ResNet18, build_model, state_nbytes
from fedmic_pipeline.core.protocol import ClientData, ConfigurationError, DataSpec, RoundContext, payload_nbytes
from fedmic_pipeline.core.simulation import SimulationConfig, evaluate_result, run_simulation

from .conftest import NUM_CLASSES, TINY_STUDENT

METHODS = ("moon", "fedbn", "ditto", "fedkd", "fedmic")
COMMON = {"model_options": TINY_STUDENT, "batch_size": 8, "lr": 0.05}
#: a thin ResNet-18 teacher (base width 8) keeps the distillation methods fast on a CPU
THIN_TEACHER = {"teacher_width": 0.125, "local_epochs": 2}


def _params(name: str, **extra: object) -> dict:
    base = {**COMMON, **THIN_TEACHER} if name in ("fedkd", "fedmic") else dict(COMMON)
    return {**base, **extra}


def _run(name: str, clients, spec, rounds: int = 2, seed: int = 0, join_ratio: float = 1.0, **extra):
    algorithm = build_algorithm(name, _params(name, **extra), spec)
    config = SimulationConfig(num_rounds=rounds, seed=seed, join_ratio=join_ratio, device="cpu")
    return run_simulation(algorithm, clients, spec, config)


# --- every method learns -----------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_every_method_beats_chance_in_two_rounds(name: str, clients: list[ClientData], spec: DataSpec, global_test) -> None:
    result = _run(name, clients, spec)
    last = result.history[-1]
    chance = 1.0 / NUM_CLASSES
    assert name in ALGORITHMS and result.algorithm.name == name
    assert last["personalized_val_accuracy"] > chance + 0.2, last
    final = evaluate_result(result, clients, NUM_CLASSES, global_test, n_bootstrap=0)
    if name == "fedbn":
        assert result.last_global_model() is None and last["global_val_accuracy"] is None and final["global"] is None
    else:
        assert last["global_val_accuracy"] > chance + 0.2, last
        assert final["global"]["accuracy"] > chance + 0.2, final["global"]
    assert all(b > 0 for b in last["bytes_up"]) and last["bytes_down_total"] > 0


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_gives_identical_runs(name: str, clients: list[ClientData], spec: DataSpec) -> None:
    extra = {"error_feedback": True, "fp16_factors": True} if name == "fedmic" else {}
    a = _run(name, clients, spec, **extra)
    b = _run(name, clients, spec, **extra)
    keys = ("bytes_up", "bytes_down", "train_loss", "train_accuracy", "personalized_val_accuracy_per_client")
    for ra, rb in zip(a.history, b.history, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    for cid in a.client_ids:
        sa, sb = a.personalized_model(cid).state_dict(), b.personalized_model(cid).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- FedMIC / FedKD ----------------------------------------------------------------


def test_fedmic_uploads_fewer_bytes_than_fedavg(clients: list[ClientData], spec: DataSpec) -> None:
    fedavg = _run("fedavg", clients, spec)
    fedmic = _run("fedmic", clients, spec)
    for ra, rm in zip(fedavg.history, fedmic.history, strict=True):
        assert rm["bytes_dense_per_client"] == ra["bytes_dense_per_client"]  # same shared model
        assert all(m < a for m, a in zip(rm["bytes_up"], ra["bytes_up"], strict=True))
    assert fedmic.totals()["bytes_up_total"] < 0.6 * fedavg.totals()["bytes_up_total"]
    metrics = fedmic.history[-1]["client_metrics"][0]
    assert metrics["codec/bytes_encoded"] == fedmic.history[-1]["bytes_up"][0]
    assert metrics["codec/energy"] == pytest.approx(0.98) and fedmic.history[0]["client_metrics"][0]["codec/energy"] == pytest.approx(0.95)


def test_fedmic_personalized_model_is_the_teacher(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("fedmic", clients, spec, rounds=1)
    for cid in result.client_ids:
        model = result.last_personalized_model(cid)
        assert model is result.client_states[cid]["teacher"]
        assert isinstance(model, ResNet18) and model.feature_dim == 64  # 8 * base width 8
        assert model is not result.last_global_model()
    proj = result.client_states[0]["projections"]
    assert proj.to_student is not None and proj.to_teacher.weight.shape == (64, TINY_STUDENT["feature_dim"])
    described = result.algorithm.describe()
    assert described["projection_mode"] == "bidirectional" and described["teacher_resolved.base_width"] == 8
    assert "interpretation.downlink" in described


def test_fedkd_uses_one_shared_projection(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("fedkd", clients, spec, rounds=1)
    proj = result.client_states[0]["projections"]
    assert proj.mode == "shared" and proj.to_student is None
    assert result.algorithm.describe()["projection_mode"] == "shared"


def test_fedmic_aggregation_is_sample_weighted(spec: DataSpec) -> None:
    alg = build_algorithm("fedmic", _params("fedmic"), spec)
    server, payload = alg.init_server(seed=0)
    keys = alg.shared_keys()
    g = torch.Generator().manual_seed(0)

    def rank_one_delta(scale: float) -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            shape = payload[k].shape
            if len(shape) >= 2:  # rank 1: kept exactly by the codec at any energy
                u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, payload[k][0].numel(), generator=g)
                out[k] = scale * (u @ v).reshape(shape)
            else:
                out[k] = scale * torch.randn(shape, generator=g)
        return out

    d1, d2 = rank_one_delta(1.0), rank_one_delta(0.1)
    ctx = RoundContext(round=0, num_rounds=2, seed=0, device=torch.device("cpu"))
    uploads = [(encode_update(d1, 0.95)[0], 300), (encode_update(d2, 0.95)[0], 100)]
    new_payload, server = alg.aggregate(server, uploads, ctx)
    for k in keys:
        expected = payload[k] + 0.75 * d1[k] + 0.25 * d2[k]
        torch.testing.assert_close(new_payload[k], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(server["model"].state_dict()[k], expected, rtol=1e-4, atol=1e-5)


def test_fedmic_downlink_compression_keeps_clients_in_sync(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("fedmic", clients, spec, rounds=3, downlink_compression=True, error_feedback=True)
    server = result.server_state
    assert result.last_global_model() is server["view_model"]
    for cid in result.client_ids:
        state = result.client_states[cid]
        assert state["version"] == server["version"] - 1  # they hold the broadcast before the last
        assert state["error_feedback"].norm() > 0
    student = build_model("student_cnn", spec, seed=0, **TINY_STUDENT)
    floats = sum(t.numel() * t.element_size() for t in student.state_dict().values() if t.is_floating_point())
    assert result.history[0]["bytes_down"][0] == floats + 8  # dense first broadcast + version
    assert result.history[0]["bytes_dense_per_client"] == state_nbytes(student)
    assert result.history[-1]["bytes_down"][0] < 0.6 * state_nbytes(student)


def test_fedmic_downlink_delta_reconstructs_the_server_view(clients: list[ClientData], spec: DataSpec) -> None:
    alg = build_algorithm("fedmic", _params("fedmic", downlink_compression=True, local_epochs=1), spec)
    server, payload = alg.init_server(seed=0)
    states = {c.client_id: alg.init_client(c.client_id, c, 0) for c in clients}
    for rnd in range(3):
        ctx = RoundContext(rnd, 3, 0, torch.device("cpu"), sampled=(0, 1, 2), num_clients=3)
        if rnd > 0:
            assert int(payload[META_BASE_VERSION]) == rnd - 1 and int(payload[META_VERSION]) == rnd
        uploads = []
        server_view = {k: v.clone() for k, v in server["view_model"].state_dict().items()}
        for c in clients:
            up, states[c.client_id], _ = alg.client_update(states[c.client_id], c, payload, ctx)
            uploads.append((up, c.num_train))
            view = states[c.client_id]["view"]
            assert all(torch.equal(view[k], server_view[k]) for k in alg.shared_keys())  # bit-exact
        payload, server = alg.aggregate(server, uploads, ctx)
        # the exact global model G keeps what the compressed broadcast has not sent yet
        assert any(
            not torch.equal(server["model"].state_dict()[k], server["view_model"].state_dict()[k]) for k in alg.shared_keys()
        )


def test_fedmic_downlink_catch_up_gives_every_hospital_the_servers_model(clients: list[ClientData], spec: DataSpec) -> None:
    """Partial participation with compressed broadcasts: a hospital that missed rounds gets the
    deltas it missed (or the dense model when smaller), one never seen gets the dense model;
    each then holds exactly the server's C_t, and its bytes are what it received."""
    alg = build_algorithm("fedmic", _params("fedmic", downlink_compression=True, local_epochs=1), spec)
    server, payload = alg.init_server(seed=0)
    states = {c.client_id: alg.init_client(c.client_id, c, 0) for c in clients}
    dense_bytes = payload_nbytes(payload)  # the first broadcast is the dense model (+ version)
    schedule = [(0,), (1,), (2,), (0,), (0, 1, 2), (1,)]
    kinds: dict[tuple[int, int], str] = {}
    for rnd, sampled in enumerate(schedule):
        ctx = RoundContext(rnd, len(schedule), 0, torch.device("cpu"), sampled=sampled, num_clients=3)
        server_view = {k: v.clone() for k, v in server["view_model"].state_dict().items()}
        uploads = []
        for cid in sampled:
            sent = alg.payload_for(cid, payload, server)
            kinds[rnd, cid] = (
                "broadcast" if sent is payload else "catch-up" if any(k.startswith(CATCH_UP) for k in sent) else "dense"
            )
            assert payload_nbytes(sent) <= dense_bytes
            up, states[cid], _ = alg.client_update(states[cid], clients[cid], sent, ctx)
            uploads.append((up, clients[cid].num_train))
            assert all(torch.equal(states[cid]["view"][k], server_view[k]) for k in alg.shared_keys()), (rnd, cid)
            assert states[cid]["version"] == server["version"]
        payload, server = alg.aggregate(server, uploads, ctx)
    assert kinds[1, 1] == kinds[2, 2] == "dense"  # never seen before
    assert kinds[3, 0] == "catch-up"  # missed versions 1-2: three small deltas beat the dense model
    assert kinds[4, 0] == "broadcast"  # held the previous version
    assert kinds[4, 1] == kinds[4, 2] == "catch-up" and kinds[5, 1] == "broadcast"
    assert min(server["broadcasts"]) > min(server["client_versions"].values())  # what nobody needs is dropped


def test_fedmic_downlink_runs_under_partial_participation(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("fedmic", clients, spec, rounds=3, join_ratio=0.67, downlink_compression=True)
    assert [len(r["sampled"]) for r in result.history] == [2, 2, 2]
    assert all(len(r["bytes_down"]) == 2 for r in result.history)
    assert result.history[-1]["bytes_down_total"] < result.history[0]["bytes_down_total"]


# --- FedBN -------------------------------------------------------------------------


def test_fedbn_never_uploads_normalization_layers(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("fedbn", clients, spec)
    model = build_model("student_cnn", spec, seed=0, **TINY_STUDENT)
    bn = set(norm_keys(model))
    assert {"body.1.weight", "body.1.bias", "body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"} <= bn
    # bytes: everything but the BN entries travels, in both directions
    state = model.state_dict()
    bn_bytes = sum(state[k].numel() * state[k].element_size() for k in bn)
    for record in result.history:
        assert all(b == state_nbytes(model) - bn_bytes for b in record["bytes_up"])
        assert record["bytes_down"][0] == state_nbytes(model) - bn_bytes
        assert record["bytes_dense_per_client"] == state_nbytes(model)
    # the BN state is each client's own
    norms = [result.client_states[c.client_id]["norm"] for c in clients]
    assert set(norms[0]) == bn
    key = next(k for k in bn if k.endswith("running_mean"))
    assert not torch.equal(norms[0][key], norms[1][key])
    p0, p1 = result.last_personalized_model(0), result.last_personalized_model(1)
    assert torch.equal(p0.state_dict()[key], norms[0][key]) and not torch.equal(p0.state_dict()[key], p1.state_dict()[key])


def test_fedbn_upload_keys(clients: list[ClientData], spec: DataSpec) -> None:
    alg = build_algorithm("fedbn", _params("fedbn"), spec)
    server, payload = alg.init_server(seed=0)
    state = alg.init_client(0, clients[0], 0)
    upload, state, _ = alg.client_update(state, clients[0], payload, RoundContext(0, 1, 0, torch.device("cpu")))
    bn = set(norm_keys(server["model"]))
    assert not (set(upload) & bn) and not (set(payload) & bn)
    assert set(upload) == set(payload)


# --- MOON, Ditto -------------------------------------------------------------------


def test_moon_contrastive_loss_prefers_the_positive() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    far = torch.randn(16, 8, generator=g)
    good = model_contrastive_loss(z, z, far, tau=0.5)
    bad = model_contrastive_loss(z, far, z, tau=0.5)
    assert good < torch.log(torch.tensor(2.0)) < bad
    assert model_contrastive_loss(z, far, far, 0.5) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)


def test_moon_keeps_the_previous_model_and_adds_the_term(clients: list[ClientData], spec: DataSpec) -> None:
    result = _run("moon", clients, spec)
    first, second = result.history
    assert all(m["contrastive"] == 0.0 for m in first["client_metrics"])  # no previous model yet
    assert all(m["contrastive"] > 0.0 for m in second["client_metrics"])
    prev = result.client_states[0]["previous"]
    assert prev is not None and set(prev) == set(result.last_global_model().state_dict())


def test_moon_is_fedavg_plus_its_hooks(clients: list[ClientData], spec: DataSpec) -> None:
    """With mu = 0 MOON's hook adds no term, so its run is FedAvg's bit for bit, yet its
    bookkeeping hook still keeps each client's model; with mu > 0 the term changes training."""
    fedavg = _run("fedavg", clients, spec)
    moon0 = _run("moon", clients, spec, mu=0.0)
    moon = _run("moon", clients, spec)
    keys = ("train_loss", "train_accuracy", "bytes_up", "bytes_down")
    assert [{k: r[k] for k in keys} for r in moon0.history] == [{k: r[k] for k in keys} for r in fedavg.history]
    ga, g0, g1 = (r.last_global_model().state_dict() for r in (fedavg, moon0, moon))
    assert all(torch.equal(ga[k], g0[k]) for k in ga) and not all(torch.equal(ga[k], g1[k]) for k in ga)
    assert all(m["contrastive"] == 0.0 for r in moon0.history for m in r["client_metrics"])
    assert all(state["previous"] is not None for state in moon0.client_states.values())


def test_ditto_personal_model_stays_local(clients: list[ClientData], spec: DataSpec) -> None:
    ditto = _run("ditto", clients, spec)
    fedavg = _run("fedavg", clients, spec)
    assert ditto.totals()["bytes_up_total"] == fedavg.totals()["bytes_up_total"]
    # the global task is exactly FedAvg's
    ga, gd = fedavg.last_global_model().state_dict(), ditto.last_global_model().state_dict()
    assert all(torch.equal(ga[k], gd[k]) for k in ga)
    personal = ditto.personalized_model(0)
    assert personal is ditto.client_states[0]["personal"] and personal is not ditto.last_global_model()
    assert not torch.equal(personal.state_dict()["classifier.weight"], gd["classifier.weight"])
    # the personal task runs in FedAvg's after_local_update hook and reports under personal_*
    for rd, rf in zip(ditto.history, fedavg.history, strict=True):
        assert rd["train_loss"] == rf["train_loss"]
        for md, mf in zip(rd["client_metrics"], rf["client_metrics"], strict=True):
            assert {k: md[k] for k in mf} == mf
            assert md["personal_num_samples"] > 0 and md["personal_objective"] > md["personal_loss"]


# --- distillation step -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bidirectional", "shared"])
def test_distillation_gradients_reach_only_their_side(mode: str, spec: DataSpec) -> None:
    teacher = build_model("resnet18", spec, seed=1, base_width=4)
    student = build_model("student_cnn", spec, seed=2, **TINY_STUDENT)
    proj = Projections(student.feature_dim, teacher.feature_dim, mode, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g)
    loss_t, loss_s, metrics = distillation_losses(teacher, student, proj, x, y, DistillConfig())
    teacher_side = list(teacher.parameters()) + proj.teacher_side_parameters()
    student_side = list(student.parameters()) + proj.student_side_parameters()
    for loss, own, other in ((loss_t, teacher_side, student_side), (loss_s, student_side, teacher_side)):
        grads_other = torch.autograd.grad(loss, other, retain_graph=True, allow_unused=True)
        assert all(gr is None or not gr.any() for gr in grads_other)
        grads_own = torch.autograd.grad(loss, own, retain_graph=True, allow_unused=True)
        assert any(gr is not None and gr.any() for gr in grads_own)
    w = float(metrics["adaptive_weight"])
    assert w == pytest.approx(1.0 / float(metrics["ce_teacher"] + metrics["ce_student"]), rel=1e-5)
    assert float(metrics["kl_teacher"]) >= 0 and float(metrics["kl_student"]) >= 0


def test_distillation_weight_cap_and_tau_scaling(spec: DataSpec) -> None:
    teacher = build_model("student_cnn", spec, seed=1, **TINY_STUDENT)
    student = build_model("student_cnn", spec, seed=2, **TINY_STUDENT)
    proj = Projections(32, 32, "bidirectional", generator=torch.Generator().manual_seed(3))
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    _, _, m = distillation_losses(teacher, student, proj, x, y, DistillConfig(max_weight=0.01))
    assert float(m["adaptive_weight"]) == pytest.approx(0.01)
    _, _, m = distillation_losses(teacher, student, proj, x, y, DistillConfig(adaptive_weight=False))
    assert float(m["adaptive_weight"]) == 1.0


# --- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedmic", {"energy_start": 0.99, "energy_end": 0.95}, "energy_start .* must be <= energy_end"),
        ("fedmic", {"energy_start": 0.0}, r"energy_start must be in \(0, 1\]"),
        ("fedmic", {"energy_end": 1.5}, r"energy_end must be in \(0, 1\]"),
        ("fedmic", {"tau": 0.0}, "tau must be > 0"),
        ("fedmic", {"alpha_rep": -1.0}, "alpha_rep must be >= 0"),
        ("fedmic", {"alpha_dec": -0.5}, "alpha_dec must be >= 0"),
        ("fedmic", {"teacher_width": 0.0}, "teacher_width must be > 0"),
        ("fedmic", {"teacher_model": "vgg"}, "teacher_model must be one of"),
        ("fedmic", {"teacher_lr": -1.0}, "teacher_lr must be > 0"),
        ("fedmic", {"teacher_options": {"depth": 50}}, "Bad options"),
        ("fedkd", {"energy_start": 1.2}, r"energy_start must be in \(0, 1\]"),
        ("moon", {"tau": 0.0}, "tau must be > 0"),
        ("moon", {"mu": -1.0}, "mu must be >= 0"),
        ("ditto", {"lam": -0.1}, "lam must be >= 0"),
        ("fedbn", {"mu": 0.1}, "Unknown parameter"),
    ],
)
def test_configuration_errors_name_the_fix(name: str, params: dict, match: str, spec: DataSpec) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build_algorithm(name, params, spec)


def test_yaml_style_values_are_accepted(spec: DataSpec) -> None:
    alg = build_algorithm("fedmic", {"teacher_lr": "1e-3", "teacher_model": "student_cnn", "teacher_width": 0.5}, spec)
    assert alg.config.teacher_lr == 0.001
    assert alg.config.teacher_kwargs() == {"widths": (16, 32, 64), "feature_dim": 64}
    params = alg.describe()
    assert params["algorithm"] == "fedmic" and params["energy_start"] == 0.95 and params["tau"] == 1.0
