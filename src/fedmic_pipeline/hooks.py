"""Kedro hooks: parameters checked before any node runs, a log file, one-paragraph input errors.

``RunGuard`` does three things for every ``kedro run`` (registered in ``settings.py``):

* before the first node, it checks every parameter block the pipeline reads
  (``configuration.validate_parameters``), so a typo such as ``training.num_round=1`` stops
  the run instead of running the default 20 rounds;
* it writes the run's log to ``logs/info.log`` under the project. Kedro applies
  ``conf/logging.yml`` when it is imported, before any project code, and a file handler
  declared there would fail every run of a checkout without a ``logs/`` folder; the hook
  creates the folder and attaches the handler for the length of the run;
* ``StageTimer`` (a second hook) logs each node's wall time and, at the end of the run, the
  time of every stage (the nodes of one registered pipeline, Kedro's start-up excluded): the cost of
  a stage inside `make run` is read there, not from a stand-alone run's wall clock;
* when the run fails on an input error (a parameter, a missing or damaged input file:
  ``INPUT_ERRORS``), the traceback goes to the log file only and the terminal gets one
  paragraph: the error, the node it stopped in and where the traceback is. Kedro re-raises
  the error out of the CLI, where Python's last stop is ``sys.excepthook`` (rich's, which
  prints 40 lines and more); the hook replaces it for that one error. Any other failure is
  a bug and keeps its full traceback on the terminal (and in the log file). The exit code
  stays 1.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import TracebackType
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from kedro.pipeline import Pipeline
from kedro.pipeline.node import Node

from fedmic_pipeline.configuration import PARAMETER_ERRORS, blocks_read_by, validate_parameters
from fedmic_pipeline.datasets.corrupt import CorruptFileError
from fedmic_pipeline.flower.task import FlowerConfigError
from fedmic_pipeline.partitioning import PartitionInputError

__all__ = ["INPUT_ERRORS", "LOG_FILE", "RunGuard", "StageTimer"]

#: Errors caused by what the user gave (parameters, input files), each raised with a message
#: that names the fix: the user needs that message, not the stack that led to it.
INPUT_ERRORS: tuple[type[Exception], ...] = (*PARAMETER_ERRORS, PartitionInputError, FlowerConfigError, CorruptFileError)
#: The run's log, relative to the project root (git-ignored).
LOG_FILE = Path("logs/info.log")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_MAX_BYTES = 10 * 1024 * 1024
_LOG_BACKUPS = 3

logger = logging.getLogger(__name__)
#: Records only the log file receives: the tracebacks of failed runs.
_traceback_log = logging.getLogger("fedmic_pipeline.run_errors")
_traceback_log.propagate = False


class RunGuard:
    """The hooks of the module docstring; one instance serves every run of the process."""

    def __init__(self) -> None:
        self._log_handler: logging.Handler | None = None
        self._failed_nodes: dict[int, str] = {}

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: CatalogProtocol) -> None:
        """Open the log file, then check the pipeline's parameter blocks (before any other
        plugin starts work, e.g. an MLflow run)."""
        self._attach_log_file(Path(run_params.get("project_path") or Path.cwd()))
        try:
            validate_parameters(catalog.load("parameters"), blocks_read_by(pipeline.inputs()))
        except Exception as error:
            self._report(error, "before the first node ran (the parameter check)")
            self._detach_log_file()
            raise

    @hook_impl
    def on_node_error(self, error: Exception, node: Node) -> None:
        self._failed_nodes[id(error)] = node.name

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: Exception) -> None:
        """After the other plugins' error hooks, so that what they log reaches the file too."""
        node = self._failed_nodes.pop(id(error), None)
        self._report(error, f"in node `{node}`" if node else "in the pipeline")
        self._failed_nodes.clear()
        self._detach_log_file()

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._detach_log_file()

    def _report(self, error: BaseException, where: str) -> None:
        """Every failure's traceback goes to the log file; an input error's paragraph replaces
        its traceback on the terminal (if it ends the process), a bug keeps the traceback."""
        if self._log_handler is None:
            return  # no log file to hold the traceback: the terminal keeps it
        log_path = Path(getattr(self._log_handler, "baseFilename", LOG_FILE))
        message = " ".join(str(error).split())
        paragraph = f"{type(error).__name__} {where}: {message} (Full traceback: {log_path}.)"
        _traceback_log.error("%s", paragraph, exc_info=error)
        if isinstance(error, INPUT_ERRORS):
            _print_instead_of_traceback(error, paragraph)

    def _attach_log_file(self, project_path: Path) -> None:
        self._detach_log_file()
        path = project_path / LOG_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=_LOG_MAX_BYTES, backupCount=_LOG_BACKUPS, encoding="utf-8"
            )
        except OSError as exc:  # a read-only checkout still runs, with the console log only
            logger.warning("No log file (%s): %s", path, exc)
            return
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        _traceback_log.addHandler(handler)
        self._log_handler = handler

    def _detach_log_file(self) -> None:
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            _traceback_log.removeHandler(handler)
            handler.close()


class _ParagraphExcepthook:
    """``sys.excepthook`` printing one error's paragraph in place of its traceback; any other
    uncaught error goes to the hook it replaced. It holds only the latest input error, so a
    process running many sessions (the tests) keeps one error alive, not a chain of them."""

    def __init__(self, error: BaseException, paragraph: str, fallback: Any) -> None:
        self.error, self.paragraph, self.fallback = error, paragraph, fallback

    def __call__(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if value is self.error:
            print(self.paragraph, file=sys.stderr)
        else:
            self.fallback(kind, value, tb)


class StageTimer:
    """Wall time per node and per stage (the registered pipeline a node belongs to, first in
    registry order) of a sequential run, in the log."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._stages: dict[str, float] = defaultdict(float)
        self._stage_of: dict[str, str] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        from kedro.framework.project import pipelines  # the project's registry, loaded by now

        self._started.clear()
        self._stages.clear()
        self._stage_of = {}
        for name, registered in pipelines.items():
            if name != "__default__":
                for node in registered.nodes:
                    self._stage_of.setdefault(node.name, name)

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        seconds = time.perf_counter() - self._started.pop(node.name, time.perf_counter())
        self._stages[self._stage_of.get(node.name, "other")] += seconds
        logger.info("node %s: %.1f s", node.name, seconds)

    @hook_impl
    def after_pipeline_run(self) -> None:
        if self._stages:
            logger.info("time by stage (its nodes' wall time): %s", ", ".join(f"{tag} {s:.1f} s" for tag, s in sorted(self._stages.items())))


def _print_instead_of_traceback(error: BaseException, paragraph: str) -> None:
    current = sys.excepthook
    fallback = current.fallback if isinstance(current, _ParagraphExcepthook) else current
    sys.excepthook = _ParagraphExcepthook(error, paragraph, fallback)
