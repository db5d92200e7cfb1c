"""Resumable training: a run interrupted after round 2 of 4 and resumed from its checkpoint
ends bit-identical to the uninterrupted run (history and every model), for FedAvg,
SCAFFOLD and FedMIC; a resume with other parameters or data fails naming the difference.

The interruption is real: in the core tests an ``on_round`` callback raises after round 2
(the checkpoint of round 2 has been handed over by then); in the Kedro test a ``kedro run``
subprocess is SIGKILLed as soon as its checkpoint file appears.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fedmic_pipeline import federation as build
from fedmic_pipeline import model_evaluation
from fedmic_pipeline.core.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    deserialize_checkpoint,
    serialize_checkpoint,
)
from fedmic_pipeline.core.protocol import ConfigurationError
from fedmic_pipeline.core.simulation import TIMING_KEYS, SimulationConfig, run_simulation
from fixtures_pipelines import PROJECT_ROOT as ROOT
from fixtures_pipelines import make_project, small_federation, write_training_params

ROUNDS, STOP_AFTER = 4, 2

ALGORITHM_PARAMS = {
    "common": {"model": "student_cnn", "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "batch_size": 16, "local_epochs": 1},
    "fedavg": {},
    "scaffold": {"momentum": 0.0, "server_lr": 1.0},
    # momentum 0.9: the teacher's optimizer (which persists across rounds) then carries
    # momentum buffers, and the error-feedback residuals carry state, both must survive.
    "fedmic": {"teacher_model": "student_cnn", "teacher_width": 0.5, "momentum": 0.9, "error_feedback": True,
               "fp16_factors": True, "energy_start": 0.9, "energy_end": 0.98},
}


class Interrupted(Exception):
    """Stands in for a crash, a kill or a pre-emption after a round."""


@pytest.fixture(scope="module")
def federation():
    """Six hospitals on an easy 3-class task (16x16 images); 3 sampled per round."""
    arrays, global_test, info, _ = small_federation(num_clients=6, n_train=300, n_val=60, n_test=60)
    spec = build.data_spec(info)
    return spec, build.build_clients(arrays), model_evaluation.global_test_tensors(global_test)


def _config(**overrides) -> SimulationConfig:
    return SimulationConfig(**{"num_rounds": ROUNDS, "join_ratio": 0.5, "seed": 7, "device": "cpu", "num_threads": 1, **overrides})


def _run(federation, name, params=ALGORITHM_PARAMS, config=None, **kwargs):
    spec, clients, test = federation
    algorithm = build.make_algorithm(name, params, spec)
    return run_simulation(algorithm, clients, spec, config or _config(), **kwargs)


def _history_json(history) -> str:
    """Every field but the clock's, as exact float reprs (NaN-safe): equal strings = bit-identical."""
    return json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history], sort_keys=True)


def _models(result) -> dict[str, dict[str, torch.Tensor]]:
    """The selected and the last-round models: a resume must continue the selection too."""
    out = {}
    if result.global_model() is not None:
        out["global"] = result.global_model().state_dict()
        out["global_last"] = result.last_global_model().state_dict()
    for cid in result.client_ids:
        out[f"client_{cid}"] = result.personalized_model(cid).state_dict()
        out[f"client_{cid}_last"] = result.last_personalized_model(cid).state_dict()
    return out


def _interrupted_then_resumed(federation, name):
    saved: list[bytes] = []

    def stop(record):
        if record["round"] + 1 == STOP_AFTER:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(federation, name, checkpoint_every=1, on_checkpoint=lambda c: saved.append(serialize_checkpoint(c)), on_round=stop)
    assert len(saved) == STOP_AFTER  # one after each finished round, none after the last
    checkpoint = deserialize_checkpoint(saved[-1], map_location="cpu")
    assert checkpoint["rounds_completed"] == STOP_AFTER and len(checkpoint["history"]) == STOP_AFTER
    # A fresh algorithm object, as in a new process: everything comes from the checkpoint.
    return _run(federation, name, resume_from=checkpoint)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedmic"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(federation, name):
    full = _run(federation, name)
    resumed = _interrupted_then_resumed(federation, name)

    assert len(resumed.history) == ROUNDS
    assert resumed.extras["resumed_after_round"] == STOP_AFTER
    assert _history_json(resumed.history) == _history_json(full.history)
    assert [r["sampled"] for r in resumed.history] == [r["sampled"] for r in full.history]
    assert full.selector.summary() == resumed.selector.summary()
    a, b = _models(full), _models(resumed)
    assert a.keys() == b.keys()
    for model_key in a:
        for key, value in a[model_key].items():
            assert torch.equal(value, b[model_key][key]), f"{name}: {model_key}.{key} differs after resuming"
    assert resumed.totals()["bytes_up_total"] == full.totals()["bytes_up_total"]
    if name == "scaffold":  # the control variates themselves, not only their effect
        for cid, state in full.client_states.items():
            for key, value in (state["c_i"] or {}).items():
                assert torch.equal(value, resumed.client_states[cid]["c_i"][key])
    if name == "fedmic":  # momentum buffers of the persistent teacher optimizers, error-feedback residuals
        for cid, state in full.client_states.items():
            other = resumed.client_states[cid]
            for group_a, group_b in zip(state["teacher_optimizer"].state.values(), other["teacher_optimizer"].state.values()):
                assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
            for key, value in state["error_feedback"].residual.items():
                assert torch.equal(value, other["error_feedback"].residual[key])


