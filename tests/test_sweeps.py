"""A hyper-parameter sweep with DVC experiments, as docs/experiments.md tells users to run it.

In a clean copy of the repository (the files git would commit, in a fresh git repo) the
test shrinks the defaults to BreastMNIST (780 images), 4 hospitals, 1 round, records the
data stages as the baseline commit, queues two experiments that differ only in
``training.algorithm`` (``dvc exp run --queue -S ...``), runs the queue
(``dvc exp run --run-all -j 1``, what ``dvc queue start -j 1`` does in the background)
and reads the comparison back with ``dvc exp show --json`` and ``--md``: both experiments,
each with its parameters and the metrics of data/08_reporting/evaluation/metrics.json.

DVC keeps an output declared ``cache: false`` (metrics, plots, small reports) in *git*:
that is how an experiment commit carries its metrics.json, and how a queued experiment
(run in a fresh temp copy of the commit) sees that the data stages are up to date. The
repository's .gitignore ignores all of data/02..08, so
``test_outputs_with_cache_false_are_not_git_ignored`` names the lines .gitignore needs;
the sweep test adds exactly those lines in its clone (a no-op once .gitignore has them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

TRAINING = "conf/base/parameters_federated_training.yml"
METRICS = "data/08_reporting/evaluation/metrics.json"
EXPERIMENTS = {"sweep-fedavg": "fedavg", "sweep-fedprox": "fedprox"}
#: `dvc exp show --keep` regex of docs/experiments.md (with `--drop '.*'`).
SHOW_COLUMNS = (
    r"Experiment|training\.algorithm|training\.seed|^global\.accuracy$|^global\.macro_auc$"
    r"|^personalized\.mean\.accuracy$|^communication\.mb_up_total$"
)


def cache_false_outputs(dvc_yaml: Path) -> list[str]:
    """Every outs/metrics/plots path of dvc.yaml declared with `cache: false`."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    (path, options), = entry.items()
                    if (options or {}).get("cache") is False:
                        found.append(path)
    return found


def gitignore_negations(paths: list[str]) -> list[str]:
    """.gitignore lines re-including `paths` under `data/0[2-8]_*/**` (each parent folder
    below the layer folder, then the file: git cannot re-include a file in an ignored folder)."""
    lines: list[str] = []
    for path in paths:
        parts = path.split("/")
        for depth in range(3, len(parts)):  # data/<layer>/<sub>/ ... are matched by `**`
            folder = "!" + "/".join(parts[:depth]) + "/"
            if folder not in lines:
                lines.append(folder)
        lines.append("!" + path)
    return lines


def _git_ignored(repo: Path, paths: list[str]) -> list[str]:
    result = subprocess.run(["git", "check-ignore", *paths], cwd=repo, capture_output=True, text=True)
    return result.stdout.split()


def test_outputs_with_cache_false_are_not_git_ignored(project_root: Path) -> None:
    """Without this, `dvc exp show` reports FileNotFoundError for metrics.json in every
    experiment, and queued experiments rerun ingest and partition every time."""
    ignored = _git_ignored(project_root, cache_false_outputs(project_root / "dvc.yaml"))
    assert not ignored, (
        "dvc.yaml declares these outputs `cache: false` (versioned by git) but .gitignore ignores them:\n  "
        + "\n  ".join(ignored)
        + "\nAppend to .gitignore, after `data/0[2-8]_*/**`:\n"
        + "\n".join(gitignore_negations(ignored))
    )


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        KEDRO_DISABLE_TELEMETRY="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1",
        MPLBACKEND="Agg", OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
    )  # fmt: skip
    return env


