"""A real Flower deployment on loopback: one SuperLink, N SuperNodes, ``flwr run``, teardown.

    python -m fedmic_pipeline.flower.launch --nodes 4 --rounds 2 --algorithm fedmic \\
        --algorithm-params '{"teacher_width": 0.125}' --run-config "join-ratio=0.5 seed=7"

What it does (``LoopbackFederation``):

* picks free ports on 127.0.0.1 and writes a private ``$FLWR_HOME/config.toml`` with a
  SuperLink connection ``loopback`` (Flower 1.41 reads connections from there, not from
  pyproject.toml), so nothing touches ``~/.flwr``;
* secures it the way a hospital's IT would ask, by default (``--insecure`` opts out):
  TLS with a private CA and SuperNode authentication (``certificates``; made in
  ``<work-dir>/certs`` unless ``--certs-dir`` names a set). The SuperLink runs
  ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile
  --enable-supernode-auth``; each SuperNode's public key is registered with ``flwr
  supernode register`` before the node starts with ``--root-certificates ca.crt
  --auth-supernode-private-key``; the ``flwr`` CLI verifies the SuperLink with
  ``root-certificates`` in config.toml;
* starts the SuperLink with ``--disable-runtime-dependency-installation`` and N
  SuperNodes with ``--node-config "partition-id=i num-partitions=N data-dir='...'"``,
  each through ``site_supernode`` with an approved-apps file of its own
  (``<work-dir>/sites/site-<i>/``) that holds the hash of the app about to run, so a
  node refuses any other app version; each process runs in its own process group
  (their SuperExec and ClientApp/ServerApp children join it), with telemetry, update
  checks and runtime dependency installation (``uv sync``) disabled in the environment;
* by default starts each ClientApp from a warm process: every SuperNode runs with
  ``--isolation process`` beside a ``warm_superexec`` that has imported torch and the core
  and loaded the node's partition once, and forks per message (Flower's default starts a
  new ``flwr-clientapp`` interpreter per message; ``--cold-clientapps`` keeps that), and
  the SuperNodes poll the SuperLink every 0.2 s instead of Flower's 3 s when idle
  (``site_supernode --max-poll-wait-s``); see ``docs/results/flower_rounds.md``;
* runs ``flwr run <app-dir> loopback --run-config ... --stream`` (blocks until the run
  ends) and reads the ServerApp's ``flower_summary.json`` and each site's decision log,
  adding each site's decision and approved app hash to the summary (``sites``);
  ``<app-dir>`` holds only a pyproject.toml with the project's ``[tool.flwr]`` tables
  (see ``prepare_app_dir``);
* tears everything down -- on success, on error and on Ctrl-C/SIGTERM -- by signalling
  the process groups (SIGTERM, then SIGKILL) and checking with psutil that no process it
  started (or any descendant) is left (``processes.DeploymentProcesses``).

Logs of every process are in ``<work-dir>/logs``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..telemetry import TELEMETRY_OFF
from . import task
from .certificates import CertificateError, FederationCredentials, create_credentials, create_node_key
from .processes import DeploymentProcesses, Process, log_tail
from .site_supernode import AppApprovalError, fab_sha256, write_approved_apps

__all__ = ["FlowerRunResult", "LoopbackFederation", "flower_env", "format_run_config", "main", "prepare_app_dir"]

logger = logging.getLogger(__name__)

CONNECTION = "loopback"
_QUIET_ENV = {
    **TELEMETRY_OFF,
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
    # SuperExec polls for ServerApp/ClientApp tasks every 1 s by default; a loopback
    # deployment can afford 10 polls a second (saves ~0.45 s per message hop)
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def prepare_app_dir(project_dir: Path, app_dir: Path) -> Path:
    """A minimal Flower app directory: the project's ``[project]`` metadata and
    ``[tool.flwr]`` tables in a pyproject.toml of its own.

    ``flwr run <dir>`` walks ``<dir>`` (``os.walk``, including ``.venv``) to build the
    FAB: ~9 s on this project's root for a FAB whose code the nodes never use -- they
    import ``fedmic_pipeline`` from their installed environment (runtime dependency
    installation is off). From this directory the FAB holds only pyproject.toml.
    """
    import tomllib

    import tomli_w

    with (project_dir / "pyproject.toml").open("rb") as handle:
        config = tomllib.load(handle)
    flwr_tables = config.get("tool", {}).get("flwr")
    if not flwr_tables or "app" not in flwr_tables:
        raise task.FlowerConfigError(f"{project_dir / 'pyproject.toml'} has no [tool.flwr.app] table.")
    project = {k: v for k, v in config["project"].items() if k in ("name", "version", "description", "license")}
    app = dict(flwr_tables["app"])
    # Flower refuses --run-config keys the app does not declare: declare every key the
    # ServerApp reads (task.RUN_CONFIG_DEFAULTS), pyproject's values first.
    app["config"] = {**task.RUN_CONFIG_DEFAULTS, **app.get("config", {})}
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        tomli_w.dumps({"project": project, "tool": {"flwr": {"app": app}}}), encoding="utf-8"
    )
    return app_dir


def flower_env(flwr_home: Path, project_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: quiet, no ``uv sync``, private FLWR_HOME."""
    env = dict(os.environ)
    env.update(_QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["FEDMIC_PROJECT_ROOT"] = str(project_dir)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # a TOML literal string: JSON and Windows paths need no escaping
    if '"' in text:
        raise ValueError(f"Run config value {text!r} holds both quote characters; Flower's parser cannot take it.")
    return json.dumps(text)


def format_run_config(values: Mapping[str, Any]) -> str:
    """``{"num-rounds": 2, "algorithm-params": '{"lr": 0.1}'}`` -> the ``--run-config``
    string ``num-rounds=2 algorithm-params='{"lr": 0.1}'``."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


@dataclass
class FlowerRunResult:
    """One ``flwr run``: exit code, Flower run id, wall time, output and the summary.

    ``app_sha256`` is the hash of the FAB submitted; ``site_decisions`` maps each
    SuperNode (index = partition id) to what its app check decided for this run,
    ``{"decision": "approved" | "refused", "app_sha256": ...}``, read from the site's own
    decision log (empty without app checks, e.g. under the Ray simulation).
    """

    returncode: int
    run_id: int | None
    wall_s: float
    output: str
    summary: dict[str, Any] | None
    output_dir: Path
    app_sha256: str | None = None
    site_decisions: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "no-summary" if self.summary is None else str(self.summary.get("status"))


class LoopbackFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (see the module docstring).

    Use as a context manager; ``stop()`` is idempotent and also runs on exceptions.
    ``node_configs`` optionally adds node-config entries per node (a mapping each).

    Security (see ``docs/flower_security.md``): TLS and SuperNode authentication
    unless ``insecure``; ``certs_dir`` names a set made by ``certificates`` (default: one
    made in ``<work_dir>/certs``). ``app_check`` starts the SuperNodes through
    ``site_supernode``; ``approve_app`` puts the hash of ``app_dir`` on every node's list
    (``False``: the lists stay empty and every run is refused).
    """

    def __init__(
        self,
        num_nodes: int,
        data_dir: Path | str,
        *,
        project_dir: Path | str | None = None,
        work_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        node_configs: list[Mapping[str, Any]] | None = None,
        startup_timeout: float = 60.0,
        simulation: bool = False,
        insecure: bool = False,
        certs_dir: Path | str | None = None,
        app_check: bool = True,
        approve_app: bool = True,
        warm_clientapps: bool = True,
        max_poll_wait_s: float | None = 0.2,
    ) -> None:
        if num_nodes < 1:
            raise task.FlowerConfigError(f"num_nodes must be >= 1, got {num_nodes}.")
        self.num_nodes = num_nodes
        self.project_dir = Path(project_dir).resolve() if project_dir else task.project_root()
        self.data_dir = task.resolve_path(data_dir, self.project_dir)
        self._own_work_dir = work_dir is None
        # absolute: the processes run in project_dir and get paths under work_dir
        self.work_dir = Path(work_dir).resolve() if work_dir else Path(tempfile.mkdtemp(prefix="fedmic-flower-"))
        self.logs_dir = self.work_dir / "logs"
        self.flwr_home = self.work_dir / "flwr_home"
        self.app_dir = self.work_dir / "app"
        self.env = flower_env(self.flwr_home, self.project_dir, env)
        self.node_configs = node_configs or [{} for _ in range(num_nodes)]
        self.startup_timeout = startup_timeout
        #: Ray simulation: the SuperLink runs ``num_nodes`` virtual SuperNodes itself
        #: (``flower-superlink --simulation``); no SuperNode processes are started.
        self.simulation = simulation
        self.insecure = insecure
        self.certs_dir = Path(certs_dir).resolve() if certs_dir else None
        self.credentials: FederationCredentials | None = None
        self.app_check = app_check and not simulation
        self.approve_app = approve_app
        self.sites_dir = self.work_dir / "sites"
        #: Start ClientApps from a warm, forked process per node (``warm_superexec``;
        #: SuperNodes run ``--isolation process``) instead of a new ``flwr-clientapp``
        #: interpreter per message (Flower's default).
        self.warm_clientapps = warm_clientapps and not simulation
        #: Cap on the SuperNodes' poll waits (``site_supernode --max-poll-wait-s``; Flower
        #: waits 3 s after an empty pull); only with the app check, None = Flower's.
        self.max_poll_wait_s = max_poll_wait_s
        if self.warm_clientapps:
            from .latency import PULL_BACKOFF_ENV

            # Flower retries a not-yet-pushed object after 1 s, 2 s, ...; on loopback 50 ms
            self.env.setdefault(PULL_BACKOFF_ENV, "0.05")
        self.processes = DeploymentProcesses(self.project_dir, self.env, self.logs_dir, ("FLWR_HOME", str(self.flwr_home)))
        self.node_executors: dict[int, Process] = {}
        self.app_sha256: str | None = None
        self.port = 0
        self.superlink: Process | None = None
        self.nodes: dict[int, Process] = {}
        self._run_numbers = itertools.count(1)  # thread-safe: runs may be started concurrently
        self._restart_numbers = itertools.count(1)
        self._started = False

    # -- processes ---------------------------------------------------------------------
    def _exe(self, name: str) -> str:
        candidate = Path(sys.executable).parent / name
        found = str(candidate) if candidate.exists() else shutil.which(name, path=self.env.get("PATH"))
        if not found:
            raise task.FlowerConfigError(f"'{name}' is not installed in this environment; pip install 'flwr[simulation]==1.41.0'.")
        return found

    def start(self) -> "LoopbackFederation":
        """Start the SuperLink and every SuperNode; returns when the SuperLink listens
        (and, with node authentication, every node's key is registered)."""
        if self._started:
            return self
        self._started = True
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        prepare_app_dir(self.project_dir, self.app_dir)
        if not self.insecure:
            self.credentials = self._credentials()
        if self.app_check:
            self.app_sha256 = fab_sha256(self.app_dir)
            for i in range(self.num_nodes):
                write_approved_apps(
                    self.site_paths(i)[0], [self.app_sha256] if self.approve_app else [],
                    note=f"written by the loopback launcher for {self.app_dir}",
                )  # fmt: skip
        self.port = free_port()
        tls = f'root-certificates = "{self.credentials.ca_cert.resolve()}"' if self.credentials else "insecure = true"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{tls}\n',
            encoding="utf-8",
        )
        t0 = time.perf_counter()
        self.superlink = self.processes.spawn(
            "superlink",
            [
                self._exe("flower-superlink"), *self._superlink_security_args(),
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port),
                *(["--simulation"] if self.simulation else []),
            ],
        )  # fmt: skip
        self._wait(lambda: _port_open(self.port), self.superlink, "the SuperLink to listen")
        if not self.simulation:
            if self.credentials:
                self.register_node_keys([public for _, public in self.credentials.node_keys])
            for i in range(self.num_nodes):
                self.start_node(i)
        logger.info(
            "SuperLink on 127.0.0.1:%d (%s) with %d %s started in %.1fs%s", self.port,
            "insecure" if self.insecure else "TLS, SuperNode authentication", self.num_nodes,
            "simulated SuperNodes (Ray)" if self.simulation else "SuperNodes", time.perf_counter() - t0,
            f"; app sha256 {self.app_sha256} {'approved' if self.approve_app else 'NOT approved'} on every node"
            if self.app_check else "",
        )  # fmt: skip
        return self

    def _credentials(self) -> FederationCredentials:
        """The given certificate set (checked), else the work dir's, made when absent."""
        if self.certs_dir is not None:
            return FederationCredentials.in_directory(self.certs_dir, self.num_nodes)
        directory = self.work_dir / "certs"
        try:
            return FederationCredentials.in_directory(directory, self.num_nodes)
        except CertificateError:
            return create_credentials(directory, self.num_nodes, force=True)

    def _superlink_security_args(self) -> list[str]:
        if self.credentials is None:
            return ["--insecure"]
        tls = [
            "--ssl-ca-certfile", str(self.credentials.ca_cert), "--ssl-certfile", str(self.credentials.server_cert),
            "--ssl-keyfile", str(self.credentials.server_key),
        ]  # fmt: skip
        return tls if self.simulation else [*tls, "--enable-supernode-auth"]

    def register_node_keys(self, public_keys: list[Path], timeout: float = 60.0) -> None:
        """``flwr supernode register <key> loopback`` for each key, side by side: only
        SuperNodes holding a registered key may join an authenticating SuperLink."""
        registrations = []
        for number, key in enumerate(public_keys):
            log_path = self.logs_dir / f"register-{Path(key).stem}.log"
            with log_path.open("wb") as handle:
                popen = subprocess.Popen(  # noqa: S603
                    [self._exe("flwr"), "supernode", "register", str(key), CONNECTION], cwd=self.project_dir,
                    env=self.env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                )  # fmt: skip
            registrations.append((key, popen, log_path))
        for key, popen, log_path in registrations:
            try:
                code = popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                code = -9
            if code != 0:
                raise RuntimeError(
                    f"Registering the SuperNode key {key} with the SuperLink failed (exit {code}); see {log_path}:\n"
                    f"{log_tail(log_path)}"
                )
        logger.info("registered %d SuperNode public keys with the SuperLink", len(public_keys))

    def site_paths(self, index: int) -> tuple[Path, Path]:
        """SuperNode ``index``'s approved-apps file and decision log (its site's files)."""
        site = self.sites_dir / f"site-{index}"
        return site / "approved_apps.txt", site / "app_decisions.jsonl"

    def supernode_argv(
        self, index: int, *, private_key: Path | None = None, root_certificates: Path | None = None,
        extra_args: list[str] | None = None, runtime_port: int | None = None,
    ) -> list[str]:  # fmt: skip
        """The command of SuperNode ``index``; ``private_key`` / ``root_certificates``
        replace the node's own key and the federation's CA (to test refusals);
        ``runtime_port`` is the port of its local Runtime API (free port if None)."""
        node_config = {
            "partition-id": index,
            "num-partitions": self.num_nodes,
            "data-dir": str(self.data_dir),
            **(self.node_configs[index] if index < len(self.node_configs) else {}),
        }
        if self.app_check:
            approved, decisions = self.site_paths(index)
            command = [sys.executable, "-m", "fedmic_pipeline.flower.site_supernode", "--approved-apps", str(approved),
                       "--decision-log", str(decisions)]  # fmt: skip
            if self.max_poll_wait_s is not None:
                command += ["--max-poll-wait-s", str(self.max_poll_wait_s)]
        else:
            command = [self._exe("flower-supernode")]
        if self.credentials is None:
            security = ["--insecure"]
        else:
            key = private_key or self.credentials.node_keys[index][0]
            security = ["--root-certificates", str(root_certificates or self.credentials.ca_cert),
                        "--auth-supernode-private-key", str(key)]  # fmt: skip
        return [
            *command, *security, "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port",
            str(runtime_port or free_port()), "--node-config", format_run_config(node_config),
            *(["--isolation", "process"] if self.warm_clientapps else []), *(extra_args or []),
        ]  # fmt: skip

    def warm_superexec_argv(self, index: int, runtime_port: int, supernode_pid: int) -> list[str]:
        """The warm SuperExec beside SuperNode ``index`` (``warm_superexec``): it serves
        the node's local Runtime API (plain HTTP on 127.0.0.1, as Flower's own SuperExec
        does), keeps partition ``index`` in memory and exits with the SuperNode."""
        threads = (self.node_configs[index] if index < len(self.node_configs) else {}).get("num-threads", 1)
        return [
            sys.executable, "-m", "fedmic_pipeline.flower.warm_superexec", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(supernode_pid), "--num-threads", str(threads),
            "--data-dir", str(self.data_dir), "--partition-id", str(index),
        ]  # fmt: skip

    def start_node(self, index: int) -> None:
        """(Re)start SuperNode ``index`` serving partition ``index``.

        With node authentication a restart gets a fresh, newly registered key: the
        SuperLink refuses to activate a key whose node it still counts as online, which a
        killed node stays for up to two heartbeat intervals (60 s in Flower 1.41)."""
        if index in self.nodes and self.nodes[index].popen.poll() is None:
            raise RuntimeError(f"SuperNode {index} is already running (pid {self.nodes[index].popen.pid}).")
        private_key = None
        if index in self.nodes and self.credentials is not None:
            restarts = next(self._restart_numbers)
            private_key, public_key = create_node_key(self.work_dir / "certs" / "restarts", f"supernode-{index}-{restarts}")
            self.register_node_keys([public_key])
        runtime_port = free_port()
        self.nodes[index] = self.processes.spawn(
            f"supernode-{index}", self.supernode_argv(index, private_key=private_key, runtime_port=runtime_port)
        )
        if self.warm_clientapps:
            self.node_executors[index] = self.processes.spawn(
                f"warm-superexec-{index}", self.warm_superexec_argv(index, runtime_port, self.nodes[index].popen.pid)
            )

    def spawn(self, name: str, argv: list[str]) -> Process:
        """Start another process of this deployment (logs, environment and teardown as
        for its own), e.g. a SuperNode that should be refused."""
        return self.processes.spawn(name, argv)

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``index`` and its whole process group (SuperExec, ClientApp),
        and its warm SuperExec's (with SIGKILL: the whole node is gone)."""
        proc = self.nodes[index]
        logger.info("killing supernode-%d (pid %d) with signal %d", index, proc.popen.pid, sig)
        self.processes.kill(proc, sig)
        proc.popen.wait(timeout=10)
        executor = self.node_executors.get(index)
        if executor is not None and sig == signal.SIGKILL:
            self.processes.kill(executor, sig)
            executor.popen.wait(timeout=10)

    def _wait(self, ready: Any, proc: Process, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log_path}:\n{log_tail(proc.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Timed out after {self.startup_timeout:.0f}s waiting for {what}; see {proc.log_path}.")
            time.sleep(0.2)

    # -- runs --------------------------------------------------------------------------
    def run(self, run_config: Mapping[str, Any], timeout: float = 600.0, app_dir: Path | str | None = None) -> FlowerRunResult:
        """``flwr run <app-dir> loopback --run-config ... --stream``; blocks until the run
        ends (or ``timeout``), then reads ``<output-dir>/flower_summary.json`` and the
        sites' decisions. ``app_dir`` runs another app than the approved one (its hash is
        on no node's list unless it equals the approved app's)."""
        if not self._started:
            raise RuntimeError("Call start() (or use the federation as a context manager) first.")
        from .server_app import SUMMARY_FILE

        run_no = next(self._run_numbers)
        values = dict(run_config)
        values.setdefault("data-dir", str(self.data_dir))
        values.setdefault("min-nodes", self.num_nodes)
        output_dir = task.resolve_path(str(values.get("output-dir", task.RUN_CONFIG_DEFAULTS["output-dir"])), self.project_dir)
        values["output-dir"] = str(output_dir)
        summary_path = output_dir / SUMMARY_FILE
        summary_path.unlink(missing_ok=True)
        app_dir = Path(app_dir) if app_dir is not None else self.app_dir
        app_sha256 = fab_sha256(app_dir) if self.app_check else None
        argv = [
            self._exe("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", format_run_config(values), "--stream",
        ]  # fmt: skip
        if self.simulation:
            # virtual SuperNodes get partition-id/num-partitions from Flower; data-dir comes
            # from the run config (task.node_identity falls back to it)
            argv += ["--federation-config", f"num-supernodes={self.num_nodes} client-resources-num-cpus=1"]
        logger.info("flwr run #%d: %s", run_no, format_run_config(values))
        t0 = time.perf_counter()
        # a fresh log per run: a reused work dir must not show an earlier run's id to the regex below
        proc = self.processes.spawn(f"flwr-run-{run_no}", argv, append_log=False)
        try:
            returncode = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.processes.kill(proc, signal.SIGKILL)
            proc.popen.wait(timeout=10)
            returncode = -9
            logger.error("flwr run #%d did not finish within %.0fs; killed it.", run_no, timeout)
        wall = time.perf_counter() - t0
        output = proc.log_path.read_text(encoding="utf-8", errors="replace")
        match = re.search(r"Successfully started run (\d+)", output)
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        run_id = int(match.group(1)) if match else None
        decisions = self.site_decisions(run_id) if run_id is not None and self.app_check else {}
        if summary is not None and decisions:
            summary["sites"] = _sites_for_summary(summary, decisions)
            tmp = summary_path.with_name(f".{summary_path.name}.sites")
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
            os.replace(tmp, summary_path)
        result = FlowerRunResult(
            returncode, run_id, wall, output, summary, output_dir, app_sha256=app_sha256, site_decisions=decisions,
        )  # fmt: skip
        logger.info("flwr run #%d: exit %d, status %s, %.1fs", run_no, returncode, result.status, wall)
        return result

    def site_decisions(self, run_id: int) -> dict[int, dict[str, str]]:
        """What each SuperNode's app check decided for ``run_id`` (its decision log)."""
        decisions: dict[int, dict[str, str]] = {}
        for index in range(self.num_nodes):
            log_path = self.site_paths(index)[1]
            if not log_path.is_file():
                continue
            for line in log_path.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if entry.get("run_id") == run_id:
                    decisions[index] = {"decision": entry["decision"], "app_sha256": entry["app_sha256"]}
        return decisions

    # -- teardown ----------------------------------------------------------------------
    def pids(self) -> set[int]:
        """Every pid this federation started or saw as a descendant (for leak checks)."""
        return self.processes.pids()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every process group, SIGKILL whatever of the deployment is left after
        ``grace`` s, and wait until none of its processes runs (``processes.py``)."""
        if not self.processes:
            return
        self.processes.stop(grace)
        self.nodes.clear()
        self.node_executors.clear()
        self.superlink = None
        if self._own_work_dir:
            logger.info("logs kept in %s", self.logs_dir)
        logger.info("loopback federation stopped")

    def __enter__(self) -> "LoopbackFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _sites_for_summary(summary: Mapping[str, Any], decisions: Mapping[int, Mapping[str, str]]) -> dict[str, Any]:
    """Each site's app decision beside its partition's node id, for the summary's audit
    trail: ``{"0": {"node_id": ..., "decision": "approved", "app_sha256": ...}}``. The
    sites' own decision logs are the source; the ServerApp cannot see them."""
    partitions = summary.get("partitions") or {}
    return {
        str(index): {"node_id": (partitions.get(str(index)) or {}).get("node_id"), **dict(decision)}
        for index, decision in sorted(decisions.items())
    }


# -- command line ----------------------------------------------------------------------------
def _parse_pairs(pairs: list[str]) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args(pairs)) if pairs else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmic_pipeline.flower.launch",
        description="Run a federation on loopback: a Flower SuperLink, N SuperNodes, `flwr run`, teardown.",
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNodes (partitions 0..N-1); 0 = every client file in data-dir")
    parser.add_argument("--data-dir", default=task.RUN_CONFIG_DEFAULTS["data-dir"], help="partition directory (clients/, manifest)")
    parser.add_argument("--algorithm", default=None, help="overrides the run config's algorithm")
    parser.add_argument("--rounds", type=int, default=None, help="overrides num-rounds")
    parser.add_argument("--seed", type=int, default=None, help="overrides seed")
    parser.add_argument("--output-dir", default=None, help="overrides output-dir")
    parser.add_argument("--algorithm-params", default=None, help="overrides algorithm-params (a JSON object)")
    parser.add_argument(
        "--secure-aggregation", choices=task.SECURE_AGGREGATION_MODES, default=None,
        help="overrides secure-aggregation: 'secaggplus' = Flower SecAgg+ (FedAvg family only)",
    )  # fmt: skip
    parser.add_argument("--run-config", action="append", default=[], help="extra 'key=value ...' run config overrides")
    parser.add_argument("--work-dir", default=None, help="logs and FLWR_HOME (default: a new temp dir, kept)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is killed")
    parser.add_argument(
        "--simulation", action="store_true", help="Ray simulation: one SuperLink --simulation, N virtual SuperNodes"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain HTTP, no SuperNode authentication (default: TLS + node keys)"
    )
    parser.add_argument(
        "--certs-dir", default=None, help="certificates and node keys from `python -m fedmic_pipeline.flower.certificates` "
        "(default: a new set in the work dir)",
    )  # fmt: skip
    parser.add_argument(
        "--no-approve", action="store_true", help="do not approve the app on the nodes: every node refuses the run"
    )
    parser.add_argument(
        "--no-app-check", action="store_true", help="plain flower-supernode, without the sites' approved-apps check"
    )
    parser.add_argument(
        "--cold-clientapps", action="store_true",
        help="Flower's default: a new flwr-clientapp interpreter per message (default: forked from a warm SuperExec)",
    )  # fmt: skip
    parser.add_argument(
        "--write-app", metavar="DIR", help="only write the app directory `flwr run` is given and print its FAB hash "
        "(what each site approves), then exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    task.configure_logging()

    root = task.project_root()
    if args.write_app:
        print(fab_sha256(prepare_app_dir(root, Path(args.write_app))))
        return 0
    data_dir = task.resolve_path(args.data_dir, root)
    nodes = args.nodes or len(list((data_dir / task.CLIENTS_SUBDIR).glob("client_*.npz")))
    if nodes < 1:
        parser.error(f"no client partitions in {data_dir / task.CLIENTS_SUBDIR}; run `make run` first or pass --data-dir")
    run_config = _parse_pairs(args.run_config)
    for key, value in (
        ("algorithm", args.algorithm),
        ("num-rounds", args.rounds),
        ("seed", args.seed),
        ("output-dir", args.output_dir),
        ("algorithm-params", args.algorithm_params),
        ("secure-aggregation", args.secure_aggregation),
    ):
        if value is not None:
            run_config[key] = value

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # explicit for SIGINT too: a launcher started in the background by a script inherits
    # SIGINT as ignored, and Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.perf_counter()
    federation = LoopbackFederation(
        nodes, data_dir, project_dir=root, work_dir=args.work_dir, simulation=args.simulation, insecure=args.insecure,
        certs_dir=args.certs_dir, app_check=not args.no_app_check, approve_app=not args.no_approve,
        warm_clientapps=not args.cold_clientapps, max_poll_wait_s=None if args.cold_clientapps else 0.2,
    )  # fmt: skip
    try:
        with federation:
            t_up = time.perf_counter() - t0
            result = federation.run(run_config, timeout=args.timeout)
    except KeyboardInterrupt:
        logger.warning("interrupted: the federation was torn down; logs in %s", federation.logs_dir)
        return 130
    except (task.FlowerConfigError, CertificateError, AppApprovalError) as exc:
        logger.error("%s", exc)
        return 2
    total = time.perf_counter() - t0
    sys.stdout.write(result.output)
    summary = result.summary or {}
    totals = summary.get("totals", {})
    logger.info(
        "status %s | start-up %.1fs, flwr run %.1fs, total %.1fs | mean round %s s | core bytes up %s down %s | "
        "wire bytes up %s down %s | summary in %s | logs in %s",
        result.status, t_up, result.wall_s, total, _fmt(totals.get("mean_round_time_s")), totals.get("bytes_up_total"),
        totals.get("bytes_down_total"), totals.get("wire_bytes_up_total"), totals.get("wire_bytes_down_total"),
        result.output_dir, federation.logs_dir,
    )  # fmt: skip
    if result.app_sha256:
        logger.info(
            "app sha256 %s; sites: %s", result.app_sha256,
            ", ".join(f"{i} {d['decision']}" for i, d in sorted(result.site_decisions.items())) or "no decision logged",
        )  # fmt: skip
    if summary.get("error"):
        logger.error("%s", summary["error"])
    return 0 if result.status == "completed" else 1


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
