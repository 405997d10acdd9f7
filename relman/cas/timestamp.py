"""RFC 3161 timestamps over a signature value: requesting and verifying tokens.

rfc3161-client (Trail of Bits, also used by sigstore-python) builds requests
with a nonce and verifies a response's CMS signature. relman checks the
message imprint and the TSA chain itself, so every refusal names its cause.

A timestamp arrives in one of three forms, all accepted:

- a whole TimeStampResp, as ``openssl ts -reply`` writes it;
- a bare TimeStampToken (a CMS ContentInfo);
- the unsigned attribute id-aa-signatureTimeStampToken inside the manifest's
  SignerInfo (RFC 3161, appendix A), as other signing tools embed it.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime

from asn1crypto import cms as asn1_cms
from asn1crypto import tsp as asn1_tsp
from cryptography import x509
from rfc3161_client import (
    HashAlgorithm,
    TimestampRequestBuilder,
    TimeStampResponse,
    VerifierBuilder,
    decode_timestamp_response,
)
from rfc3161_client.errors import VerificationError as ClientVerificationError

from relman.cas.chain import TIME_STAMPING, subject_of, validate_chain
from relman.cas.errors import FetchError, SignatureError
from relman.cas.policy import TrustPolicy
from relman.cas.revocation import RevocationInfo

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
_IMPRINT_HASHES = {
    "2.16.840.1.101.3.4.2.1": hashlib.sha256,
    "2.16.840.1.101.3.4.2.2": hashlib.sha384,
    "2.16.840.1.101.3.4.2.3": hashlib.sha512,
}


@dataclass(frozen=True)
class VerifiedTimestamp:
    """A timestamp whose token, TSA chain and message imprint verified."""

    time: datetime
    authority: str
    serial_number: int


def request_timestamp(signature_value: bytes, url: str, timeout: float = 30) -> bytes:
    """Ask the TSA at ``url`` for a token over ``signature_value``; return the TimeStampResp.

    The request carries a random nonce and requests the TSA certificate. The
    response must be granted, echo the nonce, and cover ``signature_value``.

    Raises:
        FetchError: the TSA cannot be reached or does not return a response.
        SignatureError: the response is rejected, or its nonce or imprint differ.
    """
    request = (
        TimestampRequestBuilder()
        .data(signature_value)
        .hash_algorithm(HashAlgorithm.SHA256)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )
    data = _post(url, request.as_bytes(), timeout)
    response = load_timestamp(data)
    if response.status not in (0, 1):
        raise SignatureError(
            f"timestamp authority {url} rejected the request (status {response.status}: "
            f"{'; '.join(response.status_string) or 'no reason given'})"
        )
    if response.tst_info.nonce != request.nonce:
        raise SignatureError(
            f"timestamp from {url} does not echo the request's nonce; it may be replayed"
        )
    check_imprint(response, signature_value)
    return response.as_bytes()


def _post(url: str, body: bytes, timeout: float) -> bytes:
    headers = {"Content-Type": "application/timestamp-query"}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(
            f"timestamp authority {url} failed: {reason}; check --tsa-url"
        ) from error
    if len(data) > MAX_RESPONSE_BYTES:
        raise FetchError(
            f"timestamp authority {url} sent more than {MAX_RESPONSE_BYTES} bytes"
        )
    return data


def load_timestamp(data: bytes) -> TimeStampResponse:
    """Parse a TimeStampResp or a bare TimeStampToken.

    Raises:
        SignatureError: the bytes are neither.
    """
    try:
        return decode_timestamp_response(data)
    except ValueError:
        pass
    try:
        token = asn1_cms.ContentInfo.load(data)
        if token["content_type"].native != "signed_data":
            raise ValueError("not a SignedData")
        wrapped = asn1_tsp.TimeStampResp(
            {"status": {"status": "granted"}, "time_stamp_token": token}
        )
        return decode_timestamp_response(wrapped.dump())
    except ValueError as error:
        raise SignatureError(
            f"timestamp is neither a TimeStampResp nor a TimeStampToken: {_first_line(error)}"
        ) from error


def embedded_tokens(signer_info: asn1_cms.SignerInfo) -> list[bytes]:
    """Return the id-aa-signatureTimeStampToken values of a SignerInfo, as DER."""
    tokens = []
    for attribute in signer_info["unsigned_attrs"] or []:
        if attribute["type"].native == "signature_time_stamp_token":
            tokens.extend(value.dump() for value in attribute["values"])
    return tokens


def verify_timestamp(
    data: bytes,
    signature_value: bytes,
    policy: TrustPolicy,
    revocation: RevocationInfo | None = None,
) -> VerifiedTimestamp:
    """Verify a timestamp over ``signature_value`` against the policy's TSA roots.

    Checks, in order: the response status, the message imprint, the TSA
    certificate's timeStamping usage and chain at the timestamp's time, and
    the token's CMS signature.

    Raises:
        SignatureError: any check fails; the message names it.
    """
    response = load_timestamp(data)
    if response.status not in (0, 1):
        raise SignatureError(
            f"timestamp response has status {response.status}, not granted"
        )
    check_imprint(response, signature_value)

    moment = response.tst_info.gen_time
    authority = _authority_certificate(response)
    carried = [
        x509.load_der_x509_certificate(cert)
        for cert in response.signed_data.certificates
    ]
    # The TSA is checked against the policy's CRLs. Its OCSP status is not
    # asked: a policy's ocsp_url names the signers' responder.
    tsa_policy = replace(policy, ocsp=False) if policy.checks_revocation else None
    validate_chain(
        authority,
        carried,
        policy.tsa_roots,
        TIME_STAMPING,
        moment,
        tsa_policy,
        revocation,
    )

    builder = VerifierBuilder()
    added: list[x509.Certificate] = []
    for root in policy.tsa_roots:
        if root not in added:
            builder = builder.add_root_certificate(root)
            added.append(root)
    for certificate in carried:
        if certificate != authority and certificate not in added:
            builder = builder.add_intermediate_certificate(certificate)
            added.append(certificate)
    try:
        builder.build().verify_message(response, signature_value)
    except ClientVerificationError as error:
        raise SignatureError(
            f"timestamp token signed by {subject_of(authority)} does not verify: {error}"
        ) from error
    logger.debug("timestamp by %s at %s verified", subject_of(authority), moment)
    return VerifiedTimestamp(
        moment, subject_of(authority), response.tst_info.serial_number
    )


def check_imprint(response: TimeStampResponse, signature_value: bytes) -> None:
    """Raise SignatureError unless the token's message imprint is the digest of ``signature_value``."""
    imprint = response.tst_info.message_imprint
    hash_function = _IMPRINT_HASHES.get(imprint.hash_algorithm.dotted_string)
    if hash_function is None:
        raise SignatureError(
            f"timestamp uses unsupported imprint hash {imprint.hash_algorithm.dotted_string}; "
            "request SHA-256 or stronger"
        )
    if imprint.message != hash_function(signature_value).digest():
        raise SignatureError(
            "timestamp does not cover this signature: its message imprint differs"
        )


def _authority_certificate(response: TimeStampResponse) -> x509.Certificate:
    signer_infos = list(response.signed_data.signer_infos)
    if len(signer_infos) != 1:
        raise SignatureError(
            f"timestamp token has {len(signer_infos)} signers, expected one"
        )
    signer = signer_infos[0]
    for der in response.signed_data.certificates:
        certificate = x509.load_der_x509_certificate(der)
        if (
            certificate.issuer == signer.issuer
            and certificate.serial_number == signer.serial_number
        ):
            return certificate
    raise SignatureError(
        "timestamp token does not include the TSA certificate; request it with "
        "certReq (relman does) or configure the TSA certificate as an intermediate"
    )


def _first_line(error: Exception) -> str:
    # asn1crypto appends "while parsing ..." lines; the first line names the problem.
    return str(error).splitlines()[0] if str(error) else type(error).__name__
