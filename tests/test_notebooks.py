"""The notebooks: committed without outputs, and executable end to end with papermill.

The slow test builds a tiny project (synthetic 3-class data, 10 hospitals, 2 rounds),
runs the real pipelines twice (FedAvg, then FedMIC with a small teacher) into a SQLite
MLflow store in the temp folder, then executes both notebooks against that project and
store with papermill, on a kernelspec that points at this very interpreter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from fixtures_pipelines import PROJECT_ROOT, make_project, training_params, write_training_params

ROOT = PROJECT_ROOT
NOTEBOOKS = {
    "01_partitions.ipynb": {"project_dir", "lambdas", "examples_per_client"},
    "02_compare_methods.ipynb": {"tracking_uri", "experiment_name", "max_runs"},
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell(name):
    """Outputs bloat diffs and leak data: strip them with
    `jupyter nbconvert --clear-output --inplace notebooks/*.ipynb` (docs/experiments.md)."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, f"{name}: cells {dirty} hold outputs or execution counts; run nbconvert --clear-output"
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: papermill needs exactly one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line and not line.startswith("#")}
    assert names == NOTEBOOKS[name]
    assert nb.metadata["kernelspec"]["name"] == "python3"


def _images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def _end_active_runs(mlflow) -> None:
    """In-process sessions only: kedro-mlflow 2.0.3 re-opens the run before every node
    (`run.nested: true` in conf/base/mlflow.yml stacks it) and closes it once, so the run
    stays active and the next session would log into it. A `kedro run` process exits."""
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny project with one FedAvg and one FedMIC run (trained and evaluated) in MLflow."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    tmp = tmp_path_factory.mktemp("notebooks")
    project = make_project(tmp)
    params = training_params(algorithm="fedavg")
    params["evaluation"]["n_bootstrap"] = 20
    write_training_params(project, params)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.chdir(project)
        bootstrap_project(project)
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=["data_partition", "federated_training", "evaluation"])
        _end_active_runs(mlflow)
        # Runtime params are nested, as `kedro run --params training.algorithm=fedmic` makes them.
        with KedroSession.create(project_path=project, runtime_params={"training": {"algorithm": "fedmic"}}) as session:
            session.run(pipeline_names=["federated_training", "evaluation"])
        _end_active_runs(mlflow)
    return project, tracking_uri


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec in a temp JUPYTER_PATH that starts this interpreter (the venv's)."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / "fedmic-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "fedmic-pipeline test kernel",
                "language": "python",
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(jupyter))
        mp.setenv("MPLBACKEND", "Agg")
        yield "fedmic-test"


def _execute(name: str, out: Path, kernel: str, cwd: Path, **parameters):
    import papermill

    papermill.execute_notebook(
        str(ROOT / "notebooks" / name), str(out), parameters=parameters, kernel_name=kernel, cwd=str(cwd), progress_bar=False
    )
    return nbformat.read(out, as_version=4)


@pytest.mark.slow
def test_partitions_notebook_runs_on_a_tiny_project(tiny_runs, kernel_name, tmp_path):
    project, _ = tiny_runs
    nb = _execute(
        "01_partitions.ipynb", tmp_path / "01.ipynb", kernel_name, tmp_path,
        project_dir=str(project), lambdas=[0.1, 0.3, 0.5], examples_per_client=3,
    )  # fmt: skip
    # class x client and device x client as drawn, one bubble chart per lambda, the
    # device renderings and the per-hospital examples
    assert _images(nb) == 2 + 3 + 1 + 1
    text = _text(nb)
    assert "synthetic" in text and "client_09" in text and "mean label entropy" in text


@pytest.mark.slow
def test_compare_notebook_reads_both_runs_from_mlflow(tiny_runs, kernel_name, tmp_path):
    _, tracking_uri = tiny_runs
    nb = _execute("02_compare_methods.ipynb", tmp_path / "02.ipynb", kernel_name, tmp_path, tracking_uri=tracking_uri)
    assert _images(nb) == 2  # accuracy per round, accuracy vs MB uploaded
    text = _text(nb)
    assert "2 run(s)" in text
    assert "fedavg" in text and "fedmic" in text and "MB uploaded" in text


@pytest.mark.slow
def test_compare_notebook_names_a_missing_experiment(tiny_runs, kernel_name, tmp_path):
    import papermill

    _, tracking_uri = tiny_runs
    with pytest.raises(papermill.PapermillExecutionError, match="No MLflow experiment 'nope'"):
        _execute("02_compare_methods.ipynb", tmp_path / "02.ipynb", kernel_name, tmp_path,
                 tracking_uri=tracking_uri, experiment_name="nope")  # fmt: skip
