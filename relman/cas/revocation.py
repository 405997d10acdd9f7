"""Revocation information: CRLs from files and URLs, OCSP responses from responders.

This module only gathers the bytes; relman.cas.chain hands them to the path
validator, which checks their signatures, their validity and the status of
each certificate. Sources that cannot be read are collected as problems, so
the policy can decide between soft fail and hard fail.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from relman.cas.policy import TrustPolicy

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass
class RevocationInfo:
    """CRLs and OCSP responses for one verification, and what could not be obtained."""

    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    ocsp_responses: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def crl_digest(self) -> str:
        """Return a SHA-256 over all CRLs, so that a changed CRL changes the value."""
        digests = sorted(
            hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).hexdigest()
            for crl in self.crls
        )
        return hashlib.sha256("".join(digests).encode()).hexdigest()

    def has_crl_from(self, issuer: x509.Certificate) -> bool:
        return any(crl.issuer == issuer.subject for crl in self.crls)

    def revocation_entry(
        self, certificate: x509.Certificate
    ) -> x509.RevokedCertificate | None:
        """Return the CRL entry that revokes ``certificate``, if a loaded CRL lists it."""
        for crl in self.crls:
            if crl.issuer == certificate.issuer:
                entry = crl.get_revoked_certificate_by_serial_number(
                    certificate.serial_number
                )
                if entry is not None:
                    return entry
        return None


def parse_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL, raising ValueError that names ``source``."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as error:
        raise ValueError(f"{source} is not a valid CRL: {error}") from error


def gather_crls(policy: TrustPolicy) -> RevocationInfo:
    """Load the policy's CRL files and fetch its CRL URLs."""
    info = RevocationInfo()
    for path in policy.crl_files:
        try:
            info.crls.append(parse_crl(path.read_bytes(), str(path)))
        except (OSError, ValueError) as error:
            info.problems.append(f"CRL file {str(path)!r} unreadable: {error}")
    for url in policy.crl_urls:
        try:
            info.crls.append(parse_crl(_http(url, None, policy.fetch_timeout), url))
        except (OSError, ValueError) as error:
            info.problems.append(f"CRL {url} could not be fetched: {error}")
    for problem in info.problems:
        logger.warning("%s", problem)
    return info


def add_ocsp_response(
    info: RevocationInfo,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    policy: TrustPolicy,
) -> None:
    """Ask the OCSP responder about ``certificate`` and keep the response.

    The responder is the policy's ``ocsp_url`` or else the certificate's
    authority information access extension.
    """
    url = policy.ocsp_url or _responder_url(certificate)
    subject = certificate.subject.rfc4514_string()
    if url is None:
        info.problems.append(
            f"no OCSP responder is known for {subject}; set ocsp_url in the trust policy"
        )
        return
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())
        .build()
    )
    try:
        data = _http(
            url, request.public_bytes(serialization.Encoding.DER), policy.fetch_timeout
        )
        response = ocsp.load_der_ocsp_response(data)
    except (OSError, ValueError) as error:
        info.problems.append(f"OCSP responder {url} failed for {subject}: {error}")
        return
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        info.problems.append(
            f"OCSP responder {url} answered {response.response_status.name} for {subject}"
        )
        return
    info.ocsp_responses.append(data)


def _responder_url(certificate: x509.Certificate) -> str | None:
    try:
        access = certificate.extensions.get_extension_for_class(
            x509.AuthorityInformationAccess
        ).value
    except x509.ExtensionNotFound:
        return None
    for description in access:
        if description.access_method == AuthorityInformationAccessOID.OCSP:
            return description.access_location.value
    return None


def _http(url: str, body: bytes | None, timeout: float) -> bytes:
    """GET ``url``, or POST an OCSP request to it; raise OSError on any failure."""
    if not url.startswith(("http://", "https://")):
        raise OSError(f"unsupported URL scheme in {url!r}; use http:// or https://")
    headers = {"Content-Type": "application/ocsp-request"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.URLError as error:
        raise OSError(str(error.reason)) from error
    if len(data) > MAX_RESPONSE_BYTES:
        raise OSError(f"response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    return data
