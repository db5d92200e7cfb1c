"""A private CA, the SuperLink's TLS certificate and one authentication key pair per SuperNode.

    python -m fedmic_pipeline.flower.certificates --out certs --nodes 2 [--san superlink]

What Flower 1.41 needs, and what this writes into ``--out``:

* ``ca.crt`` / ``ca.key``: a self-signed root (EC P-384). SuperNodes and the ``flwr`` CLI
  verify the SuperLink against ``ca.crt`` (``flower-supernode --root-certificates``,
  ``root-certificates`` in ``$FLWR_HOME/config.toml``); ``ca.key`` signs and should then
  leave the machine that serves the federation.
* ``server.crt`` / ``server.key``: the SuperLink's certificate, valid for 127.0.0.1, ::1,
  localhost and every ``--san`` (``flower-superlink --ssl-ca-certfile ca.crt
  --ssl-certfile server.crt --ssl-keyfile server.key``). One TLS port serves the Fleet,
  Control and Runtime APIs.
* ``supernode-<i>.key`` / ``supernode-<i>.pub``: an EC P-384 key pair in OpenSSH format,
  the only format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
  register <public key>`` read. With ``flower-superlink --enable-supernode-auth`` a
  SuperNode whose public key was not registered cannot join.

In a real federation each hospital makes its own key pair (``--nodes 0 --node-key NAME``
on the hospital's machine, or ``ssh-keygen -t ecdsa -b 384``) and sends only the ``.pub``
to the operator; this command makes them all in one place for a loopback deployment.
Private keys are written with mode 0600. Existing files are kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateError", "FederationCredentials", "create_credentials", "create_node_key", "main", "node_key_paths"]

_CURVE = ec.SECP384R1()
_LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
_VALID_DAYS = 365


class CertificateError(ValueError):
    """A certificate or key file is missing or unusable; the message names the fix."""


@dataclass(frozen=True)
class FederationCredentials:
    """The files of one federation's TLS and node-authentication set-up."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[tuple[Path, Path], ...]  # (private key, public key) per SuperNode

    @classmethod
    def in_directory(cls, directory: Path | str, num_nodes: int) -> "FederationCredentials":
        """The file names ``create_credentials`` uses, checked to exist (one clear error
        naming every missing file and how to make it)."""
        directory = Path(directory)
        credentials = cls(
            directory,
            directory / "ca.crt",
            directory / "server.crt",
            directory / "server.key",
            tuple(node_key_paths(directory, f"supernode-{i}") for i in range(num_nodes)),
        )
        missing = [p for p in credentials.files() if not p.is_file()]
        if missing:
            raise CertificateError(
                f"The certificate directory {directory} lacks {', '.join(p.name for p in missing)}. "
                f"Create the set with `python -m fedmic_pipeline.flower.certificates --out {directory} "
                f"--nodes {num_nodes}`, or start the federation without --certs-dir to have one made in its work "
                "directory."
            )
        return credentials

    def files(self) -> list[Path]:
        return [self.ca_cert, self.server_cert, self.server_key, *(p for pair in self.node_keys for p in pair)]


def node_key_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.pub"


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CertificateError(f"{path} already exists; pass --force to replace it (every file of the set is remade).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if private:
        tmp.chmod(0o600)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _certificate(subject: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name | None) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmic-pipeline"), x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_node_key(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """One SuperNode's authentication key pair (EC P-384, OpenSSH format)."""
    key = ec.generate_private_key(_CURVE)
    private_path, public_path = node_key_paths(directory, name)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True, force=force)
    _write(public_path, public + f" {name}\n".encode(), private=False, force=force)
    return private_path, public_path


def create_credentials(
    directory: Path | str, num_nodes: int, *, server_names: list[str] | None = None, force: bool = False
) -> FederationCredentials:
    """The CA, the SuperLink certificate (SAN: loopback + ``server_names``) and
    ``num_nodes`` SuperNode key pairs, written into ``directory``."""
    directory = Path(directory)
    ca_key = ec.generate_private_key(_CURVE)
    ca_cert = (
        _certificate("fedmic-pipeline federation CA", ca_key.public_key(), None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(_CURVE)
    names = [*_LOOPBACK_NAMES, *(server_names or [])]
    server_cert = (
        _certificate("fedmic-pipeline SuperLink", server_key.public_key(), ca_cert.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alt_names(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write(directory / "ca.key", _pem_key(ca_key), private=True, force=force)
    _write(directory / "ca.crt", ca_cert.public_bytes(pem), private=False, force=force)
    _write(directory / "server.key", _pem_key(server_key), private=True, force=force)
    _write(directory / "server.crt", server_cert.public_bytes(pem), private=False, force=force)
    for i in range(num_nodes):
        create_node_key(directory, f"supernode-{i}", force=force)
    return FederationCredentials.in_directory(directory, num_nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmic_pipeline.flower.certificates",
        description="Create a private CA, the SuperLink's TLS certificate and SuperNode authentication keys.",
    )
    parser.add_argument("--out", required=True, help="directory for the files (created if missing)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to create (supernode-0 ...); 0 = none")
    parser.add_argument(
        "--san", action="append", default=[], help="another host name or IP of the SuperLink (repeatable), e.g. superlink"
    )
    parser.add_argument(
        "--node-key", metavar="NAME", help="create only one SuperNode key pair NAME.key/NAME.pub (a hospital's own)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.node_key:
            private, public = create_node_key(out, args.node_key, force=args.force)
            print(f"SuperNode key pair: {private} (keep on the node) and {public} (send to the SuperLink's operator)")
            return 0
        if args.nodes < 0:
            parser.error("--nodes must be >= 0")
        created = create_credentials(out, args.nodes, server_names=args.san, force=args.force)
    except CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA {created.ca_cert}, SuperLink certificate {created.server_cert}, {args.nodes} SuperNode key pair(s) in {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