OTHER_METHODS = {
    "fedprox": {"mu": 0.01},
    "moon": {"mu": 1.0, "tau": 0.5},
    "fedbn": {},
    "ditto": {"lam": 0.1},
    "fedkd": {"teacher_model": "student_cnn", "teacher_width": 0.5},
    "local_only": {"momentum": 0.9},
    "centralized": {"momentum": 0.9},
}


@pytest.mark.parametrize("name", sorted(OTHER_METHODS))
def test_every_other_method_resumes_identically(federation, name):
    """The same guarantee for the remaining methods: their private state (MOON's previous
    model, FedBN's local norms, Ditto's personal model and optimizer, local-only's and the
    pooled centralized model's persistent optimizers) lives in the checkpointed states."""
    params = {**ALGORITHM_PARAMS, name: OTHER_METHODS[name]}
    full = _run(federation, name, params=params)
    saved: list[bytes] = []

    def stop(record):
        if record["round"] + 1 == STOP_AFTER:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(federation, name, params=params, checkpoint_every=2, on_round=stop,
             on_checkpoint=lambda c: saved.append(serialize_checkpoint(c)))  # fmt: skip
    resumed = _run(federation, name, params=params, resume_from=deserialize_checkpoint(saved[-1]))
    assert _history_json(resumed.history) == _history_json(full.history)
    assert full.selector.summary() == resumed.selector.summary()
    a, b = _models(full), _models(resumed)
    for model_key in a:
        for key, value in a[model_key].items():
            assert torch.equal(value, b[model_key][key]), f"{name}: {model_key}.{key} differs after resuming"


def test_a_resumed_optimizer_steps_the_resumed_teacher(federation):
    """The pickle keeps the optimizer bound to the very parameters of the restored teacher."""
    saved: list[bytes] = []

    def stop(record):
        raise Interrupted

    with pytest.raises(Interrupted):
        _run(federation, "fedmic", checkpoint_every=1, on_checkpoint=lambda c: saved.append(serialize_checkpoint(c)), on_round=stop)
    state = next(iter(deserialize_checkpoint(saved[-1])["client_states"].values()))
    optimised = {id(p) for group in state["teacher_optimizer"].param_groups for p in group["params"]}
    assert {id(p) for p in state["teacher"].parameters()} <= optimised
    assert {id(p) for p in state["projections"].teacher_side_parameters()} <= optimised


def _checkpoint_after_round_2(federation, name="fedavg") -> dict:
    saved: list[bytes] = []
    _run(federation, name, checkpoint_every=2, on_checkpoint=lambda c: saved.append(serialize_checkpoint(c)))
    return deserialize_checkpoint(saved[0])


def test_resuming_with_other_parameters_names_the_mismatch(federation):
    checkpoint = _checkpoint_after_round_2(federation)
    other = {**ALGORITHM_PARAMS, "common": {**ALGORITHM_PARAMS["common"], "lr": 0.01}}
    with pytest.raises(CheckpointMismatchError, match=r"algorithm\.lr: checkpoint 0\.05, now 0\.01") as info:
        _run(federation, "fedavg", params=other, resume_from=checkpoint)
    assert info.value.mismatches == ["algorithm.lr"]
    with pytest.raises(CheckpointMismatchError, match=r"simulation\.num_rounds: checkpoint 4, now 6"):
        _run(federation, "fedavg", config=_config(num_rounds=6), resume_from=checkpoint)
    with pytest.raises(CheckpointMismatchError, match=r"algorithm\.algorithm: checkpoint 'fedavg', now 'scaffold'"):
        _run(federation, "scaffold", resume_from=checkpoint)
    # The progress bar cannot change a result, so it may differ.
    assert len(_run(federation, "fedavg", config=_config(progress="tqdm"), resume_from=checkpoint).history) == ROUNDS


