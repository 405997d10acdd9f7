"""A test PKI built with cryptography: roots, intermediates, signers, TSAs, CRLs, OCSP.

Every certificate is written as PEM next to its key, so the real openssl
command and relman read the same files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Issued:
    """A key, its certificate, and the files they were written to."""

    name: str
    key: object
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "relman test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_key(kind: str = "ec256"):  # noqa: ANN201
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    raise ValueError(kind)


class TestPki:
    """Issues certificates into one folder."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def issue(
        self,
        name: str,
        issuer: Issued | None = None,
        ca: bool = False,
        usages: list | None = None,
        eku_critical: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key_kind: str = "ec256",
        ocsp_url: str | None = None,
        hash_algorithm: hashes.HashAlgorithm | None = None,
        chain: list[Issued] = (),
        common_name: str | None = None,
    ) -> Issued:
        """Issue a certificate; ``issuer`` None makes a self-signed root.

        ``name`` names the files; ``common_name`` (default: ``name``) the subject.
        """
        key = new_key(key_kind)
        public = key.public_key()
        signing_key = issuer.key if issuer else key
        subject = _name(common_name or name)
        issuer_name = issuer.certificate.subject if issuer else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(days=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=365))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public), critical=False
            )
        )
        if issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.key.public_key()
                ),
                critical=False,
            )
        if usages:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(usages), critical=eku_critical
            )
        if usages == OCSP_SIGNING:
            # RFC 6960, section 4.2.2.2.1: the responder's own status is not checked.
            builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
        if ocsp_url:
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            x509.oid.AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier(ocsp_url),
                        )
                    ]
                ),
                critical=False,
            )
        certificate = builder.sign(signing_key, hash_algorithm or hashes.SHA256())
        key_path = self.folder / f"{name}.key"
        cert_path = self.folder / f"{name}.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        pem += b"".join(
            link.certificate.public_bytes(serialization.Encoding.PEM) for link in chain
        )
        cert_path.write_bytes(pem)
        return Issued(name, key, certificate, key_path, cert_path)

    def crl(
        self,
        issuer: Issued,
        revoked: list[tuple[Issued, dt.datetime, x509.ReasonFlags]] = (),
        name: str | None = None,
        last_update: dt.datetime | None = None,
        next_update: dt.datetime | None = None,
    ) -> Path:
        """Write a CRL of ``issuer`` listing ``revoked`` (certificate, date, reason)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.certificate.subject)
            .last_update(last_update or NOW - dt.timedelta(days=2))
            .next_update(next_update or NOW + dt.timedelta(days=30))
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer.key.public_key()
                ),
                critical=False,
            )
        )
        for certificate, date, reason in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(certificate.serial)
                .revocation_date(date)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(issuer.key, hashes.SHA256())
        path = self.folder / (name or f"{issuer.name}.crl")
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path

    def ocsp_index(
        self, entries: list[tuple[Issued, dt.datetime | None]], name: str = "index.txt"
    ) -> Path:
        """Write an openssl CA database: valid entries, or revoked with keyCompromise."""
        lines = []
        for issued, revoked_at in entries:
            expiry = issued.certificate.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
            serial = f"{issued.serial:X}"
            if len(serial) % 2:
                serial = "0" + serial
            subject = "/" + "/".join(
                f"{attribute.oid._name}={attribute.value}"
                for attribute in issued.certificate.subject
            )
            if revoked_at is None:
                lines.append(f"V\t{expiry}\t\t{serial}\tunknown\t{subject}")
            else:
                stamp = revoked_at.strftime("%y%m%d%H%M%SZ")
                lines.append(
                    f"R\t{expiry}\t{stamp},keyCompromise\t{serial}\tunknown\t{subject}"
                )
        path = self.folder / name
        path.write_text("\n".join(lines) + "\n")
        return path


CODE_SIGNING = [ExtendedKeyUsageOID.CODE_SIGNING]
TIME_STAMPING = [ExtendedKeyUsageOID.TIME_STAMPING]
OCSP_SIGNING = [ExtendedKeyUsageOID.OCSP_SIGNING]
EMAIL = [ExtendedKeyUsageOID.EMAIL_PROTECTION]


def resign_token(token_der: bytes, issued: Issued) -> bytes:
    """Re-sign an RFC 3161 token's TSTInfo with ``issued``, which need not be a TSA.

    openssl ts refuses to sign with a certificate that lacks the timeStamping
    usage, so tests build such a token here.
    """
    from asn1crypto import cms as asn1_cms
    from asn1crypto import tsp as asn1_tsp  # noqa: F401 - registers the tst_info type
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives.asymmetric import ec as ec_keys

    token = asn1_cms.ContentInfo.load(token_der)
    content = token["content"]["encap_content_info"]["content"]
    tst_info = content.parsed.dump() if hasattr(content, "parsed") else content.contents
    digest = hashes.Hash(hashes.SHA256())
    digest.update(tst_info)
    attributes = asn1_cms.CMSAttributes(
        [
            {"type": "content_type", "values": ["tst_info"]},
            {"type": "message_digest", "values": [digest.finalize()]},
        ]
    )
    value = issued.key.sign(attributes.dump(force=True), ec_keys.ECDSA(hashes.SHA256()))
    certificate = asn1_x509.Certificate.load(
        issued.certificate.public_bytes(serialization.Encoding.DER)
    )
    signer_info = asn1_cms.SignerInfo(
        {
            "version": "v1",
            "sid": {
                "issuer_and_serial_number": {
                    "issuer": certificate.issuer,
                    "serial_number": certificate.serial_number,
                }
            },
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": attributes,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": value,
        }
    )
    signed_data = asn1_cms.SignedData(
        {
            "version": "v3",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {
                "content_type": "tst_info",
                "content": asn1_cms.ParsableOctetString(tst_info),
            },
            "certificates": [certificate],
            "signer_infos": [signer_info],
        }
    )
    return asn1_cms.ContentInfo(
        {"content_type": "signed_data", "content": signed_data}
    ).dump()
