"""A SuperExec for one SuperNode that starts every ClientApp from a warm, forked process.

    python -m fedmic_pipeline.flower.warm_superexec --runtime-api-address 127.0.0.1:PORT \\
        --insecure --parent-pid <supernode pid> [--data-dir DIR --partition-id I] [--num-threads 1]

Why: in Flower 1.41 a SuperNode (``--isolation subprocess``, the default) starts its own
``flower-superexec``, which runs ``flwr-clientapp`` as a NEW interpreter for every message
(``SubprocessExecutor.launch``), and ``flwr-clientapp`` handles exactly one task and exits
(``run_clientapp`` ends in ``flwr_exit``). Every train and evaluate message therefore paid
the interpreter, Flower's imports, torch (and ``torch._dynamo`` at the first optimizer),
the core and the node's partition from disk again -- most of a Flower round on a busy
2-core machine (``docs/results/flower_rounds.md``).

What this does instead: the SuperNode runs with ``--isolation process`` (it starts no
SuperExec of its own) and the launcher starts this process beside it. It imports all of
that ONCE, optionally loads the node's own partition into memory (``task.preload_client_data``),
and then runs Flower's own SuperExec loop (``run_superexec``: ``AcquireTask`` on the
SuperNode's Runtime API, token per task) with one change: a ClientApp task is started
with ``os.fork()`` and the child runs Flower's own ``run_clientapp`` with the task's token.
The child inherits the imports and the partition (copy-on-write), handles its one message
exactly as ``flwr-clientapp`` would (pull message + context, run the app, push the reply
and the context) and exits. Isolation per message is unchanged -- every message still gets
a fresh process whose memory dies with it, so the private state still travels through
``context.state`` -- only the start-up is gone.

Limits: POSIX only (``fork``); wraps one module attribute of Flower 1.41.0
(``run_superexec.get_executor``) and refuses other versions; the parent must not start
torch's thread pools before forking (it only imports and reads arrays). Other task types
than ClientApp go to Flower's ``SubprocessExecutor`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["FLOWER_VERSION", "ForkingClientAppExecutor", "main", "warm_up"]

#: The Flower version whose SuperExec internals this module wraps.
FLOWER_VERSION = "1.41.0"

logger = logging.getLogger(__name__)


def warm_up(num_threads: int, data_dir: Path | None = None, partition_id: int | None = None) -> dict[str, float]:
    """Import what every ClientApp message needs (and load the node's partition), so a
    forked child starts with it; returns the seconds each step took (logged once)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    seconds["flower"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    import torch._dynamo  # noqa: F401  # imported by the first optimizer step otherwise

    seconds["torch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from ..core import algorithms, data, models, protocol, selection, simulation  # noqa: F401
    from . import client_app  # noqa: F401

    seconds["fedmic"] = time.perf_counter() - t0
    if data_dir is not None and partition_id is not None:
        from . import task

        t0 = time.perf_counter()
        task.preload_client_data(data_dir, partition_id)
        seconds["partition"] = time.perf_counter() - t0
    return seconds


class ForkingClientAppExecutor:
    """Flower's ``SubprocessExecutor`` with ClientApp tasks started by ``os.fork``."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self._fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
        self._fallback.wait_for_capacity(*args, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns here
            os._exit(_run_clientapp_in_child(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies while the node runs for days)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self._fallback.close()


def _run_clientapp_in_child(spec: Any) -> int:
    """Flower's own ``flwr-clientapp`` body, in the forked child; returns its exit code."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    code = 1
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exit_:  # run_clientapp ends with flwr_exit -> sys.exit
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never fall back into the parent's loop
        logging.getLogger(__name__).exception("ClientApp child failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmic_pipeline.flower.warm_superexec",
        description="SuperExec for a SuperNode started with --isolation process: imports torch and the "
        "core once and forks a warm process per ClientApp message.",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (127.0.0.1)")
    parser.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads per ClientApp (0 = torch's default)")
    parser.add_argument("--data-dir", default=None, help="with --partition-id: keep this node's partition in memory")
    parser.add_argument("--partition-id", type=int, default=None)
    args = parser.parse_args(argv)

    from flwr.supercore.superexec import run_superexec as superexec_module
    from flwr.supercore.version import package_version

    from . import task

    if package_version != FLOWER_VERSION or not hasattr(superexec_module, "get_executor"):
        print(
            f"error: warm_superexec wraps Flower {FLOWER_VERSION}'s SuperExec, but Flower {package_version} is "
            "installed; use plain flower-supernode (--isolation subprocess) or port this module.",
            file=sys.stderr,
        )
        return 2
    from .latency import apply_pull_backoff_from_env

    task.configure_logging()
    apply_pull_backoff_from_env()  # before any fork: the ClientApp children inherit it
    t0 = time.perf_counter()
    data_dir = task.resolve_path(args.data_dir) if args.data_dir else None
    seconds = warm_up(args.num_threads, data_dir, args.partition_id)
    logger.info(
        "warm SuperExec ready in %.2fs (%s); ClientApp tasks are forked from this process (pid %d)",
        time.perf_counter() - t0, ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()), os.getpid(),
    )  # fmt: skip
    superexec_module.get_executor = lambda *a, **k: ForkingClientAppExecutor()
    superexec_module.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
