"""SecAgg+ over the Flower deployment (``fedmic_pipeline.flower.secure_aggregation``).

Fast tests (no processes): which methods SecAgg+ can carry -- FedMIC's low-rank upload,
FedBN's partial aggregate and client-level DP are refused with the reason, the FedAvg
family is accepted -- and the run config key is validated.

Slow tests (``-m slow``): one real ``flower-superlink`` and two ``flower-supernode``
processes on 127.0.0.1 (TLS, registered node keys, approved app: the launcher's
defaults) on the tiny two-hospital partition of ``test_deployment``:

* one round of FedAvg with ``secure-aggregation = "secaggplus"`` ends with the global model
  that the plain aggregation of the same updates gives (the in-process runner, same seed
  and partition; ``test_deployment`` proves it equals plain Flower), on every floating
  entry within SecAgg+'s quantization bound, while the integer BatchNorm counters stay the
  server's; the four SecAgg+ stages ran, and no hospital sent a float array;
* two rounds (the SecAgg+ state on the nodes restarts every round) stay within 1e-3 of the
  plain run (round 2 trains from the quantized model);
* FedMIC with SecAgg+ is refused before any round with the message naming the limit.
Every run has a wall-clock timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmic_pipeline.core.algorithms import build_algorithm
from fedmic_pipeline.core.protocol import DataSpec
from fedmic_pipeline.flower import task
from fedmic_pipeline.flower.client_app import OUTGOING_LOG_KEY
from fedmic_pipeline.flower.secure_aggregation import SecureAggregationUnsupported, check_supported

from .test_deployment import FEDAVG_PARAMS, FEDMIC_PARAMS, SEED, _run_config, write_tiny_partition

SECAGG = {"secure-aggregation": "secaggplus"}
CLIP = 8.0
#: SecAgg+'s quantization step (Flower's default 2**22 levels over [-clip, clip]).
STEP = 2 * CLIP / 2**22
RUN_TIMEOUT = 240


# -- fast --------------------------------------------------------------------------------------
SPEC = DataSpec(in_channels=1, num_classes=3)


@pytest.mark.parametrize(
    ("name", "params", "reason"),
    [
        ("fedmic", FEDMIC_PARAMS, "low-rank SVD factors"),
        ("fedbn", FEDAVG_PARAMS, "not FedAvg's sample-weighted mean"),
        ("fedavg", {**FEDAVG_PARAMS, "dp": {"noise_multiplier": 0.5, "clip_norm": 1.0}}, "client-level DP"),
    ],
)
def test_non_summable_uploads_are_refused_with_the_reason(name: str, params: dict[str, Any], reason: str) -> None:
    algorithm = build_algorithm(name, dict(params), SPEC)
    with pytest.raises(SecureAggregationUnsupported, match=reason) as info:
        check_supported("secaggplus", name, algorithm)
    assert f"cannot run '{name}'" in str(info.value)
    check_supported("none", name, algorithm)  # without SecAgg+ nothing changes


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "moon", "ditto"])
def test_fedavg_family_is_accepted(name: str) -> None:
    check_supported("secaggplus", name, build_algorithm(name, dict(FEDAVG_PARAMS), SPEC))


def test_secure_aggregation_run_config_is_validated(tmp_path: Path) -> None:
    cfg = task.ServerRunConfig.from_run_config({"params-file": "", **SECAGG}, root=tmp_path)
    assert cfg.secure_aggregation == "secaggplus" and cfg.secagg_clipping_range == CLIP
    with pytest.raises(task.FlowerConfigError, match="secure-aggregation"):
        task.ServerRunConfig.from_run_config({"params-file": "", "secure-aggregation": "homomorphic"}, root=tmp_path)


# -- slow: a real deployment -----------------------------------------------------------------
def _outgoing_log(work_dir: Path, index: int) -> Path:
    return work_dir / f"outgoing-node-{index}.jsonl"


@pytest.fixture(scope="module")
def partition_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_partition(tmp_path_factory.mktemp("secagg_partition"))


@pytest.fixture(scope="module")
def federation(partition_dir: Path, tmp_path_factory: pytest.TempPathFactory, project_root: Path):
    from fedmic_pipeline.flower.launch import LoopbackFederation

    work_dir = tmp_path_factory.mktemp("secagg_work")
    fed = LoopbackFederation(
        2, partition_dir, project_dir=project_root, work_dir=work_dir,
        env={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""},
        node_configs=[{OUTGOING_LOG_KEY: str(_outgoing_log(work_dir, i))} for i in range(2)],
    )  # fmt: skip
    with fed:
        yield fed


def _secagg_run(federation: Any, out: Path, rounds: int) -> Any:
    config = _run_config("fedavg", FEDAVG_PARAMS, out, **SECAGG, **{"num-rounds": rounds, "eval-every": rounds})
    result = federation.run(config, timeout=RUN_TIMEOUT)
    assert result.status == "completed", result.output[-4000:]
    return result


def _last_models(result: Any, partition_dir: Path, rounds: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from fedmic_pipeline.core.simulation import SimulationConfig, run_simulation

    spec = task.load_data_spec(partition_dir)
    clients = [task.load_client_data(partition_dir, i) for i in range(2)]
    config = SimulationConfig(num_rounds=rounds, seed=SEED, device="cpu", eval_every=rounds, evaluate_personalized=False, num_threads=1)
    reference = run_simulation(build_algorithm("fedavg", dict(FEDAVG_PARAMS), spec), clients, spec, config)
    saved = torch.load(result.output_dir / "global_model_last.pt", weights_only=False)["state_dict"]
    return saved, reference.last_global_model().state_dict()


@pytest.mark.slow
def test_secaggplus_round_equals_the_plain_aggregate(federation, partition_dir: Path, tmp_path: Path) -> None:
    result = _secagg_run(federation, tmp_path / "one", rounds=1)
    saved, plain = _last_models(result, partition_dir, rounds=1)
    initial = build_algorithm("fedavg", dict(FEDAVG_PARAMS), task.load_data_spec(partition_dir)).init_server(SEED)[1]
    # each node's vector is quantized to STEP (stochastic rounding); the weighted mean of two
    # is off by < 2 steps / (sum n_k / max n_k) per entry
    sizes = [p["num_train"] for p in result.summary["partitions"].values()]
    bound = len(sizes) * STEP * max(sizes) / sum(sizes) + 1e-6
    assert list(saved) == list(plain)
    worst = 0.0
    for key, value in plain.items():
        assert saved[key].dtype == value.dtype, key
        if value.is_floating_point():
            err = float((saved[key].double() - value.double()).abs().max())
            worst = max(worst, err)
            assert err <= bound, (key, err, bound)
        else:  # integer BN counters: the server's, as under DP (a step count is not summed)
            assert torch.equal(saved[key], initial[key]), key
    changed = max(float((plain[k].double() - initial[k].double()).abs().max()) for k in plain if plain[k].is_floating_point())
    assert changed > 100 * bound, "the round did not move the model: the comparison would prove nothing"

    record = result.summary["history"][0]
    assert record["secure_aggregation"] == "secaggplus" and record["participants"] == [0, 1]
    assert [s["stage"] for s in record["secagg_stages"]] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert all(m.get("secagg-clipped-entries") == 0 for m in record["client_metrics"])
    # the collect stage's masked vectors hold an int64 per floating entry: ~2x the dense
    # float32 model from each of the two nodes
    assert record["secagg_stages"][2]["bytes_up"] > 3 * record["bytes_dense_per_client"]
    # what left each hospital in a train reply: no float array, only the masked integers
    for index in range(2):
        for line in _outgoing_log(federation.work_dir, index).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["message_type"] != "train":
                continue
            for record_name, desc in entry["records"].items():
                if desc["kind"] == "array":
                    assert desc["entries"] == {}, (record_name, desc)
    print(f"SecAgg+ vs plain aggregate: max |diff| {worst:.2e} (bound {bound:.2e})")


@pytest.mark.slow
def test_secaggplus_over_two_rounds_stays_with_the_plain_run(federation, partition_dir: Path, tmp_path: Path) -> None:
    result = _secagg_run(federation, tmp_path / "two", rounds=2)
    saved, plain = _last_models(result, partition_dir, rounds=2)
    for key, value in plain.items():
        if value.is_floating_point():
            # round 2 trains from a global model within the quantization bound of the plain
            # one; local SGD amplifies that ~40x (measured max 1.8e-4 on weights of ~0.1)
            assert torch.allclose(saved[key].double(), value.double(), atol=1e-3, rtol=0), key
    assert [len(r["secagg_stages"]) for r in result.summary["history"]] == [4, 4]
    assert result.summary["history"][-1]["global_val_balanced_accuracy"] is not None


@pytest.mark.slow
def test_fedmic_with_secaggplus_is_refused_before_any_round(federation, tmp_path: Path) -> None:
    config = _run_config("fedmic", FEDMIC_PARAMS, tmp_path / "fedmic", **SECAGG)
    result = federation.run(config, timeout=120)
    assert result.status != "completed"
    assert result.summary is not None and result.summary["history"] == []
    assert "cannot run 'fedmic'" in result.summary["error"] and "low-rank SVD factors" in result.summary["error"]
