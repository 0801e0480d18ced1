"""TLS material of a local deployment: a self-signed CA, the SuperLink certificate, node keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcrypt.deploy.processes import HOST

log = logging.getLogger(__name__)


def write_secret(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a local TLS setup.

    Attributes
    ----------
    ca_cert : Path
        The CA certificate every party trusts.
    server_cert, server_key : Path
        The SuperLink's certificate (SAN ``IP:127.0.0.1``, ``DNS:localhost``) and its
        private key (0600).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(out_dir: Path, *, days: int = 2) -> TlsFiles:
    """Create a throw-away CA and a SuperLink certificate for 127.0.0.1.

    Parameters
    ----------
    out_dir : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` (created).
    days : int
        Validity of both certificates in days (default: 2).

    Returns
    -------
    TlsFiles
    """
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcrypt local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    write_secret(out_dir / "ca.key", _pem_key(ca_key))
    (out_dir / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (out_dir / "server.crt").write_bytes(server_cert.public_bytes(pem))
    write_secret(out_dir / "server.key", _pem_key(server_key))
    return TlsFiles(out_dir / "ca.crt", out_dir / "server.crt", out_dir / "server.key")


def make_node_key_pair(out_dir: Path, name: str = "supernode") -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair (NIST P-384, OpenSSH format).

    Parameters
    ----------
    out_dir : Path
        Folder for ``<name>`` (private key, 0600) and ``<name>.pub`` (created).
    name : str
        File name of the private key (default: ``supernode``).

    Returns
    -------
    tuple of Path
        ``(private_key, public_key)`` for ``flower-supernode
        --auth-supernode-private-key`` and ``flwr supernode register``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = write_secret(
        out_dir / name,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = out_dir / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


# -- processes -----------------------------------------------------------------------------