def test_resuming_on_other_data_names_the_client(federation):
    checkpoint = _checkpoint_after_round_2(federation)
    spec, clients, test = federation
    changed = list(clients)
    first = changed[0]
    changed[0] = type(first)(**{**first.__dict__, "train_x": first.train_x.flip(0)})  # same shapes, other order
    algorithm = build.make_algorithm("fedavg", ALGORITHM_PARAMS, spec)
    with pytest.raises(CheckpointMismatchError, match=r"data\.client_00") as info:
        run_simulation(algorithm, changed, spec, _config(), resume_from=checkpoint)
    assert info.value.mismatches == ["data.client_00"]


def test_data_digest_covers_empty_splits_and_every_byte():
    from fedmic_pipeline.core.checkpoint import data_digest
    from fedmic_pipeline.core.protocol import ClientData

    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 2
    empty_x, empty_y = x[:0], y[:0]
    client = ClientData(3, x, y, empty_x, empty_y, empty_x, empty_y, train_is_synthetic=torch.zeros(6, dtype=torch.bool))
    digest = data_digest([client], (x, y))
    assert set(digest) == {"client_03", "global_test"}
    nudged = x.clone()
    nudged[5, 0, 3, 3] = torch.nextafter(nudged[5, 0, 3, 3], torch.tensor(2.0))  # one ulp of one pixel
    other = ClientData(3, nudged, y, empty_x, empty_y, empty_x, empty_y, train_is_synthetic=torch.zeros(6, dtype=torch.bool))
    assert data_digest([other])["client_03"] != digest["client_03"]
    flagged = ClientData(3, x, y, empty_x, empty_y, empty_x, empty_y, train_is_synthetic=torch.ones(6, dtype=torch.bool))
    assert data_digest([flagged])["client_03"] != digest["client_03"]


def test_extra_fingerprint_entries_are_checked(federation):
    saved: list[bytes] = []
    _run(federation, "fedavg", checkpoint_every=2, on_checkpoint=lambda c: saved.append(serialize_checkpoint(c)),
         fingerprint_extra={"dataset": "breastmnist"})  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=r"extra\.dataset: checkpoint 'breastmnist', now 'pneumoniamnist'"):
        _run(federation, "fedavg", resume_from=deserialize_checkpoint(saved[0]), fingerprint_extra={"dataset": "pneumoniamnist"})