def _clone_working_tree(project_root: Path, target: Path) -> Path:
    """The files `git add -A` would commit (tracked plus new, not ignored), in a fresh repo.

    Unlike a `git clone`, uncommitted edits are included, so the sweep tests this working tree.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=project_root, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = project_root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target


def _commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], cwd=repo, check=True)


def _update_yaml(path: Path, changes: dict[str, Any]) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _dvc(repo: Path, env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"dvc {' '.join(args)}: {time.perf_counter() - started:.1f}s")
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every revision entry of `dvc exp show --json` (baseline and experiments, any nesting)."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "rev" in node:
            yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.slow
def test_dvc_experiment_sweep_compares_two_methods(project_root: Path, tmp_path: Path) -> None:
    repo = _clone_working_tree(project_root, tmp_path / "repo")
    env = _env(tmp_path)
    ignored = _git_ignored(repo, cache_false_outputs(repo / "dvc.yaml"))
    if ignored:  # see the module docstring; the fast test above reports it
        with (repo / ".gitignore").open("a") as handle:
            handle.write("\n".join(["", *gitignore_negations(ignored), ""]))
        assert not _git_ignored(repo, ignored)
    _update_yaml(repo / "conf/base/parameters_data_ingestion.yml", {"dataset.name": "breastmnist"})
    _update_yaml(repo / "conf/base/parameters_data_partition.yml", {"partition.num_clients": 4})
    _update_yaml(
        repo / TRAINING,
        {
            "training.num_rounds": 1, "training.num_threads": 1, "training.device": "cpu",
            "algorithm_params.common.batch_size": 16, "evaluation.n_bootstrap": 20,
        },
    )  # fmt: skip
    _commit(repo, "tiny sweep settings")

    # The data stages once, as the baseline every experiment starts from.
    _dvc(repo, env, "repro", "partition")
    _commit(repo, "baseline: breastmnist partition")

    for name, algorithm in EXPERIMENTS.items():
        _dvc(repo, env, "exp", "run", "--queue", "-n", name, "-S", f"{TRAINING}:training.algorithm={algorithm}", "evaluate")
    _dvc(repo, env, "exp", "run", "--run-all", "-j", "1")

    shown = json.loads(_dvc(repo, env, "exp", "show", "--json").stdout)
    found: dict[str, dict[str, Any]] = {}
    for entry in _walk(shown):
        if entry.get("name") in EXPERIMENTS:
            found[entry["name"]] = entry["data"]
    assert set(found) == set(EXPERIMENTS), json.dumps(shown, indent=1)[:4000]
    for name, data in found.items():
        params = data["params"][TRAINING]["data"]
        assert params["training"]["algorithm"] == EXPERIMENTS[name]
        metrics = data["metrics"][METRICS]["data"]
        assert metrics["algorithm"] == EXPERIMENTS[name]
        assert 0.0 <= metrics["global.accuracy"] <= 1.0
        assert metrics["communication.mb_up_total"] > 0
    # FedProx uploads exactly what FedAvg does; only the local objective differs.
    assert (
        found["sweep-fedavg"]["metrics"][METRICS]["data"]["communication.mb_up_total"]
        == found["sweep-fedprox"]["metrics"][METRICS]["data"]["communication.mb_up_total"]
    )

    # The comparison table of docs/experiments.md: experiment, parameters swept, headline metrics.
    table = _dvc(repo, env, "exp", "show", "--md", "--drop", ".*", "--keep", SHOW_COLUMNS).stdout
    header = table.splitlines()[0]
    for column in ("training.algorithm", "global.accuracy", "personalized.mean.accuracy", "communication.mb_up_total"):
        assert column in header, table
    assert all(name in table for name in EXPERIMENTS), table


def test_grid_clock_estimates_the_time_left_from_trained_runs_only() -> None:
    from fedmic_pipeline.sweeps import GridClock

    clock = GridClock(4)
    cached = clock.tick()  # a cache hit: no cost measured yet, so no estimate
    assert cached.startswith("1/4, ") and "left" not in cached
    line = clock.tick(trained_s=120.0)  # one trained run of 2 min, two runs to go
    assert line.startswith("2/4, ") and line.endswith("about 4 min left")
    clock.tick(trained_s=60.0)
    assert clock.tick().endswith("min in all")
