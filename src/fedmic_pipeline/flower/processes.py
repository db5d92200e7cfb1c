"""The processes of a loopback deployment: each started logged, in a process group of its
own, and every one of them gone after ``stop()``.

Why more than ``Popen`` and ``kill``: a SuperNode's SuperExec and ClientApps join its
process group, so signalling the group reaches them; but Flower starts the SuperLink's
SuperExec in a session of its own (and that one's ServerApp children with it), which no
process group of ours contains. ``DeploymentProcesses`` therefore also finds processes by
an environment variable that only this deployment sets (its private ``FLWR_HOME``), and
``stop()`` checks with psutil that nothing it started, nor any descendant, is left.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DeploymentProcesses", "Process", "log_tail"]

logger = logging.getLogger(__name__)


@dataclass
class Process:
    """One started process, its log and the descendants seen so far (they may outlive it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    descendants: set[int] = field(default_factory=set)


class DeploymentProcesses:
    """Starts, tracks and tears down the processes of one deployment.

    ``env`` is the environment every process gets (the mapping itself: later changes to it
    reach later processes); ``marker`` = (name, value) of the environment variable by which
    processes started outside our process groups are recognised as ours."""

    def __init__(self, cwd: Path, env: Mapping[str, str], logs_dir: Path, marker: tuple[str, str]) -> None:
        self.cwd, self.env, self.logs_dir, self.marker = cwd, env, logs_dir, marker
        self._started: list[Process] = []

    def __bool__(self) -> bool:
        return bool(self._started)

    def spawn(self, name: str, argv: list[str], *, append_log: bool = True) -> Process:
        """Start ``argv`` in a new session (its own process group), output to
        ``<logs_dir>/<name>.log`` (appended to, or truncated with ``append_log=False``)."""
        log_path = self.logs_dir / f"{name}.log"
        handle = log_path.open("ab" if append_log else "wb")
        try:
            popen = subprocess.Popen(  # noqa: S603 - fixed argv, our own executables
                argv,
                cwd=self.cwd,
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches SuperExec and app children
            )
        finally:
            handle.close()
        proc = Process(name, popen, log_path)
        self._started.append(proc)
        logger.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return proc

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> None:
        """Signal ``proc``'s whole process group, remembering its descendants first."""
        self._remember_descendants(proc)
        _killpg(proc.popen.pid, sig)

    def pids(self) -> set[int]:
        """Every pid started here or seen as a descendant (for leak checks)."""
        for proc in self._started:
            self._remember_descendants(proc)
        return {p.popen.pid for p in self._started} | {d for p in self._started for d in p.descendants}

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every process group (the last started first), SIGKILL whatever is left
        after ``grace`` s, and wait until none of the deployment's processes runs."""
        import psutil

        if not self._started:
            return
        tracked = self._tracked()
        for proc in reversed(self._started):  # nodes before the SuperLink
            if proc.popen.poll() is None:
                _killpg(proc.popen.pid, signal.SIGTERM)
        psutil.wait_procs(tracked, timeout=grace)
        for _ in range(3):
            for proc in self._started:
                _killpg(proc.popen.pid, signal.SIGKILL)  # also children left in the groups
            alive = self._tracked()
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            if alive:
                logger.info("killed %d processes outside the process groups: %s", len(alive), [p.pid for p in alive])
            psutil.wait_procs(alive, timeout=5)
            if not [p for p in alive if _alive(p)]:
                break
        for proc in self._started:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                logger.error("%s (pid %d) survived SIGKILL", proc.name, proc.popen.pid)
        self._started.clear()

    def _remember_descendants(self, proc: Process) -> None:
        import psutil

        try:
            proc.descendants.update(c.pid for c in psutil.Process(proc.popen.pid).children(recursive=True))
        except psutil.Error:
            pass

    def _tracked(self) -> list[Any]:
        """Live psutil handles of the deployment: the processes started here, their
        descendants, and any process whose environment carries the marker."""
        import psutil

        found: dict[int, Any] = {}
        for pid in self.pids():
            try:
                found[pid] = psutil.Process(pid)
            except psutil.Error:
                continue
        name, value = self.marker
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in found:
                continue
            try:
                if proc.environ().get(name) == value:
                    found[proc.pid] = proc
            except psutil.Error:  # gone, or another user's process
                continue
        return [p for p in found.values() if _alive(p)]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log ("" when it cannot be read), for error messages."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