def test_bad_checkpoint_arguments_and_files_are_refused(federation):
    with pytest.raises(ConfigurationError, match="on_checkpoint"):
        _run(federation, "fedavg", checkpoint_every=1)
    with pytest.raises(ConfigurationError, match="checkpoint_every must be an integer >= 0"):
        _run(federation, "fedavg", checkpoint_every=-1, on_checkpoint=print)
    with pytest.raises(CheckpointError, match="not a sealed fedmic_pipeline checkpoint"):
        deserialize_checkpoint(b"not a checkpoint")
    sealed = serialize_checkpoint({"weights": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="cannot be read"):  # the seal holds, the body is no torch file
        header = sealed[: sealed.index(b"\n") + 1]
        body = b"junk"
        deserialize_checkpoint(header + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(CheckpointError, match="not a fedmic_pipeline training checkpoint"):
        deserialize_checkpoint(serialize_checkpoint({"weights": torch.zeros(2)}))
    checkpoint = _checkpoint_after_round_2(federation)
    with pytest.raises(CheckpointError, match="format"):
        _run(federation, "fedavg", resume_from={**checkpoint, "format": 0})


def test_a_completed_run_checkpoints_only_between_rounds(federation):
    rounds = []
    _run(federation, "fedavg", checkpoint_every=1, on_checkpoint=lambda c: rounds.append(c["rounds_completed"]))
    assert rounds == [1, 2, 3]


# ---- the Kedro node: file, atomic write, removal, resume flag -------------------------


def _node_params(checkpoint_dir: Path, **training):
    params = yaml.safe_load((ROOT / "conf/base/parameters_federated_training.yml").read_text())
    params["training"].update(
        {"algorithm": "fedavg", "num_rounds": 2, "join_ratio": 0.5, "num_threads": 1, "device": "cpu", "seed": 5,
         "checkpoint_dir": str(checkpoint_dir), "checkpoint_every": 1, **training}
    )  # fmt: skip
    params["algorithm_params"]["common"].update({"batch_size": 16})
    return params


@pytest.fixture(scope="module")
def node_inputs():
    clients, global_test, info, manifest = small_federation(num_clients=4, n_train=300, n_val=60, n_test=60)
    return clients, manifest, info


def test_checkpoint_outlives_the_training_node_and_a_missing_one_is_refused(node_inputs, tmp_path, caplog):
    """The training node keeps its checkpoint (Kedro has not saved the outputs yet when it
    returns); the downstream `discard_checkpoint` removes it."""
    from fedmic_pipeline.pipelines.federated_training.nodes import discard_checkpoint, train_federated

    clients, manifest, info = node_inputs
    params = _node_params(tmp_path / "ckpt")
    models, _, _, summary = train_federated(clients, manifest, info, params["training"], params["algorithm_params"])
    assert [path.name for path in (tmp_path / "ckpt").iterdir()] == ["fedavg-seed5.pt"]  # no stray temp file
    with caplog.at_level("INFO"):
        discard_checkpoint(models, summary, params["training"])
    assert "removed its checkpoint" in caplog.text
    assert list((tmp_path / "ckpt").iterdir()) == []

    params = _node_params(tmp_path / "ckpt", resume=True)
    with pytest.raises(ConfigurationError, match="no checkpoint at .*fedavg-seed5.pt"):
        train_federated(clients, manifest, info, params["training"], params["algorithm_params"])
    params = _node_params(tmp_path / "ckpt", resume="auto")  # auto: nothing to resume, start afresh
    _, history, _, _ = train_federated(clients, manifest, info, params["training"], params["algorithm_params"])
    assert len(history) == 2
    params = _node_params(tmp_path / "ckpt", resume="maybe")
    with pytest.raises(ConfigurationError, match="training.resume must be true, false or auto"):
        train_federated(clients, manifest, info, params["training"], params["algorithm_params"])


# ---- end to end: `kedro run` killed mid-run, then `kedro run --params training.resume=true`


def _kedro_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(KEDRO_DISABLE_TELEMETRY="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1",
               MPLBACKEND="Agg", MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")  # fmt: skip
    return env


def _without_timing(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=[c for c in TIMING_KEYS if c in history.columns])


@pytest.mark.slow
def test_kedro_run_killed_mid_run_resumes_to_the_same_history(project_root, tmp_path, monkeypatch):
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    rounds = 12  # the kill lands after round 1: far from the end, so the run never completes first
    project = make_project(tmp_path)
    params = yaml.safe_load((project / "conf/base/parameters_federated_training.yml").read_text())
    params["training"].update({"algorithm": "fedavg", "num_rounds": rounds, "num_threads": 1, "device": "cpu"})
    params["algorithm_params"]["common"].update({"batch_size": 16})
    write_training_params(project, params)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(project)
    bootstrap_project(project)

    def run(runtime_params=None):
        """One in-process `kedro run`; runtime params nested, as `--params a.b=c` makes them."""
        try:
            with KedroSession.create(project_path=project, runtime_params=runtime_params) as session:
                session.run(pipeline_names=["federated_training"])
        finally:  # in-process sessions: kedro-mlflow re-opens the run per node and closes it once
            while mlflow.active_run() is not None:
                mlflow.end_run()
        return pd.read_csv(project / "data/07_model_output/training_history.csv")

    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["data_partition"])
    uninterrupted = run()
    checkpoint = project / "data/06_checkpoints" / f"fedavg-seed{params['training']['seed']}.pt"
    assert not checkpoint.exists()  # removed on completion

    started = time.perf_counter()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "kedro"), "run", "--pipelines", "federated_training"],
        cwd=project, env=_kedro_env(tracking_uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        while not checkpoint.exists():
            assert process.poll() is None, f"kedro run ended before writing a checkpoint: {process.stderr.read().decode()[-3000:]}"
            assert time.perf_counter() - started < 300, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # no cleanup, no finally blocks: a real crash
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = deserialize_checkpoint(checkpoint.read_bytes())["rounds_completed"]
    assert 1 <= done < rounds

    # Other parameters: refused before any round, naming the difference; the checkpoint stays.
    with pytest.raises(CheckpointMismatchError, match=r"algorithm\.lr"):
        run({"training": {"resume": True}, "algorithm_params": {"common": {"lr": 0.02}}})
    assert checkpoint.exists()

    resumed = run({"training": {"resume": True}})
    assert not checkpoint.exists()
    assert len(resumed) == rounds
    pd.testing.assert_frame_equal(_without_timing(resumed), _without_timing(uninterrupted), check_exact=True)
    assert math.isfinite(float(resumed["global_val_balanced_accuracy"].iloc[-1]))
