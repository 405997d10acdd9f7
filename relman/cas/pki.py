"""A development PKI: a root CA and a code-signing certificate issued by it.

For tests and demos only. Production signers use keys and certificates from
the organisation's own PKI (HSM, CA), which relman only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relman.cas.errors import InputError
from relman.cas.fsutil import atomic_write_bytes

PKI_FILES = ("ca.pem", "ca.key", "signer.pem", "signer.key")


@dataclass(frozen=True)
class Issued:
    """A private key and the certificate issued for it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "relman development PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_root_ca(
    common_name: str = "relman development root CA", days: int = 3650
) -> Issued:
    """Create a self-signed root CA on an ECDSA P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def make_code_signer(
    issuer: Issued,
    common_name: str = "relman development signer",
    days: int = 730,
) -> Issued:
    """Issue an end-entity certificate with the codeSigning extended key usage."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.certificate.public_key()
            ),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(key, certificate)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_pki(folder: str | Path, force: bool = False) -> dict[str, Path]:
    """Write ca.pem, ca.key, signer.pem and signer.key into ``folder``.

    Keys are written unencrypted with mode 0600. Existing files are kept
    unless ``force`` is set, so a key is never overwritten by accident.

    Raises:
        InputError: one of the files exists and ``force`` is not set.
    """
    target = Path(folder)
    paths = {name: target / name for name in PKI_FILES}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not force:
        raise InputError(
            f"{', '.join(existing)} already exist; pass --force to replace them "
            "or choose another folder"
        )
    target.mkdir(parents=True, exist_ok=True)
    root = make_root_ca()
    signer = make_code_signer(root)
    atomic_write_bytes(paths["ca.key"], private_key_pem(root.key), mode=0o600)
    atomic_write_bytes(paths["signer.key"], private_key_pem(signer.key), mode=0o600)
    atomic_write_bytes(paths["ca.pem"], certificate_pem(root.certificate))
    atomic_write_bytes(paths["signer.pem"], certificate_pem(signer.certificate))
    return paths


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Read every certificate from a PEM file (or one DER certificate)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(
            f"cannot read certificate file {str(path)!r}: {error.strerror}"
        ) from error
    try:
        if b"-----BEGIN" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError as error:
        raise InputError(
            f"{str(path)!r} contains no valid X.509 certificate: {error}"
        ) from error
    return certificates


def load_private_key(path: str | Path):  # noqa: ANN201 - any cryptography key type
    """Read an unencrypted PEM or DER private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(
            f"cannot read private key {str(path)!r}: {error.strerror}"
        ) from error
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise InputError(
            f"{str(path)!r} is not an unencrypted private key: {error}"
        ) from error
