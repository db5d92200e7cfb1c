"""A SuperNode that runs only the Flower apps its hospital approved (Fed-BioMed style).

    python -m fedmic_pipeline.flower.site_supernode --approved-apps /site/approved_apps.txt \\
        [--decision-log /site/app_decisions.jsonl] <every flower-supernode argument>

``--approved-apps`` is a text file the site keeps: one app hash per line -- the SHA-256
of the FAB (Flower App Bundle) that ``flwr run`` submits, 64 hex digits, ``#`` starts a
comment. ``python -m fedmic_pipeline.flower.site_supernode --hash-app DIR`` prints the
hash of an app directory exactly as ``flwr run DIR`` will build it (Flower builds FABs
deterministically: sorted files, fixed timestamps). The file is read again for every new
run, so approving or revoking an app needs no restart.

When a message of a new run arrives, the SuperNode fetches the run's FAB; this wrapper
hashes the FAB's bytes itself (it does not take the SuperLink's word for the hash) and,
unless the hash is on the list, answers the message with Flower's ``INVALID_FAB`` error
instead of starting a ClientApp, logs the refusal on the node and appends it to the
decision log (JSON lines: time, run id, app hash, decision). Every later message of that
run is refused the same way. An approved run proceeds untouched.

Why a wrapper and not Flower's own check: Flower 1.41's SuperNode verifies apps only
through ``--trusted-entities`` (Ed25519 signatures that Flower's platform attaches to FABs
downloaded from Flower Hub, flagged ``valid_license``). A FAB submitted from a directory
(``flwr run <dir>``) carries no signatures, so with ``--trusted-entities`` every private
app is refused ("App verification is not supported by the connected SuperLink"), and
there is no way to sign one without the Hub. Flower 1.41 has no allow-list of hashes.

Where the check runs, and its limits:

* In the SuperNode process the site starts, before any code named by the FAB is loaded:
  a FAB cannot switch the check off (a check inside the ClientApp could be skipped by a
  FAB whose ``[tool.flwr.app.components]`` names another ClientApp, and could not see the
  FAB's hash anyway -- Flower hands a ClientApp only the message and the context).
* It wraps one private function of Flower 1.41.0 (``_pull_and_store_message`` in
  ``flwr.supernode.start_client_internal``); it refuses to start under any other Flower
  version rather than silently not checking.
* The hash covers what the FAB holds. This project's FAB holds only pyproject.toml (the
  app's name, version, component references and run-config defaults, see
  ``launch.prepare_app_dir``); the nodes run the fedmic-pipeline code installed in the
  site's own environment, which the site approves by installing a reviewed version. An
  app that ships its code in the FAB has that code covered by the hash too.
* Whoever can edit this file, the allow-list or the site's environment can change the
  policy: keep them writable only by the site's administrators.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

__all__ = [
    "FLOWER_VERSION",
    "AppApprovalError",
    "UnapprovedApp",
    "fab_sha256",
    "cap_supernode_waits",
    "install_app_approval",
    "main",
    "read_approved_apps",
    "write_approved_apps",
]

#: The Flower version whose SuperNode internals ``install_app_approval`` wraps.
FLOWER_VERSION = "1.41.0"
_HASH = re.compile(r"[0-9a-f]{64}")


class AppApprovalError(ValueError):
    """The site's approved-apps list is missing or malformed; the message names the fix."""


class UnapprovedApp(Exception):
    """A run's FAB hash is not on the site's list (raised inside the SuperNode's pull)."""

    def __init__(self, run_id: int, digest: str) -> None:
        super().__init__(
            f"This site has not approved the app of run {run_id} (FAB sha256 {digest}); the SuperNode refused to run "
            "it. If the site's reviewers accept this app version, they add the hash to the SuperNode's approved-apps "
            "file."
        )
        self.run_id = run_id
        self.digest = digest


def fab_sha256(app_dir: Path | str) -> str:
    """The hash of the FAB ``flwr run <app_dir>`` submits (built by Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise AppApprovalError(
            f"{app_dir} is not a Flower app directory (it has no pyproject.toml); pass the directory `flwr run` is "
            "given (the loopback launcher's is <work-dir>/app)."
        )
    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def read_approved_apps(path: Path | str) -> frozenset[str]:
    """Every hash on the site's list; one clear error for a missing file or a bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AppApprovalError(
            f"The approved-apps file {path} cannot be read ({exc.strerror or exc}). Create it with one approved FAB "
            "hash per line (`python -m fedmic_pipeline.flower.site_supernode --hash-app <app dir>` prints the hash of "
            "an app), or point --approved-apps at the site's file."
        ) from None
    hashes = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _HASH.fullmatch(line):
            raise AppApprovalError(
                f"Line {number} of the approved-apps file {path} is not a SHA-256 hash: {raw.strip()!r}. Each line "
                "holds one FAB hash of 64 hex digits (text after # is a comment); fix or remove the line."
            )
        hashes.add(line)
    return frozenset(hashes)


