"""The loopback deployment secured as a hospital's IT would require it.

Fast tests (no processes): the certificate set (a CA, a SuperLink certificate for
loopback signed by it, OpenSSH node keys), the sites' approved-apps files and the FAB hash
(as ``flwr run`` builds it; one edited line changes it).

Slow tests (``-m slow``) share one real deployment -- ``flower-superlink`` with TLS and
``--enable-supernode-auth``, two SuperNodes with registered keys, each started through
``site_supernode`` with the launcher's app on its approved list -- and check that
(a) a SuperNode whose key is not registered is refused, (b) a SuperNode that does not
trust the federation's CA cannot connect (nor can a TLS client), and (d) an app with one
line changed is refused by every node, logged on each. That a run over TLS with
authenticated nodes and approved apps works (c) is proven by ``test_deployment.py``, whose
federation runs that way by default.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fedmic_pipeline.flower.certificates import CertificateError, FederationCredentials, create_credentials, create_node_key
from fedmic_pipeline.flower.site_supernode import AppApprovalError, fab_sha256, read_approved_apps, write_approved_apps

from .test_deployment import FEDAVG_PARAMS, _run_config, write_tiny_partition

#: Flower's exit code (in the log; the process exits with 1) of a SuperNode that could not
#: connect to, or activate with, the SuperLink.
CONNECTION_FAILED = "Exit Code: 305"
REFUSAL_TIMEOUT = 40.0


# -- fast: files ----------------------------------------------------------------------------
def test_certificates_chain_to_the_ca_and_cover_loopback(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    creds = create_credentials(tmp_path, 2, server_names=["superlink"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    for private, public in creds.node_keys:
        assert private.stat().st_mode & 0o077 == 0, f"{private} is readable by others"
        key = load_ssh_private_key(private.read_bytes(), None)
        assert key.public_key() == load_ssh_public_key(public.read_bytes())
    assert creds.server_key.stat().st_mode & 0o077 == 0


def test_missing_certificates_are_named_with_the_fix(tmp_path: Path) -> None:
    create_credentials(tmp_path, 1)
    with pytest.raises(CertificateError, match=r"supernode-1\.key, supernode-1\.pub.*certificates --out"):
        FederationCredentials.in_directory(tmp_path, 2)
    with pytest.raises(CertificateError, match="--force"):
        create_node_key(tmp_path, "supernode-0")


def test_approved_apps_file_is_checked_line_by_line(tmp_path: Path) -> None:
    digest = "ab" * 32
    path = write_approved_apps(tmp_path / "approved.txt", [digest], note="test")
    path.write_text(path.read_text() + f"  {digest.upper()}  # the same, upper case\n\n")
    assert read_approved_apps(path) == {digest}
    path.write_text("# reviewed 2026-11-30\nnot-a-hash\n")
    with pytest.raises(AppApprovalError, match=r"Line 2 .* not a SHA-256 hash: 'not-a-hash'"):
        read_approved_apps(path)
    with pytest.raises(AppApprovalError, match="cannot be read"):
        read_approved_apps(tmp_path / "missing.txt")


def _edited_copy(app_dir: Path, target: Path) -> Path:
    """The app with one line changed: a run-config default of its pyproject.toml."""
    shutil.copytree(app_dir, target)
    pyproject = target / "pyproject.toml"
    lines = pyproject.read_text(encoding="utf-8").splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("num-rounds ="))
    lines[index] = "num-rounds = 1\n"
    pyproject.write_text("".join(lines), encoding="utf-8")
    return target


def test_fab_hash_is_stable_and_changes_with_one_line(tmp_path: Path, project_root: Path) -> None:
    from fedmic_pipeline.flower.launch import prepare_app_dir

    app = prepare_app_dir(project_root, tmp_path / "app")
    assert fab_sha256(app) == fab_sha256(shutil.copytree(app, tmp_path / "copy"))
    assert fab_sha256(_edited_copy(app, tmp_path / "edited")) != fab_sha256(app)
    with pytest.raises(AppApprovalError, match="no pyproject.toml"):
        fab_sha256(tmp_path)


# -- slow: one secured deployment ------------------------------------------------------------
@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory, project_root: Path):
    from fedmic_pipeline.flower.launch import LoopbackFederation

    fed = LoopbackFederation(
        2,
        write_tiny_partition(tmp_path_factory.mktemp("secure_partition")),
        project_dir=project_root,
        work_dir=tmp_path_factory.mktemp("secure_work"),
        env={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""},
    )
    with fed:
        yield fed


def _wait_for_exit(proc: Any, timeout: float = REFUSAL_TIMEOUT) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} was not refused within {timeout:.0f}s; log:\n{proc.log_path.read_text()[-3000:]}")


def _wait_for_text(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(encoding="utf-8", errors="replace")
        if text in content:
            return content
        time.sleep(0.2)
    pytest.fail(f"{text!r} did not appear in {path} within {timeout:.0f}s:\n{path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def turned_away(secure_federation, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two SuperNodes that must not join, started side by side (their start-up overlaps):
    ``unregistered`` holds a valid key nobody registered; ``foreign-ca`` holds a registered
    key but trusts another CA than the federation's, so only the TLS check can stop it."""
    fed = secure_federation
    keys = tmp_path_factory.mktemp("turned_away")
    unregistered_key, _ = create_node_key(keys, "unregistered")
    registered_key, registered_pub = create_node_key(keys, "registered")
    foreign = create_credentials(keys / "foreign", 0)
    fed.register_node_keys([registered_pub])
    bounded = ["--max-retries", "1", "--max-wait-time", "10"]
    procs = {
        "unregistered": fed.spawn(
            "supernode-unregistered", fed.supernode_argv(0, private_key=unregistered_key, extra_args=bounded)
        ),
        "foreign-ca": fed.spawn(
            "supernode-foreign-ca",
            fed.supernode_argv(1, private_key=registered_key, root_certificates=foreign.ca_cert, extra_args=bounded),
        ),
    }
    return {"procs": procs, "exit_codes": {name: _wait_for_exit(proc) for name, proc in procs.items()}, "foreign": foreign}


