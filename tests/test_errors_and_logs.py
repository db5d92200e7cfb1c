"""What a user sees when `kedro run` fails on their input, and what the log file keeps.

Real `kedro run` subprocesses in throw-away projects: a misspelt parameter stops the run
before the first node, an infeasible partition stops it in a node; each time the terminal
gets one paragraph (the error, where it stopped, the log file), the exit code is non-zero,
and `logs/info.log` holds the run's log lines and the full traceback.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures_medmnist import kedro_env
from fixtures_pipelines import make_project

KEDRO = Path(sys.executable).with_name("kedro")


def _kedro_run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KEDRO), "run", *args], cwd=project, env=kedro_env(), capture_output=True, text=True, timeout=300, check=False
    )


def _paragraph(stderr: str, error_name: str) -> str:
    """The one line of stderr that reports ``error_name``; the rest is other libraries' own log lines."""
    reports = [line for line in stderr.splitlines() if line.startswith(error_name)]
    assert len(reports) == 1, stderr[-3000:]
    return reports[0]


def _assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "╭" not in stderr, stderr[-3000:]
    assert len(stderr.splitlines()) < 10, stderr[-3000:]


def test_a_misspelt_parameter_stops_the_run_before_any_node_with_one_paragraph(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    run = _kedro_run(project, "--params", "training.num_round=1")

    assert run.returncode != 0
    paragraph = _paragraph(run.stderr, "ConfigurationError")
    assert "['num_round']" in paragraph and "num_rounds" in paragraph and "before the first node ran" in paragraph
    assert "conf/base/parameters_federated_training.yml" in paragraph and "logs/info.log" in paragraph
    _assert_no_traceback(run.stderr)
    log = (project / "logs/info.log").read_text()
    assert "Traceback (most recent call last)" in log and "num_round" in log
    assert "Running node" not in log + run.stdout, "a node ran before the parameters were checked"


def test_an_input_error_in_a_node_names_the_node_and_keeps_the_traceback_in_the_log(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    run = _kedro_run(project, "--pipelines", "data_partition", "--params", "partition.min_samples_per_client=400")

    assert run.returncode != 0
    paragraph = _paragraph(run.stderr, "PartitionError")
    assert "in node `build_partition_plan`" in paragraph and "min_samples_per_client=400" in paragraph
    _assert_no_traceback(run.stderr)
    log = (project / "logs/info.log").read_text()
    assert "Running node: build_partition_plan" in log, "the run's own log lines belong in the file too"
    assert "Traceback (most recent call last)" in log and "PartitionError" in log


def test_the_log_folder_is_kept_and_its_files_are_git_ignored(project_root: Path) -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "logs/info.log"], cwd=project_root, check=False)
    kept = subprocess.run(["git", "check-ignore", "-q", "logs/.gitkeep"], cwd=project_root, check=False)
    assert ignored.returncode == 0, "logs/info.log would be committed"
    assert kept.returncode == 1, "logs/.gitkeep must stay tracked (the Docker image and a clean clone have logs/)"


def test_the_rich_progress_bar_and_the_rich_log_handler_share_one_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """conf/logging.yml's console handler is rich's: a log line written while the rich bar is
    live goes through the bar's console, which prints it whole above the bar."""
    import rich
    import yaml
    from kedro.logging import RichHandler
    from rich.console import Console

    from fedmic_pipeline.core.callbacks import ProgressBar

    project_root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((project_root / "conf/logging.yml").read_text())
    assert config["root"]["handlers"] == ["rich"] and config["handlers"]["rich"]["class"] == "kedro.logging.RichHandler"

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(rich, "_console", console)
    handler = RichHandler(show_time=False, show_path=False)
    assert handler.console is console
    log = logging.getLogger("fedmic_pipeline.test_progress")
    log.addHandler(handler)
    log.propagate = False
    try:
        engine = SimpleNamespace(config=SimpleNamespace(num_rounds=2), algorithm=SimpleNamespace(name="fedavg"))
        bar = ProgressBar("rich")
        bar.on_train_begin(engine, SimpleNamespace(rounds_completed=0))
        log.warning("round 1 of 2 is done")
        record = {"train_loss": 0.5, "train_accuracy": 0.8, "global_val_balanced_accuracy": 0.7}
        bar.after_round(engine, SimpleNamespace(), record)
        bar.on_train_end(engine, SimpleNamespace(), "completed")
    finally:
        log.removeHandler(handler)
    # The live display erases its bar (ESC[2K), prints the log line, then redraws the bar below it.
    segments = [" ".join(part.split()) for part in re.split(r"\x1b\[2K|\r|\n", screen.getvalue())]
    assert "WARNING round 1 of 2 is done" in segments, screen.getvalue()