def write_approved_apps(path: Path | str, hashes: list[str], note: str = "") -> Path:
    """Write an approved-apps file (what a site's reviewer would do by hand)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# approved Flower apps (FAB sha256), one per line{': ' + note if note else ''}\n"
    path.write_text(header + "".join(f"{h}\n" for h in hashes), encoding="utf-8")
    return path


def _record_decision(decision_log: Path | None, run_id: int, digest: str, decision: str, allow_list: Path) -> None:
    if decision_log is None:
        return
    entry = {"time": time.time(), "run_id": run_id, "app_sha256": digest, "decision": decision, "approved_apps": str(allow_list)}
    decision_log.parent.mkdir(parents=True, exist_ok=True)
    with decision_log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def install_app_approval(allow_list: Path | str, decision_log: Path | str | None = None) -> None:
    """Make this process's SuperNode refuse every run whose FAB hash is not on ``allow_list``."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log
    from flwr.supercore.version import package_version
    from flwr.supernode import start_client_internal as supernode

    if package_version != FLOWER_VERSION or not hasattr(supernode, "_pull_and_store_message"):
        raise AppApprovalError(
            f"The site's app approval wraps Flower {FLOWER_VERSION}'s SuperNode, but Flower {package_version} is "
            f"installed. Install flwr=={FLOWER_VERSION}, or port fedmic_pipeline/flower/site_supernode.py to this "
            "version before running a SuperNode that must check apps."
        )
    allow_list = Path(allow_list).resolve()
    log_path = Path(decision_log).resolve() if decision_log else None
    read_approved_apps(allow_list)  # fail at start-up, not at the first run
    original: Callable[..., int | None] = supernode._pull_and_store_message

    def pull_and_store_approved_message(**kwargs: Any) -> int | None:
        received: dict[str, Any] = {}
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def remembering_receive() -> Any:
            result = receive()
            received["message"] = result[0] if result is not None else None
            return result

        def approved_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            try:
                approved = digest in read_approved_apps(allow_list)
            except AppApprovalError as exc:
                log(ERROR, "%s", exc)
                approved = False
            _record_decision(log_path, run_id, digest, "approved" if approved else "refused", allow_list)
            if not approved:
                raise UnapprovedApp(run_id, digest)
            log(INFO, "Site policy: app of run %s approved (FAB sha256 %s in %s).", run_id, digest, allow_list)
            return fab

        try:
            return original(**{**kwargs, "receive": remembering_receive, "get_fab": approved_fab})
        except UnapprovedApp as refusal:
            log(ERROR, "Site policy: %s Approved apps: %s.", refusal, allow_list)
            reply = Message(Error(ErrorCode.INVALID_FAB, str(refusal)), reply_to=received["message"])
            supernode._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return refusal.run_id

    supernode._pull_and_store_message = pull_and_store_approved_message


def cap_supernode_waits(seconds: float) -> None:
    """Make this process's SuperNode wait at most ``seconds`` between its polls.

    Flower 1.41's SuperNode loop sleeps a fixed 3 s after every empty pull from the
    SuperLink and 0.5 s between checks for its ClientApp's reply
    (``start_client_internal``: ``time.sleep(3)``, ``time.sleep(0.5)``); each round pays
    the first twice on average (train, evaluate), up to 6 s a round for nothing on
    loopback. Capping those sleeps trades a few more small pulls per second for latency;
    real sites over a WAN may prefer Flower's default (do not pass ``--max-poll-wait-s``).
    """
    import types

    from flwr.supernode import start_client_internal as supernode

    if seconds <= 0:
        raise AppApprovalError(f"--max-poll-wait-s must be > 0, got {seconds}.")
    real_time = supernode.time
    capped = types.ModuleType("time", "time, with sleep() capped for the SuperNode's poll loop")
    capped.__dict__.update({k: v for k, v in vars(real_time).items() if not k.startswith("__")})
    capped.sleep = lambda delay: real_time.sleep(min(float(delay), seconds))  # type: ignore[attr-defined]
    supernode.time = capped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmic_pipeline.flower.site_supernode",
        description="flower-supernode that refuses every app whose FAB hash the site has not approved. "
        "Arguments other than the ones below go to flower-supernode unchanged.",
    )
    parser.add_argument("--approved-apps", help="the site's file of approved FAB hashes (one per line)")
    parser.add_argument("--decision-log", help="append every approve/refuse decision to this JSON-lines file")
    parser.add_argument("--hash-app", metavar="APP_DIR", help="print the FAB hash of an app directory and exit")
    parser.add_argument(
        "--max-poll-wait-s", type=float, default=None,
        help="wait at most this long between the SuperNode's polls (Flower: 3 s when idle); for loopback/LAN",
    )  # fmt: skip
    args, flower_args = parser.parse_known_args(argv)
    if not args.hash_app and not args.approved_apps:
        parser.error("--approved-apps FILE is required (the site's list of approved FAB hashes)")
    try:
        if args.hash_app:
            print(fab_sha256(args.hash_app))
            return 0
        install_app_approval(args.approved_apps, args.decision_log)
        if args.max_poll_wait_s is not None:
            cap_supernode_waits(args.max_poll_wait_s)
        from .latency import apply_pull_backoff_from_env

        apply_pull_backoff_from_env()
    except AppApprovalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