@pytest.mark.slow
def test_supernode_without_a_registered_key_is_refused(secure_federation, turned_away: dict[str, Any]) -> None:
    fed = secure_federation
    assert fed.credentials is not None and "--enable-supernode-auth" in fed.superlink.popen.args
    assert turned_away["exit_codes"]["unregistered"] != 0
    log = turned_away["procs"]["unregistered"].log_path.read_text()
    assert CONNECTION_FAILED in log and "Failed to activate SuperNode" in log
    _wait_for_text(fed.superlink.log_path, "No SuperNode found with the given public key")


@pytest.mark.slow
def test_supernode_that_does_not_trust_the_ca_cannot_connect(secure_federation, turned_away: dict[str, Any]) -> None:
    fed = secure_federation
    assert turned_away["exit_codes"]["foreign-ca"] != 0
    log = turned_away["procs"]["foreign-ca"].log_path.read_text()
    assert CONNECTION_FAILED in log and "CERTIFICATE_VERIFY_FAILED" in log
    assert "SuperNode ID" not in log  # it never got an identity
    # the same for any TLS client: the wrong CA fails verification, the federation's passes
    for ca, trusted in ((turned_away["foreign"].ca_cert, False), (fed.credentials.ca_cert, True)):
        context = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", fed.port), timeout=5) as raw:
            if trusted:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    context.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.slow
def test_every_node_refuses_an_app_with_one_line_changed(secure_federation, tmp_path: Path) -> None:
    fed = secure_federation
    edited = _edited_copy(fed.app_dir, tmp_path / "edited_app")
    config = _run_config("fedavg", FEDAVG_PARAMS, tmp_path / "out", **{"node-wait-timeout": 30.0})
    result = fed.run(config, timeout=120, app_dir=edited)
    assert result.status == "stopped", result.output[-4000:]
    assert result.app_sha256 == fab_sha256(edited) != fed.app_sha256
    assert result.site_decisions == {i: {"decision": "refused", "app_sha256": result.app_sha256} for i in range(2)}
    error = result.summary["error"]
    assert "Only 0 nodes answered the partition query" in error
    assert error.count(f"has not approved the app of run {result.run_id} (FAB sha256 {result.app_sha256})") == 2
    for index in range(2):
        assert "Site policy: This site has not approved" in fed.nodes[index].log_path.read_text()
    assert not (result.output_dir / "global_model.pt").exists()
