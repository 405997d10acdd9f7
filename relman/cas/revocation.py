"""Revocation information: CRLs from files and URLs, OCSP responses from responders.

CRLs are only gathered here; relman.cas.chain hands them to the path
validator, which checks their signatures and validity. OCSP responses are
checked here (``check_ocsp_response``), because the validator uses OCSP only
for certificates that name a responder themselves, while a trust policy may
name one for all. Sources that cannot be read are collected as problems, so
the policy can decide between soft fail and hard fail.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from relman.cas.policy import TrustPolicy

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


# Clock skew allowed between this machine and a CRL or OCSP issuer.
OCSP_CLOCK_SKEW = timedelta(minutes=5)
# An OCSP response without nextUpdate is accepted only this soon after its
# thisUpdate, so a recorded "good" response cannot be replayed later.
OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE = timedelta(minutes=15)


@dataclass(frozen=True)
class OcspStatus:
    """A verified OCSP response about one certificate."""

    good: bool
    revoked_at: datetime | None = None
    reason: str | None = None


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

    def crls_from(
        self, issuer: x509.Certificate
    ) -> list[x509.CertificateRevocationList]:
        """Return the loaded CRLs that ``issuer`` signed (checked by signature, not by name)."""
        return [
            crl
            for crl in self.crls
            if crl.issuer == issuer.subject and _signed_by(crl, issuer)
        ]

    def has_crl_from(self, issuer: x509.Certificate) -> bool:
        return bool(self.crls_from(issuer))

    def revocation_entry(
        self, certificate: x509.Certificate, issuer: x509.Certificate
    ) -> x509.RevokedCertificate | None:
        """Return the entry of an ``issuer`` CRL that revokes ``certificate``, if any."""
        for crl in self.crls_from(issuer):
            entry = crl.get_revoked_certificate_by_serial_number(
                certificate.serial_number
            )
            if entry is not None:
                return entry
        return None


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError):
        return False


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
            _add_current(info, parse_crl(path.read_bytes(), str(path)), str(path))
        except (OSError, ValueError) as error:
            info.problems.append(f"CRL file {str(path)!r} unreadable: {error}")
    for url in policy.crl_urls:
        try:
            _add_current(
                info, parse_crl(_http(url, None, policy.fetch_timeout), url), url
            )
        except (OSError, ValueError) as error:
            info.problems.append(f"CRL {url} could not be fetched: {error}")
    for problem in info.problems:
        logger.warning("%s", problem)
    return info


def _add_current(
    info: RevocationInfo, crl: x509.CertificateRevocationList, source: str
) -> None:
    """Keep ``crl`` if it is current now; an expired CRL is a problem, not data.

    The check is against the current time even when a timestamp moves the
    chain check into the past, so an old CRL cannot hide a later revocation.
    """
    now = datetime.now(UTC)
    if crl.last_update_utc > now + OCSP_CLOCK_SKEW:
        info.problems.append(
            f"CRL {source} is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC"
        )
        return
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        info.problems.append(
            f"CRL {source} expired at {crl.next_update_utc:%Y-%m-%d %H:%M} UTC"
        )
        return
    info.crls.append(crl)


def query_ocsp(
    info: RevocationInfo,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    policy: TrustPolicy,
) -> OcspStatus | None:
    """Ask the OCSP responder about ``certificate``; return its verified status.

    The responder is the policy's ``ocsp_url`` or else the certificate's
    authority information access extension. Returns None, with the reason in
    ``info.problems``, when no usable response was obtained.
    """
    url = policy.ocsp_url or _responder_url(certificate)
    subject = certificate.subject.rfc4514_string()
    if url is None:
        info.problems.append(
            f"no OCSP responder is known for {subject}; set ocsp_url in the trust policy"
        )
        return None
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
        return None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        info.problems.append(
            f"OCSP responder {url} returned {response.response_status.name} for {subject}"
        )
        return None
    try:
        status = check_ocsp_response(response, certificate, issuer)
    except ValueError as error:
        info.problems.append(
            f"OCSP response from {url} for {subject} is not acceptable: {error}"
        )
        return None
    if status is None:
        info.problems.append(f"OCSP responder {url} does not know {subject}")
    info.ocsp_responses.append(data)
    return status


def check_ocsp_response(
    response: ocsp.OCSPResponse, certificate: x509.Certificate, issuer: x509.Certificate
) -> OcspStatus | None:
    """Verify an OCSP response about ``certificate`` (RFC 6960) and return its status.

    The response must be signed by ``issuer`` or by a responder certificate
    that ``issuer`` issued with the OCSPSigning usage, must name the
    certificate, and must be current. Returns None for the status "unknown".

    Raises:
        ValueError: any of those checks fails.
    """
    responder = _responder_certificate(response, issuer)
    _verify_response_signature(response, responder)

    single = next(
        (
            item
            for item in response.responses
            if item.serial_number == certificate.serial_number
        ),
        None,
    )
    if single is None:
        raise ValueError(
            f"it contains no status for serial number {certificate.serial_number:x}"
        )
    expected_issuer = hashes.Hash(single.hash_algorithm)
    expected_issuer.update(issuer.subject.public_bytes())
    if single.issuer_name_hash != expected_issuer.finalize():
        raise ValueError("it gives the status of a certificate of another issuer")

    now = datetime.now(UTC)
    if single.this_update_utc > now + OCSP_CLOCK_SKEW:
        raise ValueError(
            f"its thisUpdate {single.this_update_utc:%Y-%m-%d %H:%M} lies in the future"
        )
    too_old = now - OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE
    if single.next_update_utc is None and single.this_update_utc < too_old:
        raise ValueError(
            f"it has no nextUpdate, and its thisUpdate {single.this_update_utc:%Y-%m-%d %H:%M} "
            f"is more than {OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE.seconds // 60} minutes old"
        )
    if (
        single.next_update_utc is not None
        and single.next_update_utc < now - OCSP_CLOCK_SKEW
    ):
        raise ValueError(
            f"it expired at its nextUpdate {single.next_update_utc:%Y-%m-%d %H:%M}"
        )

    if single.certificate_status == ocsp.OCSPCertStatus.GOOD:
        return OcspStatus(good=True)
    if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        reason = (
            single.revocation_reason.value
            if single.revocation_reason
            else "unspecified"
        )
        return OcspStatus(
            good=False, revoked_at=single.revocation_time_utc, reason=reason
        )
    return None


def _responder_certificate(
    response: ocsp.OCSPResponse, issuer: x509.Certificate
) -> x509.Certificate:
    if _names_responder(response, issuer):
        return issuer
    for candidate in response.certificates:
        if not _names_responder(response, candidate):
            continue
        if candidate.issuer != issuer.subject:
            raise ValueError(
                "its responder certificate was not issued by the certificate's issuer"
            )
        candidate.verify_directly_issued_by(issuer)
        try:
            usage = candidate.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage
            ).value
        except x509.ExtensionNotFound:
            usage = []
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise ValueError(
                "its responder certificate lacks the OCSPSigning extended key usage"
            )
        now = datetime.now(UTC)
        if not candidate.not_valid_before_utc <= now <= candidate.not_valid_after_utc:
            raise ValueError("its responder certificate is not valid now")
        return candidate
    raise ValueError(
        "it is signed by a responder that is neither the issuer nor delegated by it"
    )


def _names_responder(
    response: ocsp.OCSPResponse, certificate: x509.Certificate
) -> bool:
    if response.responder_name is not None:
        return response.responder_name == certificate.subject
    key_hash = x509.SubjectKeyIdentifier.from_public_key(
        certificate.public_key()
    ).digest
    return response.responder_key_hash == key_hash


def _verify_response_signature(
    response: ocsp.OCSPResponse, responder: x509.Certificate
) -> None:
    key = responder.public_key()
    algorithm = response.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        raise ValueError(
            f"it is signed with a weak or unknown digest {getattr(algorithm, 'name', None)}"
        )
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(
                response.signature,
                response.tbs_response_bytes,
                padding.PKCS1v15(),
                algorithm,
            )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm)
            )
        else:
            raise ValueError(
                f"its responder key type {type(key).__name__} is not supported"
            )
    except InvalidSignature as error:
        raise ValueError("its signature does not verify") from error


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
    # "Connection: close" because some responders (openssl ocsp, for one)
    # respond only once the client signals the end of its request.
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/ocsp-request"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.URLError as error:
        raise OSError(str(error.reason)) from error
    if len(data) > MAX_RESPONSE_BYTES:
        raise OSError(f"response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    return data


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Treat a redirect as an error: revocation data comes from the configured URL only."""

    def redirect_request(self, request, fp, code, message, headers, new_url):  # noqa: ANN001, ANN201, PLR0913
        raise urllib.error.HTTPError(
            request.full_url, code, f"redirect to {new_url} refused", headers, fp
        )


_OPENER = urllib.request.build_opener(_NoRedirects())
