"""TLS for the ssl, wss and quic listeners: contexts from config, a self-signed default
certificate, and the peer certificate's CN for ``peer_cert_as_username``."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any

from roost.config import TlsOptions

log = logging.getLogger("roost.transport")

_SELF_SIGNED = ("roost-selfsigned.crt", "roost-selfsigned.key")


def make_self_signed(
    cert_path: Path, key_path: Path, common_name: str = "roost", days: int = 3650
) -> None:
    """Write a self-signed certificate for localhost/127.0.0.1 and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def default_cert(data_dir: str) -> tuple[str, str]:
    """The node's self-signed certificate and key, created on first use."""
    d = Path(data_dir)
    cert, key = d / _SELF_SIGNED[0], d / _SELF_SIGNED[1]
    if not (cert.exists() and key.exists()):
        make_self_signed(cert, key)
        log.warning("no certificate configured: created a self-signed one at %s", cert)
    return str(cert), str(key)


def resolve_cert(certfile: str, keyfile: str, data_dir: str) -> tuple[str, str]:
    """Configured certificate and key, or the node's self-signed pair when none is set."""
    if certfile:
        return certfile, keyfile or certfile
    return default_cert(data_dir)


_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(opts: TlsOptions, data_dir: str) -> ssl.SSLContext:
    """A server SSLContext for the ssl/wss listeners."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = sorted(_VERSIONS[v] for v in opts.versions)
    ctx.minimum_version = versions[0]
    ctx.maximum_version = versions[-1]
    certfile, keyfile = resolve_cert(opts.certfile, opts.keyfile, data_dir)
    ctx.load_cert_chain(certfile, keyfile)
    if opts.cacertfile:
        ctx.load_verify_locations(opts.cacertfile)
    if opts.verify == "verify_peer":
        # CERT_REQUIRED makes the handshake fail without a client certificate; CERT_OPTIONAL
        # still verifies one when it is sent.
        ctx.verify_mode = ssl.CERT_REQUIRED if opts.fail_if_no_peer_cert else ssl.CERT_OPTIONAL
    return ctx


def peer_cn(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (``SSLObject.getpeercert()``)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
